"""Triton kernels for y = x @ W24^T with W24 in our compressed 2:4 format (see sparse24_format).

Two kernels, picked by the number of rows of x:

* decode (M <= 8 tokens): memory-bound GEMV. Every program owns BLOCK_N output features and a
  slice of the K groups (split-K, so a small N still fills the GPU). For each kept value it
  reads the 2-bit position from the metadata, gathers x at that column and accumulates in fp32 —
  the "gather the input at the kept columns" idea of activation-sparse GEMVs (Deja Vu's
  gather_gemv, TEAL's sparse GEMV) applied to weight sparsity. Only values + metadata travel from
  HBM: 0.5625 of the dense bytes for 16-bit weights, hence <= 1.78x over a dense GEMV.
  Split-K partials go to an fp32 buffer [S, M, N] reduced in a fixed order (deterministic,
  unlike fp32 atomic_add).
* prefill (M > 8): a tiled GEMM (the Triton matmul tutorial's structure) whose B tile is
  decompressed in registers from values + metadata, then fed to tl.dot with an fp32 accumulator.
  Tensor cores do the dense amount of work, so this tops out at dense speed (compute-bound); it
  exists so a compressed checkpoint needs no dense copy. Sparse tensor cores (mma.sp, used by
  CUTLASS / cuSPARSELt through torch.sparse.to_sparse_semi_structured) are not reachable from
  Triton today.

Both kernels keep bf16 out of arithmetic when interpreting (the interpreter computes bf16 wrongly)
by upcasting tiles right after loading; on GPUs 16-bit tiles go to tl.dot as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRET, dot_precision, pick_configs, split_reduce
from ._triton_utils import next_pow2

DECODE_MAX_M = 8


def _decode_configs():
    gpu = [
        triton.Config({"BLOCK_N": bn, "BLOCK_G": bg}, num_warps=w, num_stages=s)
        for bn, bg, w, s in [
            (32, 64, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 8, 3),
            (128, 32, 4, 4),
            (128, 64, 8, 3),
            (16, 256, 4, 3),
        ]
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_N": 64, "BLOCK_G": 64}, num_warps=4))


@triton.autotune(configs=_decode_configs(), key=["N", "K", "BLOCK_M", "SPLIT"])
@triton.jit
def _sp24_decode_kernel(
    x_ptr,  # (M, K)
    val_ptr,  # (N, K/2)
    meta_ptr,  # (N, ceil(K/8)) uint8
    part_ptr,  # (SPLIT, M, N) fp32
    M,
    N,
    K,
    SPLIT,
    stride_xm,
    stride_xk,
    stride_vn,
    stride_mn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # groups of 4 dense columns per step (even)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    G = K // 4
    # Split the groups evenly; every split starts on a multiple of BLOCK_G (so on an even group,
    # i.e. on a metadata byte boundary).
    per_split = tl.cdiv(tl.cdiv(G, SPLIT), BLOCK_G) * BLOCK_G
    g_start = pid_s * per_split
    g_end = tl.minimum(g_start + per_split, G)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)  # (BM,)
    m_mask = offs_m < M
    two = tl.arange(0, 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(g_start, g_end, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)  # (BG,)
        g_mask = offs_g < g_end
        mask_ng = n_mask[:, None] & g_mask[None, :]  # (BN, BG)
        # Kept values of group g sit at columns 2g, 2g+1: load both as a (BN, BG, 2) tile.
        v = tl.load(
            val_ptr + offs_n[:, None, None] * stride_vn + 2 * offs_g[None, :, None] + two[None, None, :],
            mask=mask_ng[:, :, None],
            other=0.0,
        ).to(tl.float32)
        v0, v1 = tl.split(v)  # (BN, BG) each
        # One metadata byte per two groups; the low nibble belongs to the even group.
        offs_b = g0 // 2 + tl.arange(0, BLOCK_G // 2)
        byte = tl.load(
            meta_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
            mask=n_mask[:, None] & (2 * offs_b[None, :] < g_end),
            other=0,
        ).to(tl.int32)
        nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_G))
        col0 = 4 * offs_g[None, :] + (nib & 3)  # (BN, BG) dense column of each kept value
        col1 = 4 * offs_g[None, :] + (nib >> 2)
        # Gather x at those columns for every token: (BM, BN, BG).
        mask3 = m_mask[:, None, None] & mask_ng[None, :, :]
        x_rows = x_ptr + offs_m[:, None, None] * stride_xm
        x0 = tl.load(x_rows + col0[None, :, :] * stride_xk, mask=mask3, other=0.0).to(tl.float32)
        x1 = tl.load(x_rows + col1[None, :, :] * stride_xk, mask=mask3, other=0.0).to(tl.float32)
        acc += tl.sum(x0 * v0[None, :, :] + x1 * v1[None, :, :], axis=2)
    # Every program writes its tile (zeros for an empty split) so the reduction needs no init.
    out = part_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


def _prefill_configs():
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 64, 128, 4, 3),
            (256, 128, 64, 8, 3),
        ]
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}))


@triton.autotune(configs=_prefill_configs(), key=["M", "N", "K"])
@triton.jit
def _sp24_prefill_kernel(
    x_ptr,  # (M, K)
    val_ptr,  # (N, K/2)
    meta_ptr,  # (N, ceil(K/8)) uint8
    bias_ptr,  # (N,) or dummy
    y_ptr,  # (M, N)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_vn,
    stride_mn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in fp32 (fp32 weights, or bf16 under the interpreter)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # dense columns per step, multiple of 8
    GROUP_M: tl.constexpr,
):
    # Grouped program order (Triton matmul tutorial): neighbouring programs share W tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    BLOCK_G: tl.constexpr = BLOCK_K // 4
    G = K // 4
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    two = tl.arange(0, 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_g = k0 // 4 + tl.arange(0, BLOCK_G)
        g_mask = offs_g < G
        mask_ng = n_mask[:, None] & g_mask[None, :]
        v = tl.load(
            val_ptr + offs_n[:, None, None] * stride_vn + 2 * offs_g[None, :, None] + two[None, None, :],
            mask=mask_ng[:, :, None],
            other=0.0,
        )
        if UPCAST:
            v = v.to(tl.float32)
        v0, v1 = tl.split(v)  # (BN, BG)
        offs_b = k0 // 8 + tl.arange(0, BLOCK_G // 2)
        byte = tl.load(
            meta_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
            mask=n_mask[:, None] & (2 * offs_b[None, :] < G),
            other=0,
        ).to(tl.int32)
        nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_G))
        p0 = nib & 3
        p1 = nib >> 2
        zero = tl.zeros_like(v0)
        # Dense column 4g + j holds v0 if j == p0, v1 if j == p1, else 0.
        w0 = tl.where(p0 == 0, v0, zero)
        w1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        w2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        w3 = tl.where(p1 == 3, v1, zero)
        # join(join(w0, w2), join(w1, w3))[..., a, b] = w_{2a+b}  -> row-major (BN, BK) tile
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        if UPCAST:
            xt = xt.to(tl.float32)
            acc += tl.dot(xt, tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            acc += tl.dot(xt, tl.trans(w), out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def _default_split(n: int, groups: int, sms: int) -> int:
    # Enough programs to cover the SMs about twice; never more splits than 64-group chunks.
    n_blocks = triton.cdiv(n, 64)
    return max(1, min(triton.cdiv(2 * sms, n_blocks), max(1, groups // 64), 32))


def linear_24_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ unpack_24(values, meta)^T (+ bias), in x.dtype. ``path``: auto/decode/prefill."""
    m, k = x.shape
    n = values.shape[0]
    assert values.shape[1] * 2 == k and meta.shape == (n, (k + 7) // 8) and meta.dtype == torch.uint8
    assert values.dtype == x.dtype, "x and values must share a dtype"
    values = values.contiguous()
    meta = meta.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if path == "auto":
        path = "decode" if m <= DECODE_MAX_M else "prefill"
    if path == "decode":
        if m > DECODE_MAX_M:
            raise ValueError(f"the decode kernel handles at most {DECODE_MAX_M} rows, got {m}")
        groups = k // 4
        if split_k is None:
            sms = 132 if x.device.type != "cuda" else torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = 1 if INTERPRET else _default_split(n, groups, sms)
        split_k = max(1, min(int(split_k), max(1, groups)))
        part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), split_k)
        _sp24_decode_kernel[grid](
            x, values, meta, part, m, n, k, split_k,
            x.stride(0), x.stride(1), values.stride(0), meta.stride(0),
            BLOCK_M=next_pow2(m),
        )
        return split_reduce(part, y, bias)
    if path != "prefill":
        raise ValueError(f"path must be auto, decode or prefill, got {path!r}")
    upcast = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)
    _sp24_prefill_kernel[grid](
        x, values, meta, bias if bias is not None else values, y, m, n, k,
        x.stride(0), x.stride(1), values.stride(0), meta.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=dot_precision(),
    )
    return y
