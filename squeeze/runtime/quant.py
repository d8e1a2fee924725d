"""Quantized linears at run time: the packed codes of a ``compressed`` export run through a
weight-only kernel instead of a dequantized dense weight.

- CPU: torch's own int8 / int4 kernels (:mod:`squeeze.kernels.quant_cpu`), only for activation
  dtypes where they beat dense ``F.linear`` on this kind of CPU (bf16; in fp32 they are 5-10x
  slower) and only for layouts they hold (int8: symmetric per row; int4: groups of 32k).
- CUDA: the Triton dequantizing GEMM (:func:`squeeze.kernels.quant_linear`).

Everything else keeps the exact dense weight the loader decoded. A kernel computes the same
product in another order (and the CPU ops round scales to bf16), so its outputs match the dense
path within the tolerance of the activation dtype, not bit for bit; ``squeeze.load(...,
quant_kernels=False)`` keeps the exact path.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantLinear(nn.Module):
    """A linear whose weight is quantized codes run by ``fn(x, prepared, bias)``."""

    def __init__(self, fn, prepared, bias: torch.Tensor | None, in_features: int, out_features: int, label: str):
        super().__init__()
        self.fn, self.prepared, self.label = fn, prepared, label
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.prepared, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.label}"


def _cuda_fn(spec, codes, scale, zero, k):
    from squeeze.kernels import quant_linear

    def run(x, _prepared, bias):
        return quant_linear(x, codes, scale, zero, bits=spec.bits, symmetric=spec.symmetric,
                            group_size=spec.group_width(k), bias=bias)

    return run, None


def _cpu_fn(spec, codes, scale, zero, k):
    from squeeze.kernels import int4_linear_cpu, int8_linear_cpu, prepare_int4_cpu, prepare_int8_cpu, unpack_int4

    if spec.format != "int":
        return None, None
    if spec.bits == 8:
        return int8_linear_cpu, prepare_int8_cpu(codes, scale)
    return int4_linear_cpu, prepare_int4_cpu(unpack_int4(codes, k), scale, zero, spec.group_size)


def install(model: nn.Module, ckpt, packed: dict, device: str) -> int:
    """Swap every quantized (not sparse) linear of ``packed`` whose layout a kernel on ``device``
    runs for a :class:`QuantLinear`. Returns how many were swapped."""
    from squeeze.formats import packed_modules, spec_of
    from squeeze.kernels import QUANT_CPU_FAST_DTYPES

    cuda = torch.device(device).type == "cuda"
    swapped = 0
    for name, entry in packed_modules(model, packed).items():
        module = model.get_submodule(name)
        # codes of a whole weight only: codes inside a sparse layout (2:4 values, bitmask) stay decoded
        if not isinstance(module, nn.Linear) or "qweight" not in entry:
            continue
        if not cuda and module.weight.dtype not in QUANT_CPU_FAST_DTYPES:
            continue
        spec, (n, k) = spec_of(entry), entry["shape"]
        codes, scale = ckpt.get(entry["qweight"]), ckpt.get(entry["scale"])
        zero = ckpt.get(entry["zero"]) if "zero" in entry else None
        if cuda:
            codes, scale = codes.to(device), scale.to(device)
            zero = None if zero is None else zero.to(device)
        fn, prepared = (_cuda_fn if cuda else _cpu_fn)(spec, codes, scale, zero, k)
        if fn is None or (not cuda and prepared is None):
            continue
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf,
                QuantLinear(fn, prepared, module.bias, k, n, spec.name))
        swapped += 1
    return swapped
