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

Quantization (``quant``): the same sweep rounds each column's kept entries to the grid of a
:class:`~squeeze.algorithms.quant.QuantSpec` right after its mask is decided, and spreads the
rounding error like the pruning error: SparseGPT's joint sparsify-and-quantize mode, which is
GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") when nothing is pruned. A group's scale and zero point are fixed when the sweep
enters the group, from the group's current (error-updated) weights, kept entries only, as GPTQ
does. Pruned entries are set to exactly 0 (the zero code) and their error is propagated, so the
sparsity pattern stays exact (refilling pruned positions with the quantization grid would break
2:4). For columns whose mask the sweep picks later (N:M, unstructured blocks beyond the current
one), "kept" means what the same rule picks on the current weights. Pruning errors still move a
group's later columns after its scale is fixed, so a few kept entries clip (about 1-2% at 2:4 on
random layers): harmless for int4, where joint beats pruning then rounding, but for int8 that
clipping costs more than int8 rounding itself, and pruning first, then ``obs_quantize`` with the
fixed mask, does better.

Activation order (``actorder=True``, quantization alone or with a fixed mask): the sweep visits the
input columns by decreasing H_jj (the calibrated input energy), GPTQ's "act-order" heuristic
(Frantar et al. 2023, the authors' ``--act-order``): the columns that matter most are rounded first,
while many columns are still free to absorb their error. The scales are then fixed before the sweep,
from the whole weight's kept entries in its original column groups (a group's columns are no longer
visited together), and the result is put back in the original column order, so the codes, scales
and any mask keep exactly the layout they have without it (llm-compressor's ``actorder="static"`` /
``"weight"``; no per-column group index is stored).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from squeeze.algorithms.quant import QuantSpec, _check_observer, _dequantize, _expand, _observe, _quantize
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
    bump = 0.0
    for attempt in range(retries + 1):
        # H itself on the first try, else a copy with the bump on its diagonal (the values of
        # H + bump * I without an identity matrix: each matrix is in^2 x 8 bytes, 254 MB for an
        # MLP down-projection of 5632 inputs, so L goes before U is made)
        A = H if not bump else H.clone()
        if bump:
            A.diagonal().add_(bump)
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
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


