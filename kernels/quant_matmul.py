"""Weight-only quantized linear: y = x @ dequant(W)^T (+ bias), W in the ``quant_format`` layout.

``quant_linear`` takes int8 / int4 (symmetric or asymmetric) and fp8 e4m3 codes; ``quant_linear_24``
takes a 2:4-sparse int8 code matrix in ``pack_24``'s (values, meta) form. Dispatch
(``backend="auto"``, through the custom ops ``torch.ops.squeeze.quant_linear`` / ``quant_linear_24``):
  * CUDA tensors -> Triton (``_quant_triton``): a split-K decode launch for M <= 16 rows (CUDA-core
    multiply-reduce up to 4 rows, tl.dot above), a tiled GEMM with the weight tile dequantized in
    registers above 16 rows. fp32 accumulation; the output is in x's dtype.
  * CPU tensors -> the torch path: dequantize in fp32 (``dequantize_reference``), cast to x's
    dtype, ``F.linear``.

``backend="triton"`` forces the Triton kernels (on CPU only under TRITON_INTERPRET=1, for tests);
``backend="torch"`` runs the torch path on any device.

Expected bound on an H100 (a target from bytes moved; **not measured**, no GPU was available)
---------------------------------------------------------------------------------------------
A decode token (M = 1) through one 4096 x 11008 linear (Llama-7B gate/up; down is 11008 x 4096 and
moves the same bytes) reads the whole weight once, so the time is at least bytes / HBM bandwidth,
3.35 TB/s on H100 SXM (``quant_bytes`` computes the bytes; scales fp32, zeros uint8, per group):

=====================  ================================  ========  ========  =======
weight                 codes + scales (+ zeros)          bytes     >= time   vs bf16
=====================  ================================  ========  ========  =======
bf16                   2 B x 45.09 M                     90.18 MB  26.9 us   1.00x
int8 per-channel       45.09 MB + 44 KB                  45.13 MB  13.5 us   2.00x
int8 g128 symmetric    45.09 MB + 1.41 MB                46.50 MB  13.9 us   1.94x
int8 g128 asymmetric   45.09 MB + 1.41 MB + 0.35 MB      46.85 MB  14.0 us   1.92x
int4 g128 symmetric    22.54 MB + 1.41 MB                23.95 MB  7.15 us   3.76x
int4 g128 asymmetric   22.54 MB + 1.41 MB + 0.35 MB      24.31 MB  7.26 us   3.71x
2:4 + int8 g128        22.54 MB + 5.64 MB meta + 1.41 MB 29.59 MB  8.83 us   3.05x
=====================  ================================  ========  ========  =======

(g128: 352,256 groups; int4 g128 asymmetric is 4.31 bits per weight.) x (8 KB), y (22 KB) and the
split-K partials (2 splits x 11008 x 4 B, written and read back: 176 KB, 0.7% of the int4 bytes)
are small next to the weight. These are targets, not predictions: a well-tuned GEMV reaches
perhaps 70-85% of HBM bandwidth on one layer, and with split-K a second kernel (the fixed-order
reduction) follows; at 7 us per layer its launch gap is not negligible unless CUDA graphs or a
split of 1 (N large enough to fill the SMs alone) remove it. The byte bound holds while the kernel
stays memory-bound: dequantization costs ~4 integer/fp32 operations per weight (nibble
extraction, the exact ``2^23 + u`` trick instead of an int->float conversion, one subtraction, the
FMA), shared by all rows of x, which is why the CUDA-core path stops at 4 rows and tensor cores
take over. For prefill (large M) the GEMM is compute-bound and the quantized weight saves memory,
not time. The 2:4 + int8 kernel decompresses to a dense tile in registers (the dense amount of
multiply work), so its bound is the byte bound above and nothing from 2:4 compute sparsity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import check_triton_device, triton_available, triton_module
from .quant_format import check_quant24_args, check_quant_args, dequantize_24_reference, dequantize_reference

__all__ = ["quant_linear", "quant_linear_24"]

_BACKENDS = ("auto", "triton", "torch")
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_x(x: torch.Tensor) -> None:
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is K)")


def _check_bias(x, weight, bias, n) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")
    if bias is not None and not bias.dtype.is_floating_point:
        raise ValueError(f"bias must be floating point, got {bias.dtype}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, the weight and bias must share a device, got {sorted(map(str, devices))}")


def _check(x, codes, scale, zero, bits, symmetric, group_size, bias) -> str:
    _check_x(x)
    fmt, n, _, _ = check_quant_args(codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size,
                                    K=x.shape[-1])
    _check_bias(x, codes, bias, n)
    return fmt


def _check_24(x, values, meta, scale, group_size, bias) -> None:
    _check_x(x)
    n, _, _ = check_quant24_args(values, meta, scale, group_size=group_size, K=x.shape[-1])
    _check_bias(x, values, bias, n)


def _torch_linear(x, codes, scale, zero, bias, bits, symmetric, group_size):
    w = dequantize_reference(codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size,
                             K=x.shape[-1])
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _triton_linear(x, codes, scale, zero, bias, bits, symmetric, group_size, fmt, **kw):
    mod = triton_module("_quant_triton")
    x2 = x.reshape(-1, x.shape[-1])
    y = mod.quant_linear_triton(
        x2, codes, scale, zero, bias, fmt=fmt, symmetric=symmetric, group_size=group_size, **kw
    )
    return y.reshape(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op(
    "squeeze::quant_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? bias, int bits, bool symmetric, "
    "int group_size) -> Tensor",
)
def _quant_linear_op(x, codes, scale, zero, bias, bits, symmetric, group_size):
    if x.device.type == "cuda" and triton_available():
        fmt = _check(x, codes, scale, zero, bits, symmetric, group_size, bias)
        return _triton_linear(x, codes, scale, zero, bias, bits, symmetric, group_size, fmt)
    return _torch_linear(x, codes, scale, zero, bias, bits, symmetric, group_size)


@_quant_linear_op.register_fake
def _(x, codes, scale, zero, bias, bits, symmetric, group_size):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def quant_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    bits: int,
    symmetric: bool,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(codes, scale, zero)^T (+ bias), in x's dtype.

    codes / scale / zero as in ``quant_format`` (int8 [N, K], packed int4 [N, ceil(K/2)] or fp8 e4m3
    [N, K]; fp32 scale [N, ceil(K/group_size)]; uint8 zero of the same shape when asymmetric).
    backend: "auto" (custom op: Triton on CUDA, the torch path elsewhere), "triton" (force Triton;
    CPU tensors need TRITON_INTERPRET=1), "torch" (dequantize in fp32, cast to x's dtype, F.linear).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    fmt = _check(x, codes, scale, zero, bits, symmetric, group_size, bias)
    if backend == "triton":
        check_triton_device(*(t for t in (x, codes, scale, zero, bias) if t is not None))
        return _triton_linear(x, codes, scale, zero, bias, bits, symmetric, group_size, fmt)
    if backend == "torch":
        return _torch_linear(x, codes, scale, zero, bias, bits, symmetric, group_size)
    return torch.ops.squeeze.quant_linear(x, codes, scale, zero, bias, bits, symmetric, group_size)


# 2:4 + int8 ----------------------------------------------------------------------------------------


def _torch_linear_24(x, values, meta, scale, bias, group_size):
    w = dequantize_24_reference(values, meta, scale, group_size=group_size, K=x.shape[-1])
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _triton_linear_24(x, values, meta, scale, bias, group_size, **kw):
    mod = triton_module("_quant_triton")
    x2 = x.reshape(-1, x.shape[-1])
    y = mod.quant_linear_24_triton(x2, values, meta, scale, bias, group_size=group_size, **kw)
    return y.reshape(*x.shape[:-1], values.shape[0])


@torch.library.custom_op(
    "squeeze::quant_linear_24",
    mutates_args=(),
    schema="(Tensor x, Tensor values, Tensor meta, Tensor scale, Tensor? bias, int group_size) -> Tensor",
)
def _quant_linear_24_op(x, values, meta, scale, bias, group_size):
    if x.device.type == "cuda" and triton_available():
        _check_24(x, values, meta, scale, group_size, bias)
        return _triton_linear_24(x, values, meta, scale, bias, group_size)
    return _torch_linear_24(x, values, meta, scale, bias, group_size)


@_quant_linear_24_op.register_fake
def _(x, values, meta, scale, bias, group_size):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def quant_linear_24(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (unpack_24(values, meta) * scale)^T (+ bias), in x's dtype.

    ``values`` int8 [N, K/2] and ``meta`` uint8 [N, ceil(K/8)] as ``pack_24`` makes them from a
    2:4-sparse int8 code matrix; ``scale`` fp32 [N, ceil(K/group_size)] over the original K columns
    (group_size a multiple of 4, or >= K). Backends as in :func:`quant_linear`. Bytes per weight
    are 0.5 (codes) + 0.125 (meta) + the scales: more than int4 g128 (see the table above), so
    2:4 + int8 pays only where the 2:4 pruning is wanted for accuracy-per-byte or compute reasons.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_24(x, values, meta, scale, group_size, bias)
    if backend == "triton":
        check_triton_device(*(t for t in (x, values, meta, scale, bias) if t is not None))
        return _triton_linear_24(x, values, meta, scale, bias, group_size)
    if backend == "torch":
        return _torch_linear_24(x, values, meta, scale, bias, group_size)
    return torch.ops.squeeze.quant_linear_24(x, values, meta, scale, bias, group_size)
