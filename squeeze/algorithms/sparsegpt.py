"""SparseGPT as pure tensor functions (Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot").

The layer problem: given W [out, in] and the Hessian H = (2/n) X Xᵀ of the squared
reconstruction error ||W X - W' X||², find W' with the requested zeros. SparseGPT walks the
input columns left to right; pruning (or keeping) column i fixes it, and the optimal brain
surgeon (OBS) update spreads its error over the columns not yet fixed, using the rows of the
upper Cholesky factor U of H⁻¹ (row i of U is the OBS update direction after columns < i have
been eliminated). Columns are processed in blocks: inside a block every update is applied
immediately, updates to the columns right of the block are batched ("lazy batch updates").

Masks: unstructured masks are chosen once per block with the saliency w² / U_jj², by one
threshold over rows × block columns (as the reference implementation and llm-compressor do);
N:M masks are chosen at every M-th column on the already-updated weights of the next M columns.
"""

from __future__ import annotations

import math

import torch

from squeeze.errors import SqueezeError


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead input channels (H_jj = 0: the input is always zero) get H_jj = 1 and W[:, j] = 0, so
    the factorisation exists and the weights that can never matter are pruned first. Then add
    ``dampening * mean(diag H)`` to the diagonal. Returns (H, W) as new float64 / float32 tensors."""
    H = H.detach().to(torch.float64).clone()
    W = W.detach().float().clone(memory_format=torch.contiguous_format)  # GPT-2 Conv1D weights arrive transposed
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    diag += dampening * diag.mean()
    return H, W


def inverse_cholesky_upper(H: torch.Tensor, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), in float64. If H is not numerically
    positive definite, add growing multiples of mean(diag H) until it is."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    bump = 0.0
    for attempt in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + bump * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        bump = float(torch.diagonal(H).mean()) * (0.01 * 10 ** attempt)
    raise SqueezeError("SparseGPT: the calibration Hessian is not positive definite even after extra dampening; "
                       "use more calibration data (--nsamples) or a larger --set dampening=...")


def _block_mask_unstructured(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ceil(sparsity * numel) lowest w² / d² of the block (one threshold over rows ×
    columns). Returns True = pruned."""
    score = (W1 / d[None, :]) ** 2
    k = math.ceil(score.numel() * sparsity - 1e-9)
    pruned = torch.zeros(score.shape, dtype=torch.bool)
    if k > 0:
        idx = score.flatten().topk(k, largest=False).indices
        pruned.view(-1)[idx] = True
    return pruned


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, dampening: float = 0.01,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W [out, in] with calibration Hessian H [in, in]. Exactly one of ``sparsity``
    (unstructured, per block), ``nm`` = (N kept, M) or ``mask`` (True = kept, fixed in advance).

    Returns (new weight [out, in] float32, kept mask [out, in] bool). With N:M, a trailing
    partial group (in % M columns) stays dense; the block size is rounded down to a multiple of
    M so groups never straddle a block.
    """
    if sum(x is not None for x in (sparsity, nm, mask)) != 1:
        raise ValueError("give exactly one of sparsity, nm, mask")
    rows, cols = W.shape
    assert H.shape == (cols, cols), (H.shape, W.shape)
    H, W = prepare_hessian(H, W, dampening)
    U = inverse_cholesky_upper(H).float()  # (in, in)
    del H
    if nm is not None:
        n_keep, m = nm
        blocksize = max(m, blocksize - blocksize % m)
        full = cols - cols % m  # columns in complete groups
    pruned_all = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B), updated in place as columns are fixed
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        if mask is not None:
            pruned1 = ~mask[:, i1:i2]
        elif nm is None:
            pruned1 = _block_mask_unstructured(W1, d, sparsity)
        else:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):  # the OBS sweep: one column at a time, as the algorithm requires
            if nm is not None and i % m == 0 and i1 + i + m <= full:
                score = (W1[:, i:i + m] / d[None, i:i + m]) ** 2  # (rows, M), on updated weights
                idx = score.topk(m - n_keep, dim=1, largest=False).indices
                pruned1[:, i:i + m].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(pruned1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exact zero (the update above leaves q up to rounding)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of everything right of the block
        pruned_all[:, i1:i2] = pruned1
    W[pruned_all] = 0.0
    return W, ~pruned_all


def reconstruction_loss(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """trace((W - W') H (W - W')ᵀ): the calibration loss ||W X - W' X||² times 2/n."""
    D = (W.double() - W_new.double())
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))
