"""DaSS scores and masks as pure tensor functions (Guo et al. 2024, "Dependency-Aware
Semi-Structured Sparsity of GLU Variants in Large Language Models").

In an MLP, intermediate channel i is produced by output row i of gate/up and consumed by input
column i of down. DaSS scores the gate/up weights of row i with the norm of that channel,
|W_ij| · ‖X_int,i‖^(1/2), and compares weights along the *output* dimension (within each input
column), so whole unimportant neurons lose more of their weights. down is scored like Wanda
with the same intermediate norms, |W_ij| · ‖X_int,j‖, compared along its input dimension.
"""

from __future__ import annotations

import torch

from squeeze.sparsity import mask_from_scores, wanda_scores


def up_scores(weight: torch.Tensor, int_sq_norm: torch.Tensor) -> torch.Tensor:
    """weight [I, d] (gate or up), int_sq_norm [I] = mean (or sum) of x_int,i²:
    S_ij = |W_ij| · (int_sq_norm_i)^(1/4) = |W_ij| · ‖X_int,i‖^(1/2)."""
    assert weight.shape[0] == int_sq_norm.shape[0], (weight.shape, int_sq_norm.shape)
    return weight.abs() * int_sq_norm.clamp_min(0).pow(0.25).to(weight.dtype)[:, None]


def down_scores(weight: torch.Tensor, int_sq_norm: torch.Tensor) -> torch.Tensor:
    """weight [d, I] (down): Wanda with the intermediate channel norms."""
    return wanda_scores(weight, int_sq_norm)


def up_mask(weight: torch.Tensor, int_sq_norm: torch.Tensor, nm: tuple[int, int] | None,
            sparsity: float | None, parts: int = 1) -> torch.Tensor:
    """Kept mask of a gate / up weight [parts·I, d], grouped along the output dimension:
    unstructured keeps within each input column, N:M within M consecutive output rows of each
    column. ``parts=2`` for a fused gate_up ([gate; up] stacked on the rows): each half is
    masked on its own with the same intermediate norms."""
    rows = weight.shape[0] // parts
    assert rows * parts == weight.shape[0] and rows == int_sq_norm.shape[0], (weight.shape, int_sq_norm.shape)
    halves = [mask_from_scores(up_scores(weight[k * rows:(k + 1) * rows], int_sq_norm), nm, sparsity, dim=0)
              for k in range(parts)]
    return torch.cat(halves, 0)


def down_mask(weight: torch.Tensor, int_sq_norm: torch.Tensor, nm: tuple[int, int] | None,
              sparsity: float | None) -> torch.Tensor:
    return mask_from_scores(down_scores(weight, int_sq_norm), nm, sparsity, dim=-1)
