"""Quantized linears at run time: the packed codes of a ``compressed`` export run through a
weight-only kernel instead of a dequantized dense weight.

- CPU: for int8 our own kernel in any activation dtype (:mod:`squeeze.kernels.cpu_native`,
  compiled on first use; torch's op runs fp32 / fp16 through a scalar loop, 5-10x slower than
  dense, and bf16 slower than ours), else torch's op in bf16; torch's int4 op in bf16
  (:mod:`squeeze.kernels.quant_cpu`). Only from 512 x
  512 weights on (a small weight decodes faster dense), and only for layouts they hold (int8:
  symmetric per row; int4: groups of 32k).
  ``squeeze.load(..., quant_kernels=True)`` takes the kernels wherever they run.
- CUDA: the Triton dequantizing GEMM (:func:`squeeze.kernels.quant_linear`), and for 2:4 values
  stored as symmetric int8 codes the 2:4 + int8 kernel (:func:`squeeze.kernels.quant_linear_24`,
  which reads the values, the 2-bit positions and the scales as stored).

A run-time installed on the linear before (a TEAL / WINA site's mask; dReLU's ReLU hook) moves
onto the quantized module (:func:`squeeze.runtime.swap.replace_linear`). On CPU a site's consumer
also gets an input-sparse path over its codes by input row (int8 and int4:
``squeeze.kernels.int8_rows_linear_cpu`` / ``int4_rows_linear_cpu``), which the load-time plan
keeps where it beats the weight-only op.

Everything else keeps the exact dense weight the loader decoded. A kernel computes the same
product in another order (and the CPU ops round scales to bf16), so its outputs match the dense
path within the tolerance of the activation dtype, not bit for bit; ``squeeze.load(...,
quant_kernels=False)`` keeps the exact path.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantLinear(nn.Module):
    """A linear whose weight is quantized codes run by ``fn(x, prepared, bias)``. ``rows``: the
    input-sparse path of an activation-sparse consumer on CPU, ``(rows_fn, rows_prepared)`` over
    the codes by input row (:func:`forward_rows`), or None."""

    def __init__(self, fn, prepared, bias: torch.Tensor | None, in_features: int, out_features: int, label: str,
                 dtype: torch.dtype = torch.bfloat16, rows: tuple | None = None):
        super().__init__()
        self.fn, self.prepared, self.label, self.rows = fn, prepared, label, rows
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # of the activations it takes (the dense weight's it replaced)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.prepared, self.bias)

    def forward_rows(self, x: torch.Tensor, entries: tuple | None = None) -> torch.Tensor:
        """x [T, K] with zeros in it, through the codes of its non-zero inputs only (``entries``:
        :func:`squeeze.kernels.nonzero_entries` of x, if known)."""
        fn, prepared = self.rows
        return fn(x, prepared, self.bias, entries)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.label}"


def _cuda_fn(spec, entry, get, k, backend, sited: bool = False):
    from squeeze.kernels import quant_linear, quant_linear_24

    scale = get(entry["scale"])
    if "meta" in entry:  # 2:4 values as codes: only symmetric int8 has a kernel
        if spec.format != "int" or spec.bits != 8 or not spec.symmetric:
            return None, None, None
        values, meta = get(entry["values"]), get(entry["meta"])

        def run_24(x, _prepared, bias):
            return quant_linear_24(x, values, meta, scale, group_size=spec.group_width(k), bias=bias, backend=backend)

        return run_24, None, None
    codes = get(entry["qweight"])
    zero = get(entry["zero"]) if "zero" in entry else None

    def run(x, _prepared, bias):
        return quant_linear(x, codes, scale, zero, bits=spec.bits, symmetric=spec.symmetric,
                            group_size=spec.group_width(k), bias=bias, backend=backend)

    return run, None, None


def _cpu_fn(spec, entry, get, k, backend, sited: bool = False):
    """(fn, prepared, rows) of a CPU weight-only op; ``rows`` (the input-sparse path over the
    codes by input row) only for a linear an activation-sparse site feeds (``sited``)."""
    from squeeze import kernels as K

    if spec.format != "int" or "qweight" not in entry:  # codes inside a sparse layout stay decoded
        return None, None, None
    codes, scale = get(entry["qweight"]), get(entry["scale"])
    if spec.bits == 8:
        fn, prepared = K.int8_linear_cpu, K.prepare_int8_cpu(codes, scale)
        rows_fn = K.int8_rows_linear_cpu
        rows = K.prepare_int8_rows_cpu(prepared) if sited and prepared is not None else None
    else:
        zero = get(entry["zero"]) if "zero" in entry else None
        u = K.unpack_int4(codes, k)
        fn, prepared = K.int4_linear_cpu, K.prepare_int4_cpu(u, scale, zero, spec.group_size)
        rows_fn = K.int4_rows_linear_cpu
        rows = K.prepare_int4_rows_cpu(u, prepared) if sited and prepared is not None else None
    return fn, prepared, None if rows is None else (rows_fn, rows)  # None also: torch without the bags


def install(model: nn.Module, ckpt, packed: dict, device: str, backend: str = "auto", force: bool = False) -> int:
    """Swap every quantized linear of ``packed`` whose layout a kernel on ``device`` runs for a
    :class:`QuantLinear`; on CPU only where it pays (:func:`squeeze.kernels.quant_cpu_kernel_pays`:
    the weight's size and the activation dtype), or wherever a kernel runs with ``force``. Returns
    how many were swapped. ``backend="triton"`` takes the CUDA kernels on any device (on CPU under
    TRITON_INTERPRET=1, for tests)."""
    from squeeze.formats import packed_modules, spec_of
    from squeeze.kernels import quant_cpu_kernel_pays
    from squeeze.runtime.swap import replace_linear

    triton = torch.device(device).type == "cuda" or backend == "triton"
    swapped = 0
    for name, entry in packed_modules(model, packed).items():
        module = model.get_submodule(name)
        # codes of a bitmask layout never have a kernel: they stay decoded
        if not isinstance(module, nn.Linear) or "quant" not in entry or "mask" in entry:
            continue
        spec, (n, k) = spec_of(entry), entry["shape"]
        if not (triton or force or quant_cpu_kernel_pays(spec.bits, n, k, module.weight.dtype)):
            continue

        def get(key):
            return ckpt.get(key).to(device)

        sited = "_squeeze_sparsifier" in module.__dict__  # installed before: runtime.swap carries it over
        fn, prepared, rows = (_cuda_fn if triton else _cpu_fn)(spec, entry, get, k, backend, sited)
        if fn is None or (not triton and prepared is None):
            continue
        replace_linear(model, name, QuantLinear(fn, prepared, module.bias, k, n,
                                                spec.name + (" 2:4" if "meta" in entry else ""), module.weight.dtype,
                                                rows))
        swapped += 1
    return swapped
