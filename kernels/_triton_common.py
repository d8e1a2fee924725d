"""Triton pieces shared by the kernels: config selection, fp32 dot precision, split reduction.

Imports triton: import this module lazily (see ``_triton_utils.triton_module``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Decided once, when the kernels are decorated: the interpreter cannot benchmark more than one
# autotune config ("0 active drivers"), and interpreted programs are slow, so it gets one config
# with large blocks (few programs); GPUs get a Hopper-oriented search space.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pick_configs(gpu: list, interpreter) -> list:
    """Autotune configs: exactly one under the interpreter, the GPU list otherwise."""
    return [interpreter] if INTERPRET else gpu


def dot_precision() -> str:
    """fp32 tl.dot precision that mirrors torch: TF32 only where torch allows it for matmuls."""
    if INTERPRET:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # (S, M, N) fp32 partial sums, contiguous
    bias_ptr,  # (N,) or dummy
    out_ptr,  # (M, N) output, row stride stride_om
    S,
    M,
    N,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Deterministic second stage of split-K: a fixed summation order over splits (no atomics), plus
    # the bias and the cast to the output dtype, fused.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    row = offs // N
    tl.store(out_ptr + row * stride_om + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_reduce(part: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] = sum_s part[s] (+ bias), fixed order. ``part`` is (S, M, N) fp32 contiguous."""
    s, m, n = part.shape
    assert out.shape == (m, n) and out.stride(1) == 1
    block = 4096 if INTERPRET else 1024
    grid = (triton.cdiv(m * n, block),)
    _split_reduce_kernel[grid](
        part, bias if bias is not None else part, out, s, m, n, out.stride(0),
        HAS_BIAS=bias is not None, BLOCK=block,
    )
    return out
