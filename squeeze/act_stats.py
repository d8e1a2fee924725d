"""Token- and chunk-level activation sparsity of the MLP intermediate (BlockFFN's statistics).

Song et al. (2025), "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
Chunk-Level Activation Sparsity". TLS is the fraction of intermediate neurons inactive for a
token; CLS(c) is the fraction inactive for *every* token of a chunk of c consecutive tokens —
what a chunk-sparse FFN (speculative verification of c draft tokens) can skip.

"Inactive" means the input of the down projection is exactly zero (ReLU / dReLU models, or a
model whose saved TEAL/WINA thresholds zeroed it: the statistics are read after the sparsifier),
or, with ``threshold > 0``, |x| <= threshold (use this for dense SwiGLU models, where nothing is
exactly zero).
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze import progress

CHUNKS = (1, 2, 4, 8, 16, 32, 64)


def chunk_inactive(active: torch.Tensor, chunk: int) -> tuple[float, int]:
    """(fraction of neurons inactive across each whole chunk, number of chunks) for a [T, I] bool
    activity mask of one sequence; the trailing partial chunk is dropped."""
    t = (active.shape[0] // chunk) * chunk
    if t == 0:
        return 0.0, 0
    union = active[:t].reshape(-1, chunk, active.shape[1]).any(1)  # (chunks, I)
    return 1.0 - union.float().mean().item(), union.shape[0]


@torch.no_grad()
def activation_stats(model: nn.Module, rows: list[torch.Tensor], threshold: float = 0.0,
                     chunks=CHUNKS) -> dict:
    """Per-layer TLS and CLS(c) of the MLP intermediate over ``rows`` (1-D token id tensors)."""
    from squeeze.adapters import Adapter
    from squeeze.runtime.act_sparse import masked_input

    adapter = Adapter(model)
    downs = {}
    for i in range(len(adapter)):
        lins = adapter.block(i).by_role("down")
        if lins:
            downs[i] = lins[0]
    current: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, out):
            x = masked_input(module, args[0])
            x = x.reshape(-1, x.shape[-1])
            current[i] = (x.abs() > threshold) if threshold > 0 else (x != 0)
        return fn

    handles = [lin.module.register_forward_hook(hook(i)) for i, lin in downs.items()]
    sums = {i: {c: [0.0, 0] for c in chunks} for i in downs}
    try:
        with progress.phase("activation stats", total=len(rows), unit="row") as shown:
            for r in rows:
                current.clear()
                model(input_ids=r[None])
                for i, act in current.items():
                    for c in chunks:
                        frac, n = chunk_inactive(act, c)
                        sums[i][c][0] += frac * n
                        sums[i][c][1] += n
                shown.advance()
    finally:
        for h in handles:
            h.remove()
    layers = {}
    for i in downs:
        layers[str(i)] = {f"cls{c}": round(s / n, 4) if n else None for c, (s, n) in sums[i].items()}
        layers[str(i)]["tls"] = layers[str(i)].get("cls1")
    mean = {}
    for c in chunks:
        vals = [v[f"cls{c}"] for v in layers.values() if v[f"cls{c}"] is not None]
        mean[f"cls{c}"] = round(sum(vals) / len(vals), 4) if vals else None
    mean["tls"] = mean.get("cls1")
    return {"inactive": "|x| <= %g" % threshold if threshold > 0 else "x == 0", "chunks": list(chunks),
            "mean": mean, "layers": layers}


def format_table(stats: dict) -> str:
    """A plain-text table: one row per layer (and the mean), TLS and CLS per chunk size."""
    cols = ["tls"] + [f"cls{c}" for c in stats["chunks"]]
    lines = [f"activation sparsity of the MLP intermediate (inactive: {stats['inactive']})",
             "layer  " + " ".join(f"{c:>7}" for c in cols)]
    for name, row in list(stats["layers"].items()) + [("mean", stats["mean"])]:
        lines.append(f"{name:<6} " + " ".join(f"{row[c]:7.3f}" if row[c] is not None else f"{'-':>7}" for c in cols))
    return "\n".join(lines)
