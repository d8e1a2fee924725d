"""Triton weight-only quantized GEMM: y = x @ dequant(W)^T (+ bias), W in the quant_format layout.

x [M, K] is fp16 / bf16 / fp32, the accumulator is fp32, y is in x's dtype. W comes as int8 codes
[N, K] (symmetric int8 or asymmetric uint8), packed int4 [N, ceil(K/2)] (two nibbles per byte, low =
even column), or fp8 e4m3 [N, K]; fp32 scales [N, G] and, when asymmetric, uint8 zeros [N, G].

One kernel body, launched through two autotuners:

* decode (M <= 16): memory-bound, the weight bytes are the cost. Every program owns BLOCK_N output
  rows and a BLOCK_K-aligned slice of K (split-K, so a layer with few row blocks still fills the
  132 SMs of an H100); it streams its codes exactly once, as bytes (int4 stays packed in memory and
  is split into nibbles in registers), with contiguous rows so the loads vectorise, and reads one
  scale (and zero) per row per group, not per weight. M <= 4 multiplies on CUDA cores (a
  per-token multiply-reduce over the dequantized tile); 4 < M <= 16 pads M to 16 and uses tl.dot
  (the "SplitK" decomposition for skinny W4A16 GEMMs). Split-K partials go to an fp32 buffer
  [S, M, N] that ``split_reduce`` sums in a fixed order (deterministic; no fp32 atomics), with the
  bias and the output cast fused.
* prefill (M > 16): the Triton matmul tutorial's tiled GEMM (grouped program order so neighbouring
  programs share weight tiles in L2), B tile dequantized in registers, then tl.dot.

Dequantization (exact, no int->float conversion instruction): a code u in [0, 255] becomes
``bits(0x4B000000 | u) = 2^23 + u`` as fp32, and one subtraction of ``2^23 + z`` gives ``u - z``
exactly (int8 two's-complement codes are first offset by 128). When a K tile lies inside one group
(``GROUP_SIZE % BLOCK_K == 0``, or per-channel) the tile is the integer-valued ``u - z`` (exact in
fp16 / bf16 too, |u - z| <= 255) and the scale multiplies the tile's [M, N] partial product once
per tile; otherwise (e.g. group 48 with BLOCK_K 64) every column gathers its own scale and zero.
The GPU autotuner prunes configs whose BLOCK_K straddles groups whenever another config fits.

int4 tiles are never interleaved back into column order: the even/odd columns of x are split
instead (x is tiny next to W), and the low and high nibbles multiply them separately.

Under TRITON_INTERPRET=1 (CPU tests): one config with large blocks; bf16 tiles are upcast right
after loading (the interpreter computes bf16 wrongly); no tl.make_block_ptr (gone in Triton 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRET, dot_precision, pick_configs, split_reduce
from ._triton_utils import next_pow2

DECODE_MAX_M = 16  # up to here one M tile covers all rows: the decode (split-K) launch
GEMV_MAX_M = 4  # up to here the decode kernel multiplies on CUDA cores instead of tl.dot
# KIND constexpr: how a code byte becomes u (then w = (u - z) * s)
KIND_UINT, KIND_INT8, KIND_FP8 = 0, 1, 2
_MAGIC = 8388608.0  # 2^23: bits(0x4B000000 | u) as fp32 = 2^23 + u for 0 <= u < 2^23


def _prune_for_groups(configs, named_args, **kwargs):
    """Keep configs whose K tiles never straddle a group (scale once per tile), if there are any."""
    args = {**named_args, **kwargs}
    g, per_channel = args["GROUP_SIZE"], args["PER_CHANNEL"]
    fit = [c for c in configs if per_channel or g % c.kwargs["BLOCK_K"] == 0]
    return fit or configs


def _decode_configs():
    gpu = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (32, 128, 4, 4),
            (64, 128, 4, 3),
            (64, 256, 8, 3),
            (128, 64, 4, 4),
            (128, 128, 8, 3),
            (32, 64, 4, 4),
            (64, 32, 4, 4),
            (128, 32, 4, 4),
        ]
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1}, num_warps=4))


def _prefill_configs():
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 64, 128, 4, 3),
            (128, 128, 128, 8, 3),
            (64, 128, 32, 4, 4),
            (128, 128, 32, 8, 4),
        ]
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}))


@triton.jit
def _centered(raw, zf, KIND: tl.constexpr):
    """Code tile -> (u - z) as exact fp32; ``zf`` = 2^23 + z (fp32, broadcastable to ``raw``)."""
    if KIND == 2:  # fp8 e4m3: the value itself, no zero point
        c = raw.to(tl.float32)
    else:
        u = raw.to(tl.int32)
        if KIND == 1:  # int8 two's complement -> offset binary: q + 128 in [0, 255], zf = 2^23 + 128
            u = u + 128
        c = (u | 0x4B000000).to(tl.float32, bitcast=True) - zf
    return c


@triton.jit
def _tile_zero(zero_ptr, offs_n, n_mask, group, stride_zn, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr):
    """2^23 + z for one group of every row: (BN,) fp32."""
    if HAS_ZERO:
        z = tl.load(zero_ptr + offs_n * stride_zn + group, mask=n_mask, other=0).to(tl.float32)
    else:
        z = tl.zeros(offs_n.shape, dtype=tl.float32) + ZERO
    return z + 8388608.0


@triton.jit
def _gathered_weight(
    raw, cols, offs_n, n_mask, K, scale_ptr, zero_ptr, stride_sn, stride_zn,
    KIND: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
):
    """Dequantized fp32 weight tile (BN, BC) when columns ``cols`` (BC,) may span several groups."""
    grp = cols // GROUP_SIZE
    mask = n_mask[:, None] & (cols[None, :] < K)  # a column past K could name group G (out of bounds)
    s = tl.load(scale_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=mask, other=0.0)
    if HAS_ZERO:
        zf = tl.load(zero_ptr + offs_n[:, None] * stride_zn + grp[None, :], mask=mask, other=0).to(tl.float32)
        zf = zf + 8388608.0
    else:
        zf = 8388608.0 + ZERO
    return _centered(raw, zf, KIND) * s


@triton.jit
def _xwT(x, w, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x (BM, BC) @ w (BN, BC)^T -> (BM, BN) fp32. ``w`` is fp32; ``x`` is in its load dtype."""
    if USE_DOT:
        if UPCAST:
            return tl.dot(x.to(tl.float32), tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            return tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
    else:
        # CUDA cores, one token at a time: the tile is read from registers once per token.
        x32 = x.to(tl.float32)
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, w.shape[0]), dtype=tl.float32)
        for t in tl.static_range(BLOCK_M):
            x_t = tl.sum(tl.where(rows[:, None] == t, x32, 0.0), axis=0)  # row t of x: (BC,)
            r = tl.sum(w * x_t[None, :], axis=1)  # (BN,)
            acc = tl.where(rows[:, None] == t, r[None, :], acc)
        return acc


