"""Run-time 2:4 linear over the compressed (values, meta) layout, for squeeze.load on GPUs."""

from __future__ import annotations

import torch
from torch import nn


class Sparse24Linear(nn.Module):
    """y = x @ W^T + b with W stored as 2:4 values [N, K/2] and meta [N, ceil(K/8)] (uint8).

    CUDA: the Triton kernels of ``squeeze.kernels.linear_24``; CPU: decompress once and cache (exactly
    the dense layer's output)."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, in_features: int):
        super().__init__()
        from squeeze.kernels import DenseWeightCache

        self.in_features, self.out_features = in_features, values.shape[0]
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cache = DenseWeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., K)
        from squeeze.kernels import linear_24

        x2 = x.to(self.values.dtype)
        return linear_24(x2, self.values, self.meta, self.bias, cache=self._cache if x.device.type == "cpu" else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 compressed"
