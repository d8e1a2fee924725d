"""Pure tensor functions for sparsity patterns: parsing, masks from scores, checks.

Conventions: a weight is [out, in]; a mask is a bool tensor of the same shape, True = kept.
"N:M" keeps N of every M consecutive weights along the reduction (input) dimension. When the
dimension is not a multiple of M, the trailing partial group stays dense (reported by
``squeeze info``; ``--strict`` turns it into an error).
"""

from __future__ import annotations

import re

import torch

from squeeze.errors import SqueezeError


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4). N kept out of every M, 0 < N < M."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise SqueezeError(f"bad pattern {text!r}: expected N:M with whole numbers, e.g. 2:4")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise SqueezeError(f"bad pattern {text!r}: need 0 < N < M (N weights kept out of every M), e.g. 2:4")
    return n, mm


def check_sparsity(value) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise SqueezeError(f"bad sparsity {value!r}: expected a number in (0, 1), e.g. 0.5") from None
    if not 0.0 < s < 1.0:
        raise SqueezeError(f"bad sparsity {value!r}: must be strictly between 0 and 1, e.g. 0.5")
    return s


def nm_mask(scores: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive entries along ``dim``.

    Vectorised: reshape to [..., groups, M] and take top-N per group. A trailing partial group
    (size % M) is kept whole.
    """
    s = scores.movedim(dim, -1)
    size = s.shape[-1]
    full = size - size % m
    keep = torch.ones_like(s, dtype=torch.bool)
    if full:
        groups = s[..., :full].reshape(*s.shape[:-1], full // m, m)  # (..., G, M)
        idx = groups.topk(n, dim=-1).indices
        gmask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        keep[..., :full] = gmask.reshape(*s.shape[:-1], full)
    return keep.movedim(-1, dim)


def unstructured_mask(scores: torch.Tensor, sparsity: float, dim: int = -1) -> torch.Tensor:
    """Within each slice along ``dim`` (each output row by default), drop the
    floor(sparsity * size) lowest scores."""
    s = scores.movedim(dim, -1)
    k = int(s.shape[-1] * sparsity)
    keep = torch.ones_like(s, dtype=torch.bool)
    if k:
        idx = s.topk(k, dim=-1, largest=False).indices
        keep.scatter_(-1, idx, False)
    return keep.movedim(-1, dim)


def mask_from_scores(scores: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float | None,
                     dim: int = -1) -> torch.Tensor:
    if pattern is not None:
        return nm_mask(scores, *pattern, dim=dim)
    return unstructured_mask(scores, sparsity, dim=dim)


def satisfies_nm(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> bool:
    """True if every full group of M along ``dim`` has at most N nonzeros."""
    w = weight.movedim(dim, -1)
    full = w.shape[-1] - w.shape[-1] % m
    if not full:
        return True
    nz = (w[..., :full] != 0).reshape(*w.shape[:-1], full // m, m).sum(-1)
    return bool((nz <= n).all())


def fraction_zero(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"):
    S_ij = |W_ij| * ||X_j||_2, with sq_norm[j] = sum (or mean) of x_j^2 over calibration tokens."""
    return weight.abs() * sq_norm.clamp_min(0).sqrt().to(weight.dtype)[None, :]
