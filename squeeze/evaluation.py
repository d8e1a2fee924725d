"""``squeeze.evaluate``: quality of a (compressed) model, optionally against a reference.

Causal LMs: NLL per token and perplexity, and KL(reference || model) in nats/token, each data
row scored as one sequence (truncated to the context); with a reference, the reference's own
perplexity on the same tokens beside it (``ppl_reference``: the baseline, from the same forwards).
Encoders: mean-pooled embeddings (the sentence-transformers pooling), cosine to the reference's
embeddings per row (mean and min). A model with run-time activation sparsity (teal, wina, drelu)
also gets the activation sparsity it reached on these rows (``act_sparsity``, :class:`ActCounter`).

:func:`quality` is the "how good" of the commands that write an export (compress, recover): the
export against its source on held-out rows, bounded in rows and skipped with a stated reason
when there is no data to use or both models would not fit in memory together.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
from torch import nn

from squeeze import progress
from squeeze.errors import SqueezeError
from squeeze.report import write_json


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def model_kind(model: nn.Module) -> str:
    return "causal" if type(model).__name__.endswith(CAUSAL_SUFFIXES) else "encoder"


def _as_model(m, dtype=None):
    if isinstance(m, nn.Module):
        return m.eval(), None
    from squeeze.loading import load

    # the export's model: TEAL/WINA masks kept even where this machine's plan would run them
    # unmasked (quality is the thresholded model's, whatever path is faster here)
    return load(m, dtype=dtype, runtime="sparse"), Path(m)


def eval_rows(data: str, tokenizer_dir: Path | None, max_rows: int | None, seqlen: int,
              max_tokens: int | None = None) -> list[torch.Tensor]:
    from squeeze.calib.packing import tokenize_rows
    from squeeze.calib.sources import load_rows
    from squeeze.calib.build import load_tokenizer

    rows = load_rows(data)
    tok = load_tokenizer(tokenizer_dir) if rows.ids is None and tokenizer_dir is not None else None
    ids = [r[:seqlen] for r in tokenize_rows(rows, tok) if len(r) >= 2]
    if max_rows:
        ids = ids[:max_rows]
    if max_tokens:  # the first rows up to the budget (at least one)
        total, n = 0, 0
        while n < len(ids) and (n == 0 or total + len(ids[n]) <= max_tokens):
            total, n = total + len(ids[n]), n + 1
        ids = ids[:n]
    if not ids:
        raise SqueezeError(f"evaluation data {data} has no rows of at least 2 tokens")
    return [torch.tensor(r, dtype=torch.long) for r in ids]


def _path_of(model) -> Path | None:
    """The folder a transformers model was loaded from, if it still exists (for its tokenizer)."""
    p = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(p) if p and Path(p).is_dir() else None


@torch.no_grad()
def _causal_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[None]).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1)


@torch.no_grad()
def _embed(model, batch: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    n = max(len(r) for r in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    m = mask[..., None].double()
    return (hidden * m).sum(1) / m.sum(1)


class ActCounter:
    """Counts exact zeros in the inputs of every linear a run-time sparsifier feeds (the input
    each consumer really multiplies, after masking or the ReLU), weighted by the consumer's weight
    size as the passes' targets are: the achieved activation sparsity, overall and per layer."""

    def __init__(self, model: nn.Module):
        import re

        self.zeros: dict[int, float] = {}
        self.total: dict[int, float] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if "_squeeze_sparsifier" not in mod.__dict__:
                continue
            m = re.search(r"\.(\d+)\.", name)
            layer, weight = (int(m.group(1)) if m else -1), mod.weight.numel()
            self.handles.append(mod.register_forward_hook(functools.partial(self._count, layer=layer, weight=weight)))

    def _count(self, module, args, out, layer, weight):
        from squeeze.runtime.act_sparse import masked_input

        x = masked_input(module, args[0])
        tokens = x.numel() // max(x.shape[-1], 1)  # every token counts once, whatever the row lengths
        frac = float((x == 0).sum()) / max(x.numel(), 1)
        self.zeros[layer] = self.zeros.get(layer, 0.0) + frac * weight * tokens
        self.total[layer] = self.total.get(layer, 0.0) + weight * tokens

    def __bool__(self) -> bool:
        return bool(self.handles)

    def result(self) -> dict:
        for h in self.handles:
            h.remove()
        if not self.total:
            return {}
        layers = {str(i): round(self.zeros[i] / self.total[i], 4) for i in sorted(self.total)}
        return {"mean": round(sum(self.zeros.values()) / sum(self.total.values()), 4), "layers": layers}