def _nm_pruned(W1: torch.Tensor, d: torch.Tensor, n_keep: int, m: int, full: int) -> torch.Tensor:
    """N:M choice over the first ``full`` columns of W1 (a multiple of M; the rest stay dense) with
    the same saliency as the sweep. Returns True = pruned."""
    rows, width = W1.shape
    score = (W1[:, :full] / d[None, :full]) ** 2
    idx = score.view(rows, full // m, m).topk(m - n_keep, dim=-1, largest=False).indices
    pruned = torch.zeros(rows, full // m, m, dtype=torch.bool).scatter_(-1, idx, True).view(rows, full)
    return torch.cat([pruned, torch.zeros(rows, width - full, dtype=torch.bool)], 1)


def _unstructured_ahead(cur: torch.Tensor, d: torch.Tensor, pruned_block: torch.Tensor, blocksize: int,
                        sparsity: float) -> torch.Tensor:
    """Pruned mask of a group's columns ``cur`` for its qparams: the current block's choice where the
    block has made it (``pruned_block``, from the group's first column to the block's end); beyond
    the block (a group wider than a block) what the per-block rule picks on the current weights,
    since the sweep picks those masks only when it gets there. True = pruned."""
    here = min(pruned_block.shape[1], cur.shape[1])
    parts = [pruned_block[:, :here]]
    for b1 in range(here, cur.shape[1], blocksize):
        b2 = min(b1 + blocksize, cur.shape[1])
        parts.append(_block_mask_unstructured(cur[:, b1:b2], d[b1:b2], sparsity))
    return torch.cat(parts, 1)


def _blocks(cols: int, blocksize: int, group: int | None):
    """Column blocks [i1, i2). With quantization, a group wider than a block starts a block, so that
    all its columns are up to date (no pending lazy update) when the sweep enters it."""
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + blocksize, cols)
        if group is not None and group > blocksize:
            i2 = min(i2, (i1 // group + 1) * group)
        yield i1, i2
        i1 = i2


def _check_quant_call(W: torch.Tensor, H: torch.Tensor, quant: QuantSpec, nm, mask, blocksize,
                      dampening, actorder=False, observer="minmax", sparsity=None) -> None:
    if not isinstance(quant, QuantSpec):
        raise SqueezeError(f"quant must be a QuantSpec (e.g. QuantSpec.parse('int4')), got "
                           f"{type(quant).__name__}")
    quant.validate()
    if W.dim() != 2 or not W.dtype.is_floating_point:
        raise SqueezeError(f"the weight must be a 2-D floating tensor [out, in], got {W.dtype} "
                           f"{tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise SqueezeError("the weight has NaN or inf entries and cannot be quantized; check the checkpoint")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise SqueezeError(f"the Hessian must be [in, in] = {(cols, cols)} for a weight {tuple(W.shape)}, "
                           f"got {tuple(H.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != W.shape):
        raise SqueezeError(f"the kept mask must be bool with the weight's shape {tuple(W.shape)}, got "
                           f"{mask.dtype} {tuple(mask.shape)}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise SqueezeError(f"blocksize must be a whole number >= 1, got {blocksize!r}")
    if not dampening >= 0:
        raise SqueezeError(f"dampening must be >= 0, got {dampening!r}")
    _check_observer(observer)
    if not isinstance(actorder, bool):
        raise SqueezeError(f"actorder must be True or False, got {actorder!r}")
    if actorder and (nm is not None or sparsity is not None):
        raise SqueezeError("act-order reorders the columns, so it cannot choose an N:M or per-block mask in the "
                           "same sweep: prune first (the mask is then fixed), or quantize without actorder")
    g = quant.group_width(cols)
    if nm is not None and g < cols and g % nm[1]:
        raise SqueezeError(f"{quant.name} with {nm[0]}:{nm[1]}: the group size {g} must be a multiple of "
                           f"{nm[1]} so that no group of M columns straddles two quantization groups")


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, dampening: float = 0.01,
                    mask: torch.Tensor | None = None, quant: QuantSpec | None = None,
                    actorder: bool = False, observer: str = "minmax") -> tuple[torch.Tensor, ...]:
    """Prune W [out, in] with calibration Hessian H [in, in]. Exactly one of ``sparsity``
    (unstructured, per block), ``nm`` = (N kept, M) or ``mask`` (True = kept, fixed in advance).

    Returns (new weight [out, in] float32, kept mask [out, in] bool). With N:M, a trailing
    partial group (in % M columns) stays dense; the block size is rounded down to a multiple of
    M so groups never straddle a block.

    With ``quant`` the sweep also quantizes (see the module docstring), at most one of the three
    may be given (none: plain GPTQ), and it returns (W_hat [out, in] float32, kept, scale [out, G]
    float32, zero [out, G] uint8 or None): W_hat is exactly ``dequantize`` of its codes, which
    ``quantize(W_hat, quant, scale, zero, kept)`` recovers. The block size is then rounded down to
    a multiple of the group size (when the group is smaller), so groups never straddle a block.
    ``observer`` ("minmax" | "mse", :func:`squeeze.algorithms.quant.qparams`) chooses each group's
    scale; ``actorder`` sweeps the columns by decreasing H_jj (module docstring; quant alone or with
    ``mask`` only).
    """
    rules = sum(x is not None for x in (sparsity, nm, mask))
    if rules > 1 or (rules == 0 and quant is None):
        raise ValueError("give exactly one of sparsity, nm, mask (or none of them, with quant)")
    if quant is None and (actorder or observer != "minmax"):
        raise ValueError("actorder and observer are quantization settings: pass quant")
    if quant is not None:
        _check_quant_call(W, H, quant, nm, mask, blocksize, dampening, actorder, observer, sparsity)
    rows, cols = W.shape
    assert H.shape == (cols, cols), (H.shape, W.shape)
    perm = act_order(H) if actorder else None  # from the calibrated diagonal: dead channels (0) last
    H, W = prepare_hessian(H, W, dampening)
    if perm is not None:
        # scales first, in the original groups (dead columns already zeroed), then reorder everything
        g = quant.group_width(cols)
        scale, zero = _observe(W, quant, mask, observer)
        col_scale = _expand(scale, g, cols)[:, perm]  # (rows, in): each column's own group's scale
        col_zero = None if zero is None else _expand(zero, g, cols)[:, perm]
        W, H = W[:, perm].contiguous(), H[perm][:, perm]
        mask = None if mask is None else mask[:, perm]
    U = inverse_cholesky_upper(H).float()  # (in, in)
    del H
    if nm is not None:
        n_keep, m = nm
        blocksize = max(m, blocksize - blocksize % m)
        full = cols - cols % m  # columns in complete groups
    g = None
    if quant is not None and perm is None:
        g = quant.group_width(cols)
        if g <= blocksize:
            blocksize -= blocksize % g
        one_group = dataclasses.replace(quant, group_size=None)  # qparams of one group's columns
        scale = torch.ones(rows, quant.groups(cols))
        zero = None if quant.symmetric else torch.zeros(rows, quant.groups(cols), dtype=torch.uint8)
        dU = torch.diagonal(U)
    pruned_all = torch.zeros(rows, cols, dtype=torch.bool)
    for i1, i2 in _blocks(cols, blocksize, g):
        W1 = W[:, i1:i2].clone()  # (rows, B), updated in place as columns are fixed
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        if mask is not None:
            pruned1 = ~mask[:, i1:i2]
        elif sparsity is not None:
            pruned1 = _block_mask_unstructured(W1, d, sparsity)
        else:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):  # the OBS sweep: one column at a time, as the algorithm requires
            if nm is not None and i % m == 0 and i1 + i + m <= full:
                score = (W1[:, i:i + m] / d[None, i:i + m]) ** 2  # (rows, M), on updated weights
                idx = score.topk(m - n_keep, dim=1, largest=False).indices
                pruned1[:, i:i + m].scatter_(1, idx, True)
            if g is not None and (i1 + i) % g == 0:  # entering a group: fix its scale (and zero)
                c, width = i1 + i, min(g, cols - i1 - i)
                # a group wider than the block starts the block (_blocks), so W is up to date there
                cur = W1[:, i:i + width] if c + width <= i2 else W[:, c:c + width]
                if mask is not None:
                    kept_g = mask[:, c:c + width]
                elif nm is not None:
                    kept_g = ~_nm_pruned(cur, dU[c:c + width], n_keep, m, max(0, min(width, full - c)))
                elif sparsity is not None:
                    kept_g = ~_unstructured_ahead(cur, dU[c:c + width], pruned1[:, i:], blocksize, sparsity)
                else:
                    kept_g = None
                s_g, z_g = _observe(cur, one_group, kept_g, observer)  # (rows, 1) each
                scale[:, c // g] = s_g[:, 0]
                if zero is not None:
                    zero[:, c // g] = z_g[:, 0]
            w = W1[:, i]
            q = torch.where(pruned1[:, i], torch.zeros_like(w), w)
            if perm is not None:  # scales fixed before the sweep
                c = i1 + i
                s_g, z_g = col_scale[:, c:c + 1], None if col_zero is None else col_zero[:, c:c + 1]
            if quant is not None:
                kept_i = ~pruned1[:, i:i + 1]
                q = _dequantize(_quantize(q[:, None], quant, s_g, z_g, kept_i), quant, s_g, z_g)[:, 0]
            err = (w - q) / d[i]  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exact zero (the update above leaves q up to rounding)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of everything right of the block
        pruned_all[:, i1:i2] = pruned1
    W[pruned_all] = 0.0
    if perm is not None:  # back to the original column order
        inv = torch.argsort(perm)
        W, pruned_all = W[:, inv].contiguous(), pruned_all[:, inv]
    if quant is None:
        return W, ~pruned_all
    return W, ~pruned_all, scale, zero


def act_order(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's activation order: the input columns by decreasing H_jj (ties in column order)."""
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def obs_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None,
                 blocksize: int = 128, dampening: float = 0.01, actorder: bool = False, observer: str = "minmax"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize W [out, in] with OBS error compensation (GPTQ, Frantar et al. 2023), Hessian H [in, in].

    ``keep`` (bool, True = kept) fixes a sparsity mask decided earlier (e.g. Wanda 2:4): entries
    outside it become exactly 0 and the rest are quantized with their error compensated, so the
    pattern survives exactly. Without ``keep`` this is plain GPTQ. To prune and quantize in one
    sweep, use ``sparsegpt_prune(..., quant=spec)``. ``actorder`` and ``observer``: see
    :func:`sparsegpt_prune`.

    Returns (W_hat [out, in] float32, scale [out, G] float32, zero [out, G] uint8 or None); the codes
    are ``quantize(W_hat, spec, scale, zero, keep)``, and dequantizing them gives W_hat exactly.
    """
    W_hat, _, scale, zero = sparsegpt_prune(W, H, mask=keep, blocksize=blocksize, dampening=dampening,
                                            quant=spec, actorder=actorder, observer=observer)
    return W_hat, scale, zero


def reconstruction_loss(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """trace((W - W') H (W - W')ᵀ): the calibration loss ||W X - W' X||² times 2/n."""
    D = (W.double() - W_new.double())
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))
