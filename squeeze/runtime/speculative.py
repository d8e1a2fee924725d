"""``squeeze.generate``: plain and self-speculative decoding (LayerSkip, Elhoushi et al. 2024,
"LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding", arXiv:2404.16710).

Self-speculative decoding drafts with the model's own first ``E`` layers and the shared LM head,
then verifies with the remaining layers. One iteration, with ``t`` the pending token (already
chosen, not yet in the cache) at position ``n`` and every cache layer holding ``n`` positions:

1. draft: for i in 0..k-1 run layers [0, E) on one token (``t``, then each draft) and pick
   ``d_{i+1}`` from the exit logits; the exit hidden states are kept;
2. run layers [0, E) once more on ``d_k`` (so the verifier sees it too);
3. verify: run layers [E, L) *once* over the k+1 exit hidden states (positions n..n+k), reusing
   the cache the drafts wrote for layers < E; this gives the full model's next-token
   distribution after ``t, d_1, ..., d_k``;
4. greedy: accept the longest prefix of drafts equal to the full model's argmax, then one more
   token from the full model (the correction, or a bonus when all k match) — the output is the
   full model's greedy output token for token. Sampling: accept ``d_i`` with probability
   ``min(1, p(d_i)/q(d_i))``; on the first rejection sample from ``max(0, p - q)``
   (renormalised); if all pass, sample the bonus from ``p`` (Leviathan et al. 2023), so the
   output follows the full model's distribution;
5. crop every cache layer back to the accepted length (rejected drafts leave no trace).

Plain decoding (``self_speculative=False``) uses the same layer runner and cache, so speed
comparisons are like for like. Batch size 1; :func:`generate_batch` is plain greedy decoding of
several prompts of one length at once (what ``squeeze bench`` measures at batch 8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from squeeze import progress
from squeeze.compat import crop_cache, new_cache
from squeeze.errors import SqueezeError
from squeeze.runtime.stack import Stack

RECORD_KEY = "self_speculative"  # squeeze.json key holding {"exit_layer": E, "num_speculations": k}


@dataclass
class _Picker:
    do_sample: bool
    temperature: float
    generator: torch.Generator | None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double() / self.temperature, -1)

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if not self.do_sample:
            return int(logits.argmax(-1)), None
        p = self.probs(logits)
        return int(torch.multinomial(p, 1, generator=self.generator)), p

    def sample(self, p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


def _as_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise SqueezeError(f"generate takes one prompt (batch size 1); got batch {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise SqueezeError("input_ids must be a non-empty list of token ids")
    return ids


def saved_settings(model: nn.Module) -> dict:
    """Exit layer / speculation length stored in the export's squeeze.json (see tune-exit)."""
    rec = getattr(model, "squeeze_record", None) or {}
    return dict(rec.get(RECORD_KEY) or {})


def speculative_pays(model: nn.Module) -> bool:
    """Whether decoding should be self-speculative when nobody asked: only when ``tune-exit``
    recorded settings whose measured speed-up over plain decoding is at least 1.0 (settings
    without a measured speed-up, written by hand, count as asked for)."""
    saved = saved_settings(model)
    if not saved:
        return False
    speedup = saved.get("speedup")
    return speedup is None or float(speedup) >= 1.0


