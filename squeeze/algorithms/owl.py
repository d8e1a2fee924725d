"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Layers whose Wanda scores |W_ij|·‖X_j‖ contain more outliers (scores above M × the layer's
mean score) keep more weights; the average sparsity over layers stays the target. The outlier
ratios come from a dense pre-sweep over the calibration data (every block sees the dense
model's activations), as in the authors' code, because the allocation needs every layer's
ratio before the first block is pruned: the runner offers it to any pass (``survey``/``plan``,
see :class:`squeeze.passes.pruning.PruningPass`).
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
