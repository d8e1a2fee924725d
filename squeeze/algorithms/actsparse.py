"""Pure tensor functions for activation sparsity (TEAL / WINA), testable on hand-made tensors.

TEAL — Liu et al. (2024), "Training-Free Activation Sparsity in Large Language Models": zero the
input x_i of a linear when |x_i| is below a per-site threshold calibrated so that a target
fraction of entries falls below it.
WINA — Chen et al. (2025), "WINA: Weight Informed Neuron Activation for Accelerating Large
Language Model Inference": score x_i by |x_i| * ||W_{:,i}||_2 (the column norm of the consuming
weight), so an input that feeds large weights survives even when it is small.

Sites per block: the attention input (shared by q/k/v), the attention output (input of o), the
MLP input (shared by gate/up) and the MLP intermediate (input of down).
"""

from __future__ import annotations

import math

import torch

from squeeze.errors import SqueezeError

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
ROLE_TO_SITE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in", "o": "attn_out",
                "gate": "mlp_in", "up": "mlp_in", "gate_up": "mlp_in", "down": "mlp_mid"}
# Which consumer's column norms weight a shared site (WINA's reference scores the attention input
# with k_proj and the MLP input with gate_proj); the first role present wins.
SCALE_ROLES = {"attn_in": ("k", "qkv", "q", "v"), "attn_out": ("o",), "mlp_in": ("gate", "gate_up", "up"),
               "mlp_mid": ("down",)}


# Sites WINA's orthogonal transform rotates: the inputs shared by several consumers (q/k/v, gate/up).
ROTATED_SITES = ("attn_in", "mlp_in")


def parse_sites(value: str) -> tuple:
    """``"attn_in,mlp_mid"`` -> the site names, checked against :data:`SITES`."""
    sites = tuple(s.strip() for s in str(value).split(",") if s.strip())
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise SqueezeError(f"bad sites {value!r}: use a comma list of {', '.join(SITES)}")
    return sites


