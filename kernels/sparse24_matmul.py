"""2:4 linear: y = x @ W24^T (+ bias) from our compressed (values, meta) format.

Dispatch (``linear_24(..., backend="auto")``):
  * CUDA tensors -> Triton (``_sparse24_triton``): decode kernel for <= 8 rows, decompress-in-registers
    GEMM above that.
  * CPU tensors -> decompress + ``F.linear``. On CPU exactness matters more than speed: the result is
    bitwise what ``F.linear(x, unpack_24(values, meta), bias)`` returns. Pass a
    :class:`DenseWeightCache` to keep the dense weight between calls (memory for speed).

``backend="triton"`` forces the Triton kernels (on CPU only under TRITON_INTERPRET=1, for tests);
``backend="torch"`` runs the plain reference. The custom op ``torch.ops.squeeze.linear_24`` (with a
fake implementation) lets ``torch.compile`` trace through the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import check_backend, check_triton_device, triton_available, triton_module
from .sparse24_format import unpack_24

__all__ = ["DenseWeightCache", "linear_24", "linear_24_reference"]


def linear_24_reference(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: decompress, then F.linear. x [..., K] -> [..., N]."""
    return F.linear(x, unpack_24(values, meta, x.shape[-1]), bias)


class DenseWeightCache:
    """Keeps ``unpack_24(values, meta)`` for one layer between calls on the CPU path.

    Rebuilt when the (values, meta) tensors change: other storage, or an in-place edit (the tensors'
    version counters). Holds one dense weight: make one cache per layer. ``transposed=True`` keeps
    it as a contiguous [K, N] instead (the layout GPT-2's Conv1D multiplies with, so a caller can
    run the very same GEMM as the dense layer).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._dense: torch.Tensor | None = None

    def get(self, values: torch.Tensor, meta: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        key = (
            values.data_ptr(), meta.data_ptr(), values._version, meta._version,
            tuple(values.shape), values.dtype, values.device, transposed,
        )
        if key != self._key or self._dense is None:
            w = unpack_24(values, meta)
            self._dense = w.t().contiguous() if transposed else w
            self._key = key
        return self._dense

    def clear(self) -> None:
        self._key = self._dense = None


def _check_args(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> None:
    k = x.shape[-1]
    if values.dim() != 2 or values.shape[1] * 2 != k:
        raise ValueError(f"values must be [N, K/2] with K={k} (x's last dim), got {tuple(values.shape)}")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (values.shape[0], (k + 7) // 8):
        raise ValueError(f"meta must be uint8 [N, ceil(K/8)] = {(values.shape[0], (k + 7) // 8)}, got "
                         f"{meta.dtype} {tuple(meta.shape)}")
    if values.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and values ({values.dtype}) must share a dtype")
    if bias is not None and tuple(bias.shape) != (values.shape[0],):
        raise ValueError(f"bias must be [N] = [{values.shape[0]}], got {tuple(bias.shape)}")


def _triton_linear_24(x, values, meta, bias, **kw):
    mod = triton_module("_sparse24_triton")
    x2 = x.reshape(-1, x.shape[-1])
    y = mod.linear_24_triton(x2, values, meta, bias, **kw)
    return y.reshape(*x.shape[:-1], values.shape[0])


@torch.library.custom_op(
    "squeeze::linear_24", mutates_args=(), schema="(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor"
)
def _linear_24_op(x, values, meta, bias):
    if x.device.type == "cuda" and triton_available():
        return _triton_linear_24(x, values, meta, bias)
    return linear_24_reference(x, values, meta, bias)


@_linear_24_op.register_fake
def _(x, values, meta, bias):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def linear_24(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    cache: DenseWeightCache | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ unpack_24(values, meta)^T (+ bias), in x.dtype.

    backend: "auto" (custom op: Triton on CUDA, decompress + F.linear on CPU), "triton" (force the
    Triton kernels; CPU needs TRITON_INTERPRET=1), "torch" (reference), "cpu" (decompress +
    F.linear, using ``cache`` if given). With ``cache`` and backend "auto" on CPU the cached dense
    weight is used (the custom op is bypassed; the result is the same).
    """
    check_backend(backend)
    _check_args(x, values, meta, bias)
    if backend == "triton":
        check_triton_device(x, values, meta)
        return _triton_linear_24(x, values, meta, bias)
    if backend == "torch":
        return linear_24_reference(x, values, meta, bias)
    if backend == "cpu" or (cache is not None and x.device.type == "cpu"):
        w = cache.get(values, meta) if cache is not None else unpack_24(values, meta)
        return F.linear(x, w, bias)
    return torch.ops.squeeze.linear_24(x, values, meta, bias)