def shape_of(m) -> tuple[str | None, int | None, int | None, str, str]:
    """(model_type, vocab size, hidden size, architecture, name) of a model folder or module, read
    from its config only (a folder is not loaded for this): what decides whether two models' logits
    or embeddings can be compared token by token."""
    if isinstance(m, nn.Module):
        cfg = m.config.to_dict()
        name = cfg.get("_name_or_path") or type(m).__name__
    else:
        from squeeze.checkpoint import Checkpoint

        cfg, name = Checkpoint(m).config_dict, str(m)
    arch = (cfg.get("architectures") or [""])[0]
    cfg = cfg.get("text_config") or cfg  # LLaVA and friends: the language model's
    return cfg.get("model_type"), cfg.get("vocab_size"), cfg.get("hidden_size") or cfg.get("n_embd"), arch, name


def check_reference(model, reference) -> None:
    """Refuse, before either model is loaded, a reference whose scores cannot be set beside the
    model's: another architecture or vocabulary (KL over different token ids is meaningless, and
    the logits do not even have the same width)."""
    mt, mv, mh, march, mname = shape_of(model)
    rt, rv, rh, rarch, rname = shape_of(reference)
    encoders = not march.endswith(CAUSAL_SUFFIXES) and not rarch.endswith(CAUSAL_SUFFIXES)
    if encoders and (mt, mv) == (rt, rv) and mh != rh:  # cosines need embeddings of one width
        raise SqueezeError(f"--reference {rname} embeds into {rh} dimensions but {mname} into {mh}: the reference "
                           "must be the checkpoint the model was made from")
    if (mt, mv) != (rt, rv):
        raise SqueezeError(
            f"--reference {rname} is a {rt} model (vocabulary {rv}) but {mname} is a {mt} model (vocabulary {mv}): "
            "the reference must be the checkpoint the model was made from (same architecture and tokenizer)"
        )


def evaluate(model, data: str = "builtin-eval", reference=None, max_rows: int | None = None,
             seqlen: int | None = None, batch_size: int = 32, json_path: str | Path | None = None,
             activation_stats: bool = False, act_threshold: float = 0.0, max_tokens: int | None = None) -> dict:
    """Score ``model`` (path or module) on ``data``; with ``reference`` also KL / cosine to it.
    ``activation_stats``: per-layer token/chunk-level sparsity of the MLP intermediate
    (:mod:`squeeze.act_stats`; ``act_threshold`` > 0 counts |x| <= it as inactive)."""
    t0 = time.perf_counter()
    if reference is not None:
        check_reference(model, reference)
    m, mdir = _as_model(model)
    ref, rdir = (None, None) if reference is None else _as_model(reference)
    cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    seqlen = seqlen or getattr(cfg, "max_position_embeddings", None) or 2048
    rows = eval_rows(data, mdir or rdir or _path_of(m) or _path_of(ref), max_rows, seqlen, max_tokens)
    kind = model_kind(m)
    report: dict = {"data": data, "rows": len(rows), "kind": kind}
    counter = ActCounter(m)
    if kind == "causal":
        nll = ref_nll = kl = 0.0
        n = 0
        with progress.phase("eval", total=len(rows), unit="row") as shown:
            for r in rows:
                lp = _causal_logprobs(m, r)
                nll -= lp.gather(1, r[1:, None]).sum().item()
                if ref is not None:
                    rp = _causal_logprobs(ref, r)
                    ref_nll -= rp.gather(1, r[1:, None]).sum().item()
                    kl += (rp.exp() * (rp - lp)).sum().item()
                n += len(r) - 1
                shown.advance()
        report.update(tokens=n, nll=nll / n, ppl=math.exp(nll / n))
        if ref is not None:
            report.update(ppl_reference=math.exp(ref_nll / n), kl=kl / n)
    else:
        pad = getattr(cfg, "pad_token_id", None) or 0
        report["tokens"] = sum(len(r) for r in rows)
        cos = []
        with progress.phase("eval", total=len(rows), unit="row") as shown:
            for i in range(0, len(rows) if ref is not None or counter else 0, batch_size):
                b = rows[i:i + batch_size]
                e = _embed(m, b, pad)  # run without a reference too: the activation sparsity is counted on it
                if ref is not None:
                    cos.append(torch.nn.functional.cosine_similarity(e, _embed(ref, b, pad), dim=-1))
                shown.advance(len(b))
        if cos:
            c = torch.cat(cos)
            report.update(cosine_mean=c.mean().item(), cosine_min=c.min().item())
    if counter:
        report["act_sparsity"] = counter.result()
    if activation_stats:
        from squeeze.act_stats import activation_stats as _act_stats

        report["activation_stats"] = _act_stats(m, rows, threshold=act_threshold)
    from squeeze.report import peak_rss_mb

    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if json_path:
        write_json(json_path, report)
    return report


