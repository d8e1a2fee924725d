"""Run-time 2:4 linear over the compressed (values, meta) layout, for squeeze.load on GPUs."""

from __future__ import annotations

import torch
from torch import nn


class Sparse24Linear(nn.Module):
    """y = x @ W^T + b with W stored as 2:4 values [N, K/2] and meta [N, ceil(K/8)] (uint8).

    CUDA: the Triton kernels of ``squeeze.kernels.linear_24``. CPU: decompress once and cache, then
    run the GEMM the dense layer runs, in its layout, so the output is exactly the dense layer's:
    ``F.linear(x, W)`` for ``nn.Linear``; for a GPT-2 ``Conv1D`` (``transposed=True``, weight stored
    [K, N]) ``addmm(b, x, W^T)`` on a contiguous [K, N] copy, as Conv1D computes it."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 transposed: bool = False):
        super().__init__()
        from squeeze.kernels import DenseWeightCache

        self.in_features, self.out_features = in_features, values.shape[0]
        self.transposed = transposed
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cache = DenseWeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., K)
        from squeeze.kernels import linear_24

        x2 = x.to(self.values.dtype)
        if x.device.type != "cpu":
            return linear_24(x2, self.values, self.meta, self.bias)
        if not self.transposed:
            return linear_24(x2, self.values, self.meta, self.bias, cache=self._cache)
        w_kn = self._cache.get(self.values, self.meta, transposed=True)  # (K, N) contiguous
        flat = x2.reshape(-1, self.in_features)
        y = flat @ w_kn if self.bias is None else torch.addmm(self.bias, flat, w_kn)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = ", Conv1D layout" if self.transposed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 compressed{layout}"
