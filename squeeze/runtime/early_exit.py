"""Early-exit inference: stop computing a token at a fixed layer, or as soon as its prediction is
confident (CALM, Schuster et al. 2022, arXiv:2207.07061), through the shared final norm + LM head.

KV-cache policy for the layers a token skipped (CALM's "state copying", computed lazily): the
token's exit hidden state is copied up as the input of every layer it skipped. A skipped layer's
keys/values for that position are computed only when a later token first reaches the layer:
that token's call of the layer then runs on ``[copied states of the missing positions, its own
state]`` together, which fills the cache for the missing positions before attending. So every
layer's cache always covers every earlier position, attention never sees a hole, and no work is
spent on layers no later token reaches. With a fixed exit layer, layers >= E are never run.

Also: :func:`exit_quality` (per-layer next-token accuracy and KL to the final layer), the
measurement LayerSkip training is meant to improve.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from squeeze import progress
from squeeze.compat import new_cache
from squeeze.errors import SqueezeError
from squeeze.runtime.stack import Stack, exit_logits, layer_outputs


def confidence(logits: torch.Tensor, measure: str = "top1") -> float:
    """Top-1 softmax probability, or the margin between the two most likely tokens."""
    p = torch.softmax(logits.double(), -1)
    if measure == "top1":
        return float(p.max())
    if measure == "margin":
        top = p.topk(2).values
        return float(top[0] - top[1])
    raise SqueezeError(f"unknown confidence measure {measure!r}: use top1 or margin")


@torch.no_grad()
def generate_early_exit(model: nn.Module, input_ids, max_new_tokens: int, exit_layer: int | None = None,
                        threshold: float | None = None, measure: str = "top1", min_layer: int = 1,
                        eos_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding that exits at ``exit_layer`` (fixed), or per token at the first layer
    ``>= min_layer`` whose exit confidence reaches ``threshold``. The prompt always runs through
    every layer. Returns ([1, n + new] ids, stats with the mean exit depth)."""
    from squeeze.runtime.speculative import _as_ids

    ids = _as_ids(input_ids)
    stack = Stack(model)
    L, dev = stack.num_layers, ids.device
    if (exit_layer is None) == (threshold is None):
        raise SqueezeError("give exactly one of exit_layer (fixed exit) or threshold (confidence-based exit)")
    if exit_layer is not None and not 1 <= exit_layer <= L:
        raise SqueezeError(f"exit layer must be in [1, {L}]; got {exit_layer}")
    if not 1 <= min_layer <= L:
        raise SqueezeError(f"min_layer must be in [1, {L}]; got {min_layer}")
    t0 = time.perf_counter()
    cache = new_cache()
    n = ids.numel()
    h = stack.run(stack.embed(ids[None]), 0, L, torch.arange(n, device=dev), cache)
    tok = int(stack.head(h[:, -1])[0].argmax())
    out, depths = [tok], []
    exit_state: dict[int, torch.Tensor] = {}  # position -> copied-up hidden state [1, 1, d]
    filled = [n] * L  # positions with keys/values, per layer
    with progress.phase("generate", total=max_new_tokens, unit="token", completed=len(out)) as shown:
        while len(out) < max_new_tokens and tok != eos_token_id:
            pos = n
            h = stack.embed(torch.tensor([[tok]], device=dev))
            depth = L
            for layer in range(L):
                missing = list(range(filled[layer], pos))
                x = torch.cat([exit_state[p] for p in missing] + [h], 1) if missing else h
                y = stack.run(x, layer, layer + 1, torch.arange(filled[layer], pos + 1, device=dev), cache)
                h = y[:, -1:]
                filled[layer] = pos + 1
                done = layer + 1
                if exit_layer is not None:
                    if done == exit_layer:
                        depth = done
                        break
                elif done >= min_layer and done < L and confidence(stack.head(h)[0, -1], measure) >= threshold:
                    depth = done
                    break
            if depth < L:
                exit_state[pos] = h
            depths.append(depth)
            tok = int(stack.head(h)[0, -1].argmax())
            out.append(tok)
            n += 1
            shown.advance()
    seconds = time.perf_counter() - t0
    stats = {"new_tokens": len(out), "seconds": seconds, "tokens_per_s": len(out) / max(seconds, 1e-9),
             "mean_exit_layer": sum(depths) / len(depths) if depths else float(L), "num_layers": L,
             "exit_histogram": {d: depths.count(d) for d in sorted(set(depths))}}
    return torch.cat([ids, torch.tensor(out, dtype=torch.long, device=dev)])[None], stats


@torch.no_grad()
def exit_quality(model: nn.Module, rows: list[torch.Tensor]) -> list[dict]:
    """Per layer l (1-based, the last = the model): next-token accuracy of the exit after block l
    and KL(final || exit_l) in nats/token, averaged over every predicted position of ``rows``."""
    acc, kl, count = None, None, 0
    for ids in rows:
        hiddens, _ = layer_outputs(model, ids[None])
        final = torch.log_softmax(exit_logits(model, hiddens[-1])[0, :-1].double(), -1)
        target = ids[1:]
        if acc is None:
            acc, kl = [0.0] * len(hiddens), [0.0] * len(hiddens)
        for l, h in enumerate(hiddens):
            lp = torch.log_softmax(exit_logits(model, h)[0, :-1].double(), -1)
            acc[l] += float((lp.argmax(-1) == target).sum())
            kl[l] += float((final.exp() * (final - lp)).sum(-1).sum())
        count += target.numel()
    return [{"layer": l + 1, "accuracy": acc[l] / count, "kl_to_final": kl[l] / count} for l in range(len(acc))]
