"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Layers whose Wanda scores |W_ij|·‖X_j‖ contain more outliers (scores above M × the layer's
mean score) keep more weights; the average sparsity over layers stays the target. The outlier
ratios come from a dense pre-pass over the calibration data (every block sees the dense
model's activations), as in the authors' code, because the allocation needs every layer's
ratio before the first block is pruned.
"""

from __future__ import annotations

import torch

from squeeze.errors import SqueezeError


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """D = fraction of all scores (pooled over the layer's linears) greater than m × their mean."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def allocate(ratios: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsity s_l = s - (r_l - mean r), where r_l = 2λ·(D_l - min D)/(max D - min D):
    more outliers -> less sparsity, spread at most 2λ, mean exactly s."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min()) if len(ratios) else 0.0
    if span <= 0:
        return [float(sparsity)] * len(ratios)
    r = (d - d.min()) / span * (2 * lam)
    s = sparsity - (r - r.mean())
    if float(s.min()) <= 0 or float(s.max()) >= 1:
        raise SqueezeError(f"OWL: per-layer sparsities {float(s.min()):.3f}..{float(s.max()):.3f} leave (0, 1); "
                           "lower --set owl_lambda=...")
    return [float(x) for x in s]


@torch.no_grad()
def dense_outlier_ratios(run, pass_, m: float = 5.0) -> list[float]:
    """One dense sweep over the blocks (loaded and released one at a time) that measures each
    block's outlier ratio over the Wanda scores of ``pass_``'s targets."""
    from squeeze.calib.runner import _outputs
    from squeeze.calib.stats import ChannelStats
    from squeeze.sparsity import wanda_scores

    if run.calib is None:
        raise SqueezeError("--sparsity-profile owl needs calibration data (--calib)")
    batches = run._capture()
    ratios = []
    adapter = run.adapter
    for i in range(len(adapter)):
        path = f"{adapter.blocks_path}.{i}"
        run.weights.materialize(run.model, path, run.dtype)
        block = adapter.block(i)
        lins = pass_.targets(block)
        stats = {lin.name: ChannelStats(lin.in_features) for lin in lins}
        handles = [lin.module.register_forward_hook(
            lambda mod, inp, out, lin=lin, stats=stats: stats[lin.name].update(lin.inputs_2d(inp[0]).float()))
            for lin in lins]
        try:
            for b in batches:
                rest, kwargs = b.calls[i]
                b.hidden = _outputs(block.module(b.hidden, *rest, **kwargs))
        finally:
            for h in handles:
                h.remove()
        if lins:
            ratios.append(outlier_ratio([wanda_scores(lin.weight.float(), stats[lin.name].mean_sq())
                                         for lin in lins], m))
        else:
            ratios.append(0.0)
        run.weights.release(block.module)
    return ratios