# -- quality of an export against its source ---------------------------------------------------
# compress / recover score the first held-out rows up to this many tokens (all 240 built-in sentences,
# 64 rows of 512 tokens): seconds on small models, a stable mean; --eval-rows N takes N rows instead
DEFAULT_EVAL_TOKENS = 32768
DEFAULT_EVAL_SEQLEN = 512
NO_TOKENIZER = "not measured — pass --eval-data FILE (this model has no tokenizer)"


def resolve_eval_data(eval_data: str | None, model_dir) -> tuple[str | None, str | None]:
    """(data to score on, or None and why not). ``auto``: the built-in held-out text when the model
    has a tokenizer (the only data that fits every tokenized model); ``none``: skip."""
    if eval_data is None:
        return None, "not requested (eval_data=None)"
    if str(eval_data).lower() == "none":
        return None, "not measured (--eval-data none)"
    if eval_data == "auto":
        from squeeze.calib.build import load_tokenizer

        if load_tokenizer(Path(model_dir)) is None:
            return None, NO_TOKENIZER
        return "builtin-eval", None
    return eval_data, None


def check_eval_data(data: str | None, model_dir) -> None:
    """Read ``data`` once before any work, so a missing file or text data for a model without a
    tokenizer stops the command (one line, exit 2) before anything is written, not after."""
    if data is not None:
        try:
            eval_rows(data, Path(model_dir), 1, 8)
        except SqueezeError as e:
            raise SqueezeError(f"--eval-data {data}: {e}") from None


def fits_twice(*dirs) -> tuple[bool, str]:
    """Whether the models in ``dirs`` fit in memory together in fp32 (half the available RAM, the
    other half for activations and the process): quality needs them loaded at once."""
    import psutil

    from squeeze.formats import open_dense
    from squeeze.modeling import build_skeleton, load_config

    need = 0
    for d in dirs:
        skeleton = build_skeleton(load_config(open_dense(d)), False)
        need += sum(p.numel() for p in skeleton.parameters()) * 4
    free = psutil.virtual_memory().available
    return need < 0.5 * free, f"{need / 1e9:.1f} GB in fp32 for both models, {free / 1e9:.1f} GB available"


def quality(model, reference, data: str | None, rows: int | None = None,
            seqlen: int | None = DEFAULT_EVAL_SEQLEN, skipped: str | None = None) -> dict:
    """``model`` (an export folder) against ``reference`` (its source) on ``rows`` rows of
    ``data`` (default: the first rows up to :data:`DEFAULT_EVAL_TOKENS` tokens): the :func:`evaluate` report (ppl beside ``ppl_reference`` and KL for LMs, embedding
    cosine for encoders; achieved activation sparsity when the export has it), or
    ``{"measured": False, "reason": ...}`` when ``data`` is None (``skipped`` says why) or the two
    models would not fit in memory at once."""
    if data is None:
        return {"measured": False, "reason": skipped or "no evaluation data"}
    ok, sizes = fits_twice(model, reference)
    if not ok:
        return {"measured": False, "reason": f"not measured: export and source together would not fit in memory "
                                             f"({sizes}); run `squeeze eval OUT --data {data} --reference SRC` "
                                             "on a larger machine"}
    r = evaluate(model, data, reference=reference, max_rows=rows or None, seqlen=seqlen,
                 max_tokens=None if rows else DEFAULT_EVAL_TOKENS)
    return {"measured": True, **r}


def act_sparsity_on(model_dir, rows: list[torch.Tensor]) -> dict:
    """The activation sparsity an export's run-time sparsifiers reach on ``rows`` (token id rows),
    {} when it has none."""
    from squeeze.loading import load

    m = load(model_dir, runtime="sparse").eval()  # the masks kept, as _as_model
    counter = ActCounter(m)
    if not counter:
        return {}
    with torch.no_grad():
        for r in rows:
            m(input_ids=r.reshape(1, -1))
    return counter.result()
