"""Triton kernels for the chunk-level activation-sparse FFN (1-64 tokens, e.g. speculative drafts).

Pipeline (BlockFFN's chunk-level sparsity, with TEAL/CATS-style thresholds; see ffn_reference for
the activity rules), all on the device, no host synchronisation:

  A. ``_ffn_scores_kernel``  gate (and up, for threshold_on="h") for *all* I neurons of the chunk,
     fp32 accumulation; per neuron an activity flag OR-ed over the chunk's tokens; stores the gate
     pre-activations (or h) [T, I] fp32 for reuse.
  B. ``_compact_kernel``     flags -> ascending index list [I] + count [1] (one program, tl.cumsum
     over blocks; ordered, hence deterministic, unlike an atomic counter).
  C. ``_ffn_gate_up_kernel`` up (and gate, when it was not precomputed) only for the listed neurons:
     rows gathered by index (Deja Vu's gather_gemv), epilogue act(g) * up' -> compact h [T, I].
     Grid sized for all I neurons (cdiv(I, BLOCK_A) programs); programs past ``count`` exit at once.
  D. ``_ffn_down_kernel``    y = sum_a h[:, a] * downT[idx[a], :] over the active rows of the
     transposed down weight [I, H] (Deja Vu's gather_transposed_gemv: each active neuron is one
     contiguous row). Split over output columns x active neurons; every split's share is computed
     on the device from ``count``; fp32 partials reduced in a fixed order (deterministic).

Token dimension: >= 16 tokens use tl.dot (tensor cores); fewer tokens use a CUDA-core
multiply-reduce per token on a weight tile that is read once per step (a GEMV is memory-bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRET, dot_precision, pick_configs, split_reduce
from ._triton_utils import next_pow2

MAX_TOKENS = 64
_ACT_ID = {"swiglu": 0, "relu": 1, "drelu": 2}
# Activity rules of the scores kernel.
RULE_GATE_POSITIVE, RULE_ACT_GATE, RULE_H = 0, 1, 2


@triton.jit
def _mm(a, b, BLOCK_T: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a (BT, BK) x b (BK, BN) -> (BT, BN) fp32; see the module docstring for the two paths."""
    if USE_DOT:
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)
        else:
            return tl.dot(a, b, out_dtype=tl.float32)
    else:
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        rows = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, b.shape[1]), dtype=tl.float32)
        for t in tl.static_range(BLOCK_T):
            a_t = tl.sum(tl.where(rows[:, None] == t, a32, 0.0), axis=0)  # row t of a: (BK,)
            r = tl.sum(a_t[:, None] * b32, axis=0)  # (BN,)
            acc = tl.where(rows[:, None] == t, acc + r[None, :], acc)
        return acc


@triton.jit
def _act_mul(g, u, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g) * u
    elif ACT == 1:
        return tl.maximum(g, 0.0) * u
    else:
        return tl.maximum(g, 0.0) * tl.maximum(u, 0.0)


def _gemv_configs(name_rows: str):
    gpu = [
        triton.Config({name_rows: r, "BLOCK_H": h}, num_warps=w, num_stages=s)
        for r, h, w, s in [
            (16, 256, 4, 4),
            (32, 128, 4, 4),
            (32, 256, 8, 3),
            (64, 128, 8, 3),
            (64, 64, 4, 4),
            (128, 64, 8, 3),
        ]
    ]
    return pick_configs(gpu, triton.Config({name_rows: 64, "BLOCK_H": 128}, num_warps=4))