def resolve_settings(model: nn.Module, num_layers: int, exit_layer, num_speculations) -> tuple[int, int]:
    saved = saved_settings(model)
    E = exit_layer if exit_layer is not None else saved.get("exit_layer", max(1, num_layers // 2))
    k = num_speculations if num_speculations is not None else saved.get("num_speculations", 4)
    if not 1 <= int(E) < num_layers:
        raise SqueezeError(f"exit layer must be in [1, {num_layers - 1}] for a {num_layers}-layer model; got {E}")
    if int(k) < 1:
        raise SqueezeError(f"num_speculations must be >= 1; got {k}")
    return int(E), int(k)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, self_speculative: bool = False, exit_layer: int | None = None,
             num_speculations: int | None = None, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             eos_token_id: int | None = None, return_stats: bool = False):
    """Generate ``max_new_tokens`` tokens after ``input_ids`` (list or [1, n] tensor).

    ``model`` is a causal LM module or a checkpoint folder (loaded with ``squeeze.load``).
    ``self_speculative=True`` drafts ``num_speculations`` tokens with layers [0, exit_layer) and
    verifies them with the rest; unset values come from the model's squeeze.json
    (``squeeze tune-exit``) or default to L//2 and 4. Greedy output is identical to plain greedy
    decoding. Stops early after ``eos_token_id`` if given. Returns a [1, n + new] LongTensor, or
    ``(ids, stats)`` with ``return_stats=True`` (tokens/s over the whole call, the prompt's
    ``prefill_seconds`` within it, acceptance rate, tokens per full forward).
    """
    if not isinstance(model, nn.Module):
        from squeeze.loading import load

        model = load(model)
    if max_new_tokens < 1:
        raise SqueezeError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise SqueezeError(f"temperature must be > 0 when sampling; got {temperature}")
    ids = _as_ids(input_ids).to(next(model.parameters()).device)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise SqueezeError(f"prompt token ids must be in [0, {vocab}) for this model; got {ids.tolist()[:8]}...")
    model.eval()
    picker = _Picker(do_sample, float(temperature),
                     torch.Generator(device="cpu").manual_seed(seed) if do_sample else None)
    stack = Stack(model)
    t0 = time.perf_counter()
    with progress.phase("generate", total=max_new_tokens, unit="token") as shown:
        if self_speculative:
            E, k = resolve_settings(model, stack.num_layers, exit_layer, num_speculations)
            new, stats = _self_speculative(stack, ids, max_new_tokens, E, k, picker, eos_token_id, shown)
        else:
            new, stats = _plain(stack, ids, max_new_tokens, picker, eos_token_id, shown)
    seconds = time.perf_counter() - t0
    stats.update(new_tokens=len(new), seconds=seconds, tokens_per_s=len(new) / max(seconds, 1e-9),
                 tokens_per_forward=len(new) / max(stats["full_forwards"], 1))
    out = torch.cat([ids, torch.tensor(new, dtype=torch.long, device=ids.device)])[None]
    return (out, stats) if return_stats else out


@torch.no_grad()
def generate_batch(model: nn.Module, input_ids, max_new_tokens: int) -> tuple[torch.Tensor, dict]:
    """Greedy plain decoding of B prompts of one length at once: ``input_ids`` is [B, n], every row
    gets ``max_new_tokens`` tokens (no padding, no stop token, so each step is one forward of B
    tokens, as in batched serving). The loop is :func:`generate`'s plain one on the same layer
    runner and cache. Returns ([B, n + new] ids, stats): ``prefill_seconds`` (the prompts' forward,
    which picks the first token of each row), ``decode_seconds`` (the other ``max_new_tokens - 1``
    steps) and ``tokens_per_s`` = B * (max_new_tokens - 1) / decode_seconds."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.numel() == 0:
        raise SqueezeError(f"generate_batch takes a [batch, length] tensor of prompt ids; got shape {tuple(ids.shape)}")
    if max_new_tokens < 1:
        raise SqueezeError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    model.eval()
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    stack = Stack(model)
    B, n = ids.shape
    cache = new_cache()
    wait = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # kernels run asynchronously there
    t0 = time.perf_counter()
    h = stack.run(stack.embed(ids), 0, stack.num_layers, torch.arange(n, device=dev), cache)  # (B, n, C)
    tok = stack.head(h[:, -1]).argmax(-1)  # (B,)
    wait()
    t1 = time.perf_counter()
    out = [tok]
    for step in range(1, max_new_tokens):  # the token picked at step s - 1 sits at position n + s - 1
        h = stack.run(stack.embed(tok[:, None]), 0, stack.num_layers, torch.tensor([n + step - 1], device=dev), cache)
        tok = stack.head(h[:, -1]).argmax(-1)
        out.append(tok)
    wait()
    t2 = time.perf_counter()
    new = torch.stack(out, 1)  # (B, max_new_tokens)
    assert new.shape == (B, max_new_tokens)
    stats = {"batch": B, "new_tokens": max_new_tokens, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
             "tokens_per_s": B * (max_new_tokens - 1) / max(t2 - t1, 1e-9)}
    return torch.cat([ids, new], 1), stats


def _prefill(stack: Stack, ids: torch.Tensor, cache) -> torch.Tensor:
    h = stack.run(stack.embed(ids[None]), 0, stack.num_layers, torch.arange(ids.numel(), device=ids.device), cache)
    return stack.head(h[:, -1])[0]


def _timed_prefill(stack: Stack, ids, cache, picker, stats: dict) -> int:
    """The first new token; the prefill's seconds go into ``stats`` (``prefill_seconds``), so the
    decode rate after it can be told apart from the prompt's cost."""
    t0 = time.perf_counter()
    tok, _ = picker.pick(_prefill(stack, ids, cache))  # picking a Python int waits for the device
    stats["prefill_seconds"] = time.perf_counter() - t0
    return tok


def _plain(stack: Stack, ids, max_new, picker, eos, shown):
    cache = new_cache()
    stats = {"mode": "plain"}
    tok = _timed_prefill(stack, ids, cache, picker, stats)
    out, n = [tok], ids.numel()
    shown.advance()
    while len(out) < max_new and tok != eos:
        pos = torch.tensor([n], device=ids.device)
        h = stack.run(stack.embed(torch.tensor([[tok]], device=ids.device)), 0, stack.num_layers, pos, cache)
        tok, _ = picker.pick(stack.head(h[:, -1])[0])
        out.append(tok)
        n += 1
        shown.advance()
    return out, {**stats, "full_forwards": len(out)}


def _self_speculative(stack: Stack, ids, max_new, E, k, picker, eos, shown):
    L, dev = stack.num_layers, ids.device
    cache = new_cache()
    timing: dict = {}
    tok = _timed_prefill(stack, ids, cache, picker, timing)
    shown.advance()
    out, n = [tok], ids.numel()  # n = cached positions in every layer; tok sits at position n
    drafted = accepted = iterations = 0
    while len(out) < max_new and tok != eos:
        k_eff = min(k, max_new - len(out) - 1)  # the verifier always adds one token of its own
        exit_h, drafts, q = [], [], []
        cur = tok
        for i in range(k_eff):
            h = stack.run(stack.embed(torch.tensor([[cur]], device=dev)), 0, E, torch.tensor([n + i], device=dev), cache)
            exit_h.append(h)
            cur, qi = picker.pick(stack.head(h[:, -1])[0])
            drafts.append(cur)
            q.append(qi)
            if cur == eos:
                break
        k_eff = len(drafts)
        # the last draft (or the pending token when k_eff == 0) also needs layers < E
        exit_h.append(stack.run(stack.embed(torch.tensor([[cur]], device=dev)), 0, E,
                                torch.tensor([n + k_eff], device=dev), cache))
        hidden = stack.run(torch.cat(exit_h, 1), E, L, torch.arange(n, n + k_eff + 1, device=dev), cache)
        logits = stack.head(hidden)[0]  # full-model logits after tok, d_1..d_k
        iterations += 1
        drafted += k_eff
        m, nxt = _accept(logits, drafts, q, picker)
        accepted += m
        new = drafts[:m] + [nxt]
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        crop_cache(cache, n + m + 1)  # keep tok, d_1..d_m
        n += m + 1
        out.extend(new)
        tok = new[-1]
        shown.advance(len(new))
    return out, {"mode": "self_speculative", "exit_layer": E, "num_speculations": k,
                 "full_forwards": 1 + iterations, "iterations": iterations, "drafted": drafted,
                 "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else 0.0, **timing}


def _accept(logits: torch.Tensor, drafts: list[int], q: list, picker: _Picker) -> tuple[int, int]:
    """Number of accepted drafts and the token the full model adds after them."""
    if not picker.do_sample:
        target = logits.argmax(-1).tolist()
        m = 0
        while m < len(drafts) and drafts[m] == target[m]:
            m += 1
        return m, target[m]
    for i, d in enumerate(drafts):
        p = picker.probs(logits[i])
        if picker.uniform() < min(1.0, float(p[d] / q[i][d])):
            continue
        residual = (p - q[i]).clamp_min(0)
        s = residual.sum()
        return i, picker.sample(residual / s if s > 0 else p)
    return len(drafts), picker.sample(picker.probs(logits[len(drafts)]))