@triton.jit
def _qmm_kernel(
    x_ptr,  # (M, K) fp16 / bf16 / fp32
    codes_ptr,  # (N, K) int8 / uint8 / fp8, or (N, ceil(K/2)) uint8 for int4; unit stride along K
    scale_ptr,  # (N, G) fp32
    zero_ptr,  # (N, G) uint8 (HAS_ZERO) or a dummy
    bias_ptr,  # (N,) or a dummy (only read when SPLIT == 1: split-K adds it in the reduction)
    out_ptr,  # SPLIT == 1: y (M, N) in x's dtype, row stride stride_om; else fp32 partials (SPLIT, M, N)
    M,
    N,
    K,
    KC,  # code columns: K, or ceil(K/2) packed int4 bytes
    SPLIT,
    M_BUCKET,  # autotune key only (next_pow2(M), capped): prefill configs depend on M's size class
    stride_xm,
    stride_xk,
    stride_cn,
    stride_sn,
    stride_zn,
    stride_om,
    BITS: tl.constexpr,  # 8 or 4 (packed)
    KIND: tl.constexpr,  # KIND_UINT / KIND_INT8 / KIND_FP8
    HAS_ZERO: tl.constexpr,  # zero points from zero_ptr, else the constant ZERO
    ZERO: tl.constexpr,  # 8 for int4 symmetric, 128 for int8 symmetric (after the offset), 0 for fp8
    GROUP_SIZE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,  # one group (GROUP_SIZE >= K)
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in fp32 (fp32 x, bf16 x under the interpreter, or no tl.dot)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # K columns per step (int4: BLOCK_K // 2 bytes); even
    GROUP_M: tl.constexpr,
):
    # Scale once per tile when no tile straddles a group (tiles start at multiples of BLOCK_K).
    GROUP_TILE: tl.constexpr = PER_CHANNEL or (GROUP_SIZE % BLOCK_K == 0)
    # Grouped program order (Triton matmul tutorial); with one M tile (decode) it is plain N order.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # This split's K range, BLOCK_K-aligned so that no tile crosses into another split. The bounds
    # are written so that Triton can prove them multiples of 16 (K and KC usually are): the masks are
    # then constant over 16 bytes and the code loads vectorise.
    tiles = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K)  # K tiles per split
    k_start = pid_s * tiles * BLOCK_K
    k_end = tl.minimum(k_start + tiles * BLOCK_K, K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BM, 1)
    c_rows = codes_ptr + offs_n[:, None] * stride_cn  # (BN, 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                     eviction_policy="evict_last")  # (BM, BK)
        if UPCAST:
            xt = xt.to(tl.float32)
        if BITS == 8:
            raw = tl.load(c_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                          eviction_policy="evict_first")  # (BN, BK)
            if GROUP_TILE:
                zf = _tile_zero(zero_ptr, offs_n, n_mask, k0 // GROUP_SIZE, stride_zn, HAS_ZERO, ZERO)
                part = _xwT(xt, _centered(raw, zf[:, None], KIND), BLOCK_M, USE_DOT, UPCAST, PRECISION)
            else:
                w = _gathered_weight(raw, offs_k, offs_n, n_mask, K, scale_ptr, zero_ptr, stride_sn,
                                     stride_zn, KIND, HAS_ZERO, ZERO, GROUP_SIZE)
                acc += _xwT(xt, w, BLOCK_M, USE_DOT, UPCAST, PRECISION)
        else:
            # (BN, BK/2) bytes; column 2j is the low nibble of byte j. k0 is even (BLOCK_K is).
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b_end = tl.minimum((pid_s + 1) * tiles * (BLOCK_K // 2), KC)  # byte j holds column 2j < k_end
            byte = tl.load(c_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < b_end),
                           other=0, eviction_policy="evict_first").to(tl.int32)
            lo = byte & 0xF
            hi = byte >> 4
            x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, BLOCK_K // 2, 2)))  # (BM, BK/2) each
            if GROUP_TILE:
                zf = _tile_zero(zero_ptr, offs_n, n_mask, k0 // GROUP_SIZE, stride_zn, HAS_ZERO, ZERO)
                part = _xwT(x_even, _centered(lo, zf[:, None], KIND), BLOCK_M, USE_DOT, UPCAST, PRECISION)
                part += _xwT(x_odd, _centered(hi, zf[:, None], KIND), BLOCK_M, USE_DOT, UPCAST, PRECISION)
            else:
                w_lo = _gathered_weight(lo, 2 * offs_b, offs_n, n_mask, K, scale_ptr, zero_ptr, stride_sn,
                                        stride_zn, KIND, HAS_ZERO, ZERO, GROUP_SIZE)
                w_hi = _gathered_weight(hi, 2 * offs_b + 1, offs_n, n_mask, K, scale_ptr, zero_ptr, stride_sn,
                                        stride_zn, KIND, HAS_ZERO, ZERO, GROUP_SIZE)
                acc += _xwT(x_even, w_lo, BLOCK_M, USE_DOT, UPCAST, PRECISION)
                acc += _xwT(x_odd, w_hi, BLOCK_M, USE_DOT, UPCAST, PRECISION)
        if GROUP_TILE:
            s = tl.load(scale_ptr + offs_n * stride_sn + k0 // GROUP_SIZE, mask=n_mask, other=0.0)  # (BN,)
            acc += part * s[None, :]

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        # Every program writes its tile (zeros for an empty split) so the reduction needs no init.
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)


_qmm_decode = triton.autotune(
    configs=_decode_configs(),
    key=["N", "K", "BLOCK_M", "BITS", "GROUP_SIZE", "PER_CHANNEL", "HAS_ZERO", "USE_DOT"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_for_groups},
)(_qmm_kernel)

_qmm_prefill = triton.autotune(
    configs=_prefill_configs(),
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "PER_CHANNEL", "HAS_ZERO"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_for_groups},
)(_qmm_kernel)


@triton.jit
def _expand_24(v0, v1, nib, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kept pairs (v0, v1) (BN, BK/4) + their 4-bit position codes -> the dense (BN, BK) tile."""
    p0 = nib & 3
    p1 = nib >> 2
    zero = tl.zeros_like(v0)
    # dense column 4g + j holds v0 if j == p0, v1 if j == p1, else 0
    w0 = tl.where(p0 == 0, v0, zero)
    w1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
    w2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
    w3 = tl.where(p1 == 3, v1, zero)
    # join(join(w0, w2), join(w1, w3))[..., a, b] = w_{2a+b}  -> row-major (BN, BK)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _q24_kernel(
    x_ptr,  # (M, K) fp16 / bf16 / fp32
    val_ptr,  # (N, K/2) int8: the kept codes of every group of 4 columns (pack_24's values)
    meta_ptr,  # (N, ceil(K/8)) uint8: pack_24's positions, 4 bits per group, low nibble = even group
    scale_ptr,  # (N, G) fp32 over the original K columns
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    KC,  # meta columns: ceil(K/8)
    SPLIT,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_vn,
    stride_mn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,  # a multiple of 4: both kept values of a group of 4 share a scale
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # dense columns per step, a multiple of 8
    GROUP_M: tl.constexpr,
):
    # Same launch structure as _qmm_kernel; the tile is decompressed in registers from BLOCK_K/2 code
    # bytes + BLOCK_K/8 meta bytes per row (0.625 of the int8 dense bytes), then multiplied densely.
    GROUP_TILE: tl.constexpr = PER_CHANNEL or (GROUP_SIZE % BLOCK_K == 0)
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    tiles = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K)
    k_start = pid_s * tiles * BLOCK_K
    k_end = tl.minimum(k_start + tiles * BLOCK_K, K)
    # ends of this split in groups of 4 columns, value bytes and meta bytes (see _qmm_kernel)
    g_end = tl.minimum((pid_s + 1) * tiles * BLOCK_G, K // 4)
    v_end = tl.minimum((pid_s + 1) * tiles * (BLOCK_K // 2), K // 2)
    b_end = tl.minimum((pid_s + 1) * tiles * (BLOCK_K // 8), KC)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & (offs_k[None, :] < k_end), other=0.0,
                     eviction_policy="evict_last")
        if UPCAST:
            xt = xt.to(tl.float32)
        offs_g = k0 // 4 + tl.arange(0, BLOCK_G)  # (BG,)
        mask_ng = n_mask[:, None] & (offs_g[None, :] < g_end)
        # the kept values of group g sit at value columns 2g, 2g + 1: load (BN, BK/2) contiguous bytes
        # (16-byte vector loads), then view them as (BN, BG, 2) pairs in registers
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        v = tl.load(val_ptr + offs_n[:, None] * stride_vn + offs_v[None, :],
                    mask=n_mask[:, None] & (offs_v[None, :] < v_end), other=0, eviction_policy="evict_first")
        v = _centered(v, 8388608.0 + 128, 1)  # fp32 q, |q| <= 127: exact in fp16 / bf16 too
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))
        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        byte = tl.load(meta_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
                       mask=n_mask[:, None] & (offs_b[None, :] < b_end), other=0,
                       eviction_policy="evict_first").to(tl.int32)
        nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_G))
        if GROUP_TILE:
            w = _expand_24(v0, v1, nib, BLOCK_N, BLOCK_K)
            part = _xwT(xt, w, BLOCK_M, USE_DOT, UPCAST, PRECISION)
            s = tl.load(scale_ptr + offs_n * stride_sn + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
            acc += part * s[None, :]
        else:
            # the group of each group of 4 columns (all four share it: GROUP_SIZE % 4 == 0)
            grp = (4 * offs_g) // GROUP_SIZE
            s = tl.load(scale_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=mask_ng, other=0.0)
            w = _expand_24(v0 * s, v1 * s, nib, BLOCK_N, BLOCK_K)
            acc += _xwT(xt, w, BLOCK_M, USE_DOT, UPCAST, PRECISION)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)


_q24_decode = triton.autotune(
    configs=_decode_configs(),
    key=["N", "K", "BLOCK_M", "GROUP_SIZE", "PER_CHANNEL", "USE_DOT"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_for_groups},
)(_q24_kernel)

_q24_prefill = triton.autotune(
    configs=_prefill_configs(),
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "PER_CHANNEL"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_for_groups},
)(_q24_kernel)


def _default_split(n: int, k: int, sms: int) -> int:
    # Enough programs to cover the SMs about twice (row blocks estimated at 64); every split keeps
    # at least 4 tiles of 128 columns so the fixed cost per program stays small.
    n_blocks = triton.cdiv(n, 64)
    return max(1, min(triton.cdiv(2 * sms, n_blocks), max(1, k // 512), 16))


def _dense_rows(t: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (views into larger buffers); the last dimension must be dense.
    return t if t.stride(1) == 1 else t.contiguous()


def _launch(decode, prefill, x, a, b, c, bias, n, kc, consts, split_k, path):
    """Run ``decode`` / ``prefill`` (autotuned kernels sharing one argument layout: x, three weight
    tensors a, b, c with row strides, bias, out, sizes) and return y [M, N] in x's dtype."""
    m, k = x.shape
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_M else "splitk" if m <= DECODE_MAX_M else "prefill"
    if path not in ("gemv", "splitk", "prefill"):
        raise ValueError(f"path must be auto, gemv, splitk or prefill, got {path!r}")
    use_dot = path != "gemv"
    upcast = (not use_dot) or x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    consts = dict(consts, HAS_BIAS=bias is not None, USE_DOT=use_dot, UPCAST=upcast,
                  PRECISION=dot_precision())
    bias_arg = bias if bias is not None else b  # never read without HAS_BIAS
    strides = (x.stride(0), x.stride(1), a.stride(0), b.stride(0), c.stride(0), y.stride(0))
    if path == "prefill":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)
        prefill[grid](x, a, b, c, bias_arg, y, m, n, k, kc, 1, min(next_pow2(m), 4096), *strides, **consts)
        return y
    if m > DECODE_MAX_M:
        raise ValueError(f"the decode launch handles at most {DECODE_MAX_M} rows, got {m}")
    block_m = next_pow2(m) if path == "gemv" else 16
    if split_k is None:
        cuda = x.device.type == "cuda"
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if cuda else 132
        split_k = 1 if INTERPRET else _default_split(n, k, sms)
    split_k = max(1, min(int(split_k), triton.cdiv(k, 32)))  # no more splits than the smallest tiles
    out = y if split_k == 1 else torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split_k)
    decode[grid](x, a, b, c, bias_arg, out, m, n, k, kc, split_k, block_m, *strides, BLOCK_M=block_m,
                 **consts)
    return y if split_k == 1 else split_reduce(out, y, bias)


def quant_linear_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    fmt: str,
    symmetric: bool,
    group_size: int,
    split_k: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(W)^T (+ bias), in x.dtype. Arguments already validated
    (``quant_format.check_quant_args``); ``fmt`` is int8 / int4 / fp8. ``path``: auto / gemv /
    splitk / prefill (gemv and splitk are the decode launch, on CUDA cores or tl.dot)."""
    codes, scale = _dense_rows(codes), _dense_rows(scale)
    zero = None if zero is None else _dense_rows(zero)
    if fmt == "fp8":
        kind, const_zero = KIND_FP8, 0
    elif fmt == "int8" and symmetric:
        kind, const_zero = KIND_INT8, 128
    else:
        kind, const_zero = KIND_UINT, (8 if fmt == "int4" else 0)
    consts = dict(
        BITS=4 if fmt == "int4" else 8, KIND=kind, HAS_ZERO=zero is not None, ZERO=const_zero,
        GROUP_SIZE=group_size, PER_CHANNEL=group_size >= x.shape[1],
    )
    zero_arg = zero if zero is not None else codes  # never read without HAS_ZERO
    n, kc = codes.shape
    return _launch(_qmm_decode, _qmm_prefill, x, codes, scale, zero_arg, bias, n, kc, consts, split_k, path)


def quant_linear_24_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group_size: int,
    split_k: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (unpack_24(values, meta) * scale)^T (+ bias), in x.dtype; arguments
    validated by ``quant_format.check_quant24_args``. ``path`` as in :func:`quant_linear_triton`."""
    values, meta, scale = _dense_rows(values), _dense_rows(meta), _dense_rows(scale)
    consts = dict(GROUP_SIZE=group_size, PER_CHANNEL=group_size >= x.shape[1])
    n, kc = meta.shape
    return _launch(_q24_decode, _q24_prefill, x, values, meta, scale, bias, n, kc, consts, split_k, path)