@triton.autotune(configs=_gemv_configs("BLOCK_I"), key=["I", "H", "BLOCK_T", "RULE"])
@triton.jit
def _ffn_scores_kernel(
    x_ptr,  # (T, H)
    wg_ptr,  # (I, H)
    wu_ptr,  # (I, H), read only for RULE_H
    s_ptr,  # (T, I) fp32 out: gate pre-activation, or h for RULE_H
    flag_ptr,  # (I,) int32 out: 1 if active for any token
    T,
    I,
    H,
    threshold,  # fp32 scalar, or a pointer to one (THR_PTR: a device tensor, no host sync)
    stride_xt,
    stride_wg,
    stride_wu,
    stride_st,
    ACT: tl.constexpr,
    RULE: tl.constexpr,
    THR_PTR: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)  # (BI,)
    i_mask = offs_i < I
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_h[None, :],
                     mask=t_mask[:, None] & h_mask[None, :], other=0.0)  # (BT, BH)
        w_mask = h_mask[:, None] & i_mask[None, :]
        wg = tl.load(wg_ptr + offs_i[None, :] * stride_wg + offs_h[:, None], mask=w_mask, other=0.0)  # (BH, BI)
        if UPCAST:
            xt = xt.to(tl.float32)
            wg = wg.to(tl.float32)
        else:
            xt = xt.to(wg.dtype)
        acc_g += _mm(xt, wg, BLOCK_T, USE_DOT, PRECISION)
        if RULE == 2:
            wu = tl.load(wu_ptr + offs_i[None, :] * stride_wu + offs_h[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                wu = wu.to(tl.float32)
            acc_u += _mm(xt, wu, BLOCK_T, USE_DOT, PRECISION)
    if THR_PTR:
        thr = tl.load(threshold).to(tl.float32)
    else:
        thr = threshold
    g = acc_g
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        a = tl.maximum(g, 0.0)
    if RULE == 0:
        active = g > 0.0
        score = g
    elif RULE == 1:
        active = tl.abs(a) > thr
        score = g
    else:
        score = _act_mul(g, acc_u, ACT)
        active = tl.abs(score) > thr
    active = active & t_mask[:, None]
    flag = tl.max(active.to(tl.int32), axis=0)  # OR over the chunk's tokens: (BI,)
    tl.store(flag_ptr + offs_i, flag, mask=i_mask)
    tl.store(s_ptr + offs_t[:, None] * stride_st + offs_i[None, :], score,
             mask=t_mask[:, None] & i_mask[None, :])


@triton.jit
def _compact_kernel(flag_ptr, idx_ptr, count_ptr, I, BLOCK: tl.constexpr):
    # One program walks the flags block by block: exclusive prefix sum -> output slot.
    count = tl.full([], 0, tl.int32)
    for i0 in range(0, I, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < I
        f = tl.load(flag_ptr + offs, mask=m, other=0)
        pos = count + tl.cumsum(f, axis=0) - f
        tl.store(idx_ptr + pos, offs, mask=m & (f != 0))
        count += tl.sum(f, axis=0)
    tl.store(count_ptr, count)


@triton.autotune(configs=_gemv_configs("BLOCK_A"), key=["H", "BLOCK_T", "HAS_GATE"])
@triton.jit
def _ffn_gate_up_kernel(
    x_ptr,  # (T, H)
    wg_ptr,  # (I, H), read unless HAS_GATE
    wu_ptr,  # (I, H)
    gate_ptr,  # (T, I) fp32 gate pre-activations (HAS_GATE)
    idx_ptr,  # (n_max,) int32 active neuron ids, first `count` valid
    count_ptr,  # (1,) int32
    h_ptr,  # (T, n_max) out, compact: column a <-> neuron idx[a]
    T,
    H,
    stride_xt,
    stride_wg,
    stride_wu,
    stride_gt,
    stride_ht,
    ACT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    count = tl.load(count_ptr)
    if pid * BLOCK_A >= count:  # grid is sized for the maximum; nothing to do here
        return
    offs_a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = offs_a < count
    rows = tl.load(idx_ptr + offs_a, mask=a_mask, other=0)  # neuron ids (BA,)
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    acc_g = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_h[None, :],
                     mask=t_mask[:, None] & h_mask[None, :], other=0.0)  # (BT, BH)
        w_mask = h_mask[:, None] & a_mask[None, :]
        wu = tl.load(wu_ptr + rows[None, :] * stride_wu + offs_h[:, None], mask=w_mask, other=0.0)  # (BH, BA)
        if UPCAST:
            xt = xt.to(tl.float32)
            wu = wu.to(tl.float32)
        else:
            xt = xt.to(wu.dtype)
        acc_u += _mm(xt, wu, BLOCK_T, USE_DOT, PRECISION)
        if not HAS_GATE:
            wg = tl.load(wg_ptr + rows[None, :] * stride_wg + offs_h[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                wg = wg.to(tl.float32)
            acc_g += _mm(xt, wg, BLOCK_T, USE_DOT, PRECISION)
    out_mask = t_mask[:, None] & a_mask[None, :]
    if HAS_GATE:
        g = tl.load(gate_ptr + offs_t[:, None] * stride_gt + rows[None, :], mask=out_mask, other=0.0)
    else:
        g = acc_g
    h = _act_mul(g, acc_u, ACT)
    tl.store(h_ptr + offs_t[:, None] * stride_ht + offs_a[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


def _down_configs():
    gpu = [
        triton.Config({"BLOCK_A": a, "BLOCK_HO": h}, num_warps=w, num_stages=s)
        for a, h, w, s in [
            (32, 128, 4, 4),
            (64, 128, 4, 3),
            (32, 256, 8, 3),
            (16, 256, 4, 4),
            (64, 64, 4, 4),
        ]
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_A": 64, "BLOCK_HO": 128}, num_warps=4))


@triton.autotune(configs=_down_configs(), key=["H", "BLOCK_T", "SPLIT", "H_BY_NEURON"])
@triton.jit
def _ffn_down_kernel(
    h_ptr,  # (T, *) intermediate: compact (column a) or full (column = neuron id, H_BY_NEURON)
    idx_ptr,  # (n_max,) int32
    count_ptr,  # (1,) int32
    wd_ptr,  # (I, H) transposed down weight
    part_ptr,  # (SPLIT, T, H) fp32 out
    T,
    H,
    SPLIT,
    stride_ht,
    stride_wd,
    H_BY_NEURON: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_HO: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(count_ptr)
    # Balance the active neurons over the splits on the device (count is unknown to the host).
    per_split = tl.cdiv(tl.cdiv(count, SPLIT), BLOCK_A) * BLOCK_A
    a_start = pid_s * per_split
    a_end = tl.minimum(a_start + per_split, count)
    offs_ho = pid_h * BLOCK_HO + tl.arange(0, BLOCK_HO)
    ho_mask = offs_ho < H
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    acc = tl.zeros((BLOCK_T, BLOCK_HO), dtype=tl.float32)
    for a0 in range(a_start, a_end, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        a_mask = offs_a < a_end
        rows = tl.load(idx_ptr + offs_a, mask=a_mask, other=0)
        if H_BY_NEURON:
            hcol = rows
        else:
            hcol = offs_a
        hv = tl.load(h_ptr + offs_t[:, None] * stride_ht + hcol[None, :],
                     mask=t_mask[:, None] & a_mask[None, :], other=0.0)  # (BT, BA)
        w = tl.load(wd_ptr + rows[:, None] * stride_wd + offs_ho[None, :],
                    mask=a_mask[:, None] & ho_mask[None, :], other=0.0)  # (BA, BHO)
        if UPCAST:
            hv = hv.to(tl.float32)
            w = w.to(tl.float32)
        else:
            hv = hv.to(w.dtype)
        acc += _mm(hv, w, BLOCK_T, USE_DOT, PRECISION)
    tl.store(part_ptr + pid_s * T * H + offs_t[:, None] * H + offs_ho[None, :], acc,
             mask=t_mask[:, None] & ho_mask[None, :])


# ------------------------------------------------------------------------------------------ host


def _token_meta(x: torch.Tensor) -> dict:
    t = x.shape[0]
    if t > MAX_TOKENS:
        raise ValueError(f"the Triton chunk FFN handles at most {MAX_TOKENS} tokens per chunk, got {t}")
    block_t = next_pow2(t)
    return {"BLOCK_T": block_t, "USE_DOT": block_t >= 16}


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _default_split(h: int, device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(h, 128)), 32))


def _check_weights(x, w_gate, w_up, w_downT):
    t, h = x.shape
    i = w_gate.shape[0]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_downT", w_downT)):
        assert w.shape == (i, h), f"{name} must be [I, H] = {(i, h)}, got {tuple(w.shape)}"
        assert w.stride(1) == 1, f"{name} must have unit stride along H"
        assert w.dtype == x.dtype, f"{name} dtype {w.dtype} != x dtype {x.dtype}"
    return t, h, i


def _down(x, h_buf, idx, count, w_downT, h_by_neuron: bool, split: int | None, tm: dict) -> torch.Tensor:
    t, hdim = x.shape
    split = _default_split(hdim, x.device) if split is None else max(1, int(split))
    part = torch.empty(split, t, hdim, device=x.device, dtype=torch.float32)
    grid = lambda m: (triton.cdiv(hdim, m["BLOCK_HO"]), split)
    _ffn_down_kernel[grid](
        h_buf, idx, count, w_downT, part, t, hdim, split, h_buf.stride(0), w_downT.stride(0),
        H_BY_NEURON=h_by_neuron, UPCAST=_upcast(w_downT.dtype), PRECISION=dot_precision(), **tm,
    )
    y = torch.empty(t, hdim, device=x.device, dtype=x.dtype)
    return split_reduce(part, y)


def _gate_up(x, w_gate, w_up, idx, count, act: str, gate: torch.Tensor | None, tm: dict) -> torch.Tensor:
    t, hdim = x.shape
    n_max = idx.numel()
    h_buf = torch.empty(t, max(n_max, 1), device=x.device, dtype=x.dtype)
    grid = lambda m: (triton.cdiv(max(n_max, 1), m["BLOCK_A"]),)
    _ffn_gate_up_kernel[grid](
        x, w_gate, w_up, gate if gate is not None else x, idx, count, h_buf, t, hdim,
        x.stride(0), w_gate.stride(0), w_up.stride(0), gate.stride(0) if gate is not None else 0, h_buf.stride(0),
        ACT=_ACT_ID[act], HAS_GATE=gate is not None, UPCAST=_upcast(x.dtype), PRECISION=dot_precision(), **tm,
    )
    return h_buf


def sparse_ffn_from_indices_triton(
    x, w_gate, w_up, w_downT, indices, count=None, act: str = "swiglu", *, split: int | None = None
) -> torch.Tensor:
    """y [T, H] = FFN over neurons indices[:count] (count: int32 device tensor [1], default all)."""
    x = x.contiguous()
    _check_weights(x, w_gate, w_up, w_downT)
    tm = _token_meta(x)
    idx = indices.reshape(-1).to(torch.int32).contiguous()
    if count is None:
        count = torch.full((1,), idx.numel(), device=x.device, dtype=torch.int32)
    count = count.reshape(1).to(torch.int32)
    h_buf = _gate_up(x, w_gate, w_up, idx, count, act, None, tm)
    return _down(x, h_buf, idx, count, w_downT, False, split, tm)


def active_index_triton(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 flags [I] -> (indices [I] int32, ascending, first `count` valid; count [1] int32)."""
    i = flags.numel()
    idx = torch.empty(max(i, 1), device=flags.device, dtype=torch.int32)
    count = torch.empty(1, device=flags.device, dtype=torch.int32)
    _compact_kernel[(1,)](flags, idx, count, i, BLOCK=1024)
    return idx, count


def chunk_sparse_ffn_triton(
    x, w_gate, w_up, w_downT, act: str = "relu", threshold: float | torch.Tensor | None = None,
    threshold_on: str = "h",
    *, split: int | None = None, return_active: bool = False,
):
    """Stages A-D above. x [T, H] -> y [T, H] (and (indices, count) if return_active).

    ``threshold``: a float, or a one-element tensor — read by the kernel from device memory when it
    lives on x's device (a threshold kept as a module buffer costs no host sync), else as a scalar.
    """
    x = x.contiguous()
    t, hdim, i = _check_weights(x, w_gate, w_up, w_downT)
    tm = _token_meta(x)
    if threshold is None and act == "swiglu":
        # No neuron is exactly inactive: the "union" is every neuron.
        idx = torch.arange(i, device=x.device, dtype=torch.int32)
        count = torch.full((1,), i, device=x.device, dtype=torch.int32)
        h_buf = _gate_up(x, w_gate, w_up, idx, count, act, None, tm)
        y = _down(x, h_buf, idx, count, w_downT, False, split, tm)
        return (y, idx, count) if return_active else y
    if threshold is None:
        rule = RULE_GATE_POSITIVE
    else:
        rule = RULE_H if threshold_on == "h" else RULE_ACT_GATE
    thr_ptr = torch.is_tensor(threshold) and threshold.device == x.device
    if thr_ptr:
        thr_arg = threshold.reshape(1)
    else:
        thr_arg = float(threshold) if threshold is not None else 0.0  # a CPU tensor: no device sync
    scores = torch.empty(t, i, device=x.device, dtype=torch.float32)
    flags = torch.empty(i, device=x.device, dtype=torch.int32)
    grid = lambda m: (triton.cdiv(i, m["BLOCK_I"]),)
    _ffn_scores_kernel[grid](
        x, w_gate, w_up, scores, flags, t, i, hdim, thr_arg,
        x.stride(0), w_gate.stride(0), w_up.stride(0), scores.stride(0),
        ACT=_ACT_ID[act], RULE=rule, THR_PTR=thr_ptr, UPCAST=_upcast(x.dtype), PRECISION=dot_precision(), **tm,
    )
    idx, count = active_index_triton(flags)
    if rule == RULE_H:
        # h is already known for every neuron: only the down projection remains.
        y = _down(x, scores, idx, count, w_downT, True, split, tm)
    else:
        h_buf = _gate_up(x, w_gate, w_up, idx, count, act, scores, tm)
        y = _down(x, h_buf, idx, count, w_downT, False, split, tm)
    return (y, idx, count) if return_active else y