def orthogonal_transform(weights: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """WINA's orthogonal transform for one shared input: with the consumers' weights (each
    [out_i, in]) stacked into W = U S V^T, rotating the input z = x V and the weights W_i -> W_i V
    leaves every output unchanged (W_i V V^T x = W_i x) and makes the stacked columns orthogonal,
    with norms S. Then masking z by |z_j| * S_j removes exactly sum_j S_j^2 z_j^2 of squared output
    error for the masked j — the case in which WINA's greedy selection is optimal (Chen et al.
    2025, Sec. 3).

    Differs from the reference in two ways, both on purpose: the SVD is of the *stacked* consumers
    (q;k;v and gate;up) rather than of k_proj / gate_proj alone — with grouped-query attention
    k_proj has rank <= kv_dim < hidden, and its SVD would give the remaining directions, which q
    and v still read, a zero score; and the rotation is applied at the site input (one [in, in]
    matmul per site and token) instead of to the residual stream with per-layer shortcut
    matrices, which costs the same (two [hidden, hidden] matmuls per layer) but keeps the
    architecture, the norms' gains and every other linear as they are.

    Returns (rotated weights in their dtypes, V [in, in] float32, singular values [in] float32,
    about 0 past the rank when the stack has fewer rows than ``in``)."""
    # V and S from the eigendecomposition of the [in, in] Gram matrix W^T W = V S^2 V^T (float64):
    # a full basis even when the stack has fewer rows than `in`, and O(in^3) instead of an SVD
    # whose U alone is [rows, rows] (11264^2 for a 2048-wide gate;up stack).
    gram = sum(x.detach().double().t() @ x.detach().double() for x in weights)
    evals, v = torch.linalg.eigh(gram)
    order = evals.argsort(descending=True)
    sv, v = evals[order].clamp_min(0).sqrt(), v[:, order]
    rotated = [(x.detach().double() @ v).to(x.dtype) for x in weights]
    return rotated, v.float(), sv.float()


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W_{:,i}||_2 for a weight stored [out, in] -> [in] (float32)."""
    return weight.float().norm(dim=0)


def scores(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """|x| (TEAL) or |x| * column norm (WINA), same shape as x."""
    s = x.abs()
    if scale is not None and scale.numel():
        s = s * scale.to(s.dtype)
    return s


def threshold_for(sorted_scores: torch.Tensor, sparsity: float) -> float:
    """The score below which a fraction ``sparsity`` of the (sorted, 1-D) samples lies.

    Entries with score <= threshold are zeroed, so the returned value is the largest score of the
    lowest ``sparsity`` fraction (0 when sparsity is 0)."""
    n = sorted_scores.numel()
    k = int(round(sparsity * n))
    if k <= 0 or n == 0:
        return 0.0
    return float(sorted_scores[min(k, n) - 1])


def threshold_from_scores(score: torch.Tensor, sparsity: float) -> float:
    """:func:`threshold_for` on unsorted scores of any shape (k-th smallest, no full sort)."""
    flat = score.reshape(-1)
    k = int(round(sparsity * flat.numel()))
    if k <= 0 or flat.numel() == 0:
        return 0.0
    return float(flat.kthvalue(min(k, flat.numel())).values)


def mask_threshold(x: torch.Tensor, threshold: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x with entries whose score is <= threshold zeroed (a threshold of 0 only zeroes zeros).
    The run-time mask of every TEAL/WINA site, so it stays one fused op where it can: decode
    calls it per site and token (the threshold is compared in x's dtype)."""
    if scale is None or not scale.numel():
        return torch.nn.functional.hardshrink(x, float(threshold))
    return torch.where(scores(x, scale) > threshold, x, 0)


def mask_topk(x: torch.Tensor, sparsity: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ceil((1 - sparsity) * d) highest-scoring entries of every row (token)."""
    d = x.shape[-1]
    keep = max(0, min(d, math.ceil((1.0 - sparsity) * d - 1e-9)))
    if keep >= d:
        return x
    if keep == 0:
        return torch.zeros_like(x)
    idx = scores(x, scale).topk(keep, dim=-1).indices
    mask = torch.zeros_like(x).scatter_(-1, idx, 1.0)
    return x * mask


def sample_rows(x: torch.Tensor, max_rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random subset of at most ``max_rows`` rows of x [tokens, d] (bounded calibration memory)."""
    if x.shape[0] <= max_rows:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:max_rows]
    return x[idx]


def weighted_sparsity(sparsities: dict[str, float], sizes: dict[str, int]) -> float:
    """Model-wide activation sparsity: per-site sparsity weighted by the weight it saves reading."""
    total = sum(sizes[s] for s in sparsities)
    return sum(sparsities[s] * sizes[s] for s in sparsities) / max(total, 1)


def greedy_allocation(sizes: dict[str, int], target: float, error_of, step: float = 0.05,
                      max_site: float = 0.99) -> dict[str, float]:
    """TEAL's greedy allocation inside one block.

    Start dense; repeatedly try one more ``step`` of sparsity on each site and keep the move with
    the smallest increase of block-output error per unit of weight skipped, until the
    size-weighted sparsity reaches ``target``. ``error_of(dict site -> sparsity) -> float``."""
    current = {s: 0.0 for s in sizes}
    if target <= 0:
        return current
    base = error_of(current)
    moved = None
    while weighted_sparsity(current, sizes) < target - 1e-9:
        best = None
        for s in sizes:
            if current[s] >= max_site:
                continue
            trial = dict(current)
            trial[s] = min(max_site, current[s] + step)
            gain = weighted_sparsity(trial, sizes) - weighted_sparsity(current, sizes)
            err = error_of(trial)
            cost = (err - base) / max(gain, 1e-12)
            if best is None or cost < best[0]:
                best = (cost, trial, err)
        if best is None:
            break
        _, new, base = best
        moved = next(s for s in sizes if new[s] != current[s])
        current = new
    # The last step may overshoot the target: take the excess back from the site moved last, so
    # the block sits exactly at the target.
    excess = weighted_sparsity(current, sizes) - target
    if excess > 0 and moved is not None:
        total = sum(sizes.values())
        current[moved] = max(0.0, current[moved] - excess * total / sizes[moved])
    return current
