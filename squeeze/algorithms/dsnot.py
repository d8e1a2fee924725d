"""DSnoT as a pure tensor function (Zhang et al. 2024, "Dynamic Sparse No Training:
Training-Free Fine-tuning for Sparse LLMs").

Given the dense weight, the current pruned weight and per-input-channel statistics (mean μ,
variance, mean square), DSnoT swaps weights row by row, one "grow" and one "prune" per row per
cycle, to drive each row's expected output error r_i = Σ_j (W_dense - W)_ij μ_j towards zero:

- grow the pruned weight with the best W_ij μ_j / Var_j (the largest if r > 0, the smallest if
  r < 0: restoring it removes W_ij μ_j from r, and low-variance channels are preferred because
  the mean says more about them),
- prune the kept weight with the smallest Wanda score |W_ij|·‖X_j‖ among those whose W_ij μ_j
  has the sign opposite to r (unstructured), or inside the grown weight's group of M (N:M),
- a row stops for good when |r| ≤ ``threshold``, when the swap would flip the sign of r or not
  shrink |r|, or after ``max_cycles`` cycles.

Each swap keeps the row's (and the N:M group's) number of zeros. Weights grown back take their
dense value. When the pruning pass did not update the kept weights (Wanda, magnitude) this is
the authors' algorithm; after SparseGPT, r also counts the updates of the kept weights.
Vectorised over rows; the only loop is over cycles.
"""

from __future__ import annotations

import torch


def dsnot_repair(w_dense: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 sq_norm: torch.Tensor, nm: tuple[int, int] | None = None, threshold: float = 0.1,
                 max_cycles: int = 50, var_power: float = 1.0, same_sign: bool = True,
                 eps: float = 1e-12) -> tuple[torch.Tensor, dict]:
    """Return (repaired weight [out, in] float32, {"swaps": total swaps, "cycles": cycles run}).

    ``w`` zeros are the initial mask (True = kept where w != 0). ``nm`` = (N, M): swaps stay
    inside a group of M consecutive input columns (the caller checks the pattern holds)."""
    w_dense, w = w_dense.float(), w.float().clone()
    cols = w.shape[1]
    mu = mean.float()[None, :]  # (1, in)
    kept = w != 0
    grow_ok = ~kept & (w_dense != 0)  # pruned weights not yet touched by DSnoT (a dense zero cannot grow)
    if nm is not None:
        grow_ok[:, cols - cols % nm[1]:] = False  # the trailing partial group is not part of the pattern
    prune_ok = kept.clone()  # kept weights not yet touched by DSnoT
    g = w_dense * mu / var.float().clamp_min(eps).pow(var_power)[None, :]  # grow metric
    wanda = w.abs() * sq_norm.float().clamp_min(0).sqrt()[None, :]
    r = ((w_dense - w) * mu).sum(1)  # (rows,)
    sign0 = torch.sign(r)
    active = (r.abs() > threshold) & grow_ok.any(1) & prune_ok.any(1)
    neg_inf = torch.tensor(float("-inf"))
    inf = torch.tensor(float("inf"))
    swaps = cycles = 0
    m = nm[1] if nm else 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        idx = active.nonzero().squeeze(1)  # (A,)
        ra = r[idx]
        sr = torch.sign(ra)[:, None]
        # grow: the pruned weight whose W μ / Var, signed by r, is largest
        cand = torch.where(grow_ok[idx], g[idx] * sr, neg_inf)
        gbest, j = cand.max(1)
        wa = w[idx]
        if nm is None:
            opposite = torch.sign(wa * mu) == -sr
            pc = torch.where(prune_ok[idx] & opposite, wanda[idx], inf)
            pbest, k = pc.min(1)
        else:
            start = j - j % m  # the grown weight's group
            cols_g = start[:, None] + torch.arange(m)[None, :]  # (A, M)
            pc = torch.where(prune_ok[idx].gather(1, cols_g), wanda[idx].gather(1, cols_g), inf)
            pbest, kk = pc.min(1)
            k = cols_g.gather(1, kk[:, None]).squeeze(1)
        ar = torch.arange(len(idx))
        delta = wa[ar, k] * mu[0, k] - w_dense[idx, j] * mu[0, j]
        r_after = ra + delta
        accept = torch.isfinite(gbest) & torch.isfinite(pbest) & (ra.abs() > threshold) & (r_after.abs() < ra.abs())
        if same_sign:
            accept &= torch.sign(r_after) == sign0[idx]
        rows_a, j_a, k_a = idx[accept], j[accept], k[accept]
        w[rows_a, j_a] = w_dense[rows_a, j_a]
        w[rows_a, k_a] = 0.0
        grow_ok[rows_a, j_a] = False
        prune_ok[rows_a, k_a] = False
        r[rows_a] = r_after[accept]
        active[idx[~accept]] = False
        swaps += int(accept.sum())
    return w, {"swaps": swaps, "cycles": cycles}
