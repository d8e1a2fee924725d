"""``squeeze.evaluate``: quality of a (compressed) model, optionally against a reference.

Causal LMs: NLL per token and perplexity, and KL(reference || model) in nats/token, each data
row scored as one sequence (truncated to the context). Encoders: mean-pooled embeddings (the
sentence-transformers pooling), cosine to the reference's embeddings per row (mean and min).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from squeeze import progress
from squeeze.errors import SqueezeError
from squeeze.report import write_json


def model_kind(model: nn.Module) -> str:
    name = type(model).__name__
    return "causal" if name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) else "encoder"


def _as_model(m, dtype=None):
    if isinstance(m, nn.Module):
        return m.eval(), None
    from squeeze.loading import load

    return load(m, dtype=dtype), Path(m)


def eval_rows(data: str, tokenizer_dir: Path | None, max_rows: int | None, seqlen: int) -> list[torch.Tensor]:
    from squeeze.calib.packing import tokenize_rows
    from squeeze.calib.sources import load_rows
    from squeeze.calib.build import load_tokenizer

    rows = load_rows(data)
    tok = load_tokenizer(tokenizer_dir) if rows.ids is None and tokenizer_dir is not None else None
    ids = [r[:seqlen] for r in tokenize_rows(rows, tok) if len(r) >= 2]
    if max_rows:
        ids = ids[:max_rows]
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


def evaluate(model, data: str = "builtin-eval", reference=None, max_rows: int | None = None,
             seqlen: int | None = None, batch_size: int = 32, json_path: str | Path | None = None,
             activation_stats: bool = False, act_threshold: float = 0.0) -> dict:
    """Score ``model`` (path or module) on ``data``; with ``reference`` also KL / cosine to it.
    ``activation_stats``: per-layer token/chunk-level sparsity of the MLP intermediate
    (:mod:`squeeze.act_stats`; ``act_threshold`` > 0 counts |x| <= it as inactive)."""
    t0 = time.perf_counter()
    m, mdir = _as_model(model)
    ref, rdir = (None, None) if reference is None else _as_model(reference)
    cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    seqlen = seqlen or getattr(cfg, "max_position_embeddings", None) or 2048
    rows = eval_rows(data, mdir or rdir or _path_of(m) or _path_of(ref), max_rows, seqlen)
    kind = model_kind(m)
    report: dict = {"data": data, "rows": len(rows), "kind": kind}
    if kind == "causal":
        nll = kl = 0.0
        n = 0
        with progress.phase("eval", total=len(rows), unit="row") as shown:
            for r in rows:
                lp = _causal_logprobs(m, r)
                nll -= lp.gather(1, r[1:, None]).sum().item()
                if ref is not None:
                    rp = _causal_logprobs(ref, r)
                    kl += (rp.exp() * (rp - lp)).sum().item()
                n += len(r) - 1
                shown.advance()
        report.update(tokens=n, nll=nll / n, ppl=math.exp(nll / n))
        if ref is not None:
            report["kl"] = kl / n
    else:
        pad = getattr(cfg, "pad_token_id", None) or 0
        report["tokens"] = sum(len(r) for r in rows)
        if ref is not None:
            cos = []
            with progress.phase("eval", total=len(rows), unit="row") as shown:
                for i in range(0, len(rows), batch_size):
                    b = rows[i:i + batch_size]
                    cos.append(torch.nn.functional.cosine_similarity(_embed(m, b, pad), _embed(ref, b, pad), dim=-1))
                    shown.advance(len(b))
            c = torch.cat(cos)
            report.update(cosine_mean=c.mean().item(), cosine_min=c.min().item())
    if activation_stats:
        from squeeze.act_stats import activation_stats as _act_stats

        report["activation_stats"] = _act_stats(m, rows, threshold=act_threshold)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if json_path:
        write_json(json_path, report)
    return report
