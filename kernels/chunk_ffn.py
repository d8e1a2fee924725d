"""Activation-sparse FFN for a chunk of 1-64 tokens: public entry points, custom ops, dispatch.

Two entry points:

* :func:`chunk_sparse_ffn` — predictor-free: the active neurons come from the gate itself (relu
  kinds: gate > 0; or a TEAL/CATS-style threshold), so the gate GEMV runs for every neuron and
  only up / down are restricted to the union of active neurons over the chunk (BlockFFN's
  chunk-level sparsity).
* :func:`sparse_ffn_from_indices` — the active set is given (a router / predictor as in Deja Vu
  or BlockFFN, or a TEAL input threshold upstream): gate, up and down all touch only those rows.

Weights: ``w_gate``, ``w_up`` [I, H] as two tensors (the checkpoint layout; no repacking, and the
predictor-free path reads gate for all neurons before it knows which up rows it needs, so an
interleaved [I, 2, H] layout would not save a pass), down stored transposed ``w_downT`` [I, H].

Dispatch (backend="auto", through the custom ops ``torch.ops.squeeze.chunk_sparse_ffn`` /
``torch.ops.squeeze.sparse_ffn_from_indices``): CUDA -> Triton kernels (_chunk_ffn_triton; chunks
over 64 tokens fall back to the torch reference); CPU -> the CPU fast path (cpu_ffn), which runs
the dense FFN above its measured break-even. backend="triton" forces Triton (CPU tensors need
TRITON_INTERPRET=1), "torch" the reference, "cpu" the CPU path.
"""

from __future__ import annotations

import torch

from ._triton_utils import check_backend, check_triton_device, triton_available, triton_module
from .cpu_ffn import chunk_sparse_ffn_cpu, sparse_ffn_cpu
from .ffn_reference import check_act, chunk_sparse_ffn_reference, sparse_ffn_reference

__all__ = ["chunk_sparse_ffn", "sparse_ffn_from_indices"]

MAX_TRITON_TOKENS = 64


def _check_ffn_args(x, w_gate, w_up, w_downT):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    h = x.shape[1]
    i = w_gate.shape[0]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_downT", w_downT)):
        if w.dim() != 2 or tuple(w.shape) != (i, h):
            raise ValueError(f"{name} must be [I, H] = {(i, h)}, got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise ValueError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}")


def _threshold_tensor(threshold) -> torch.Tensor | None:
    # Python floats become a CPU 0-d tensor (the op schema takes Tensor?); tensors pass through
    # untouched, so a device-resident threshold is never read on the host.
    if threshold is None or torch.is_tensor(threshold):
        return None if threshold is None else threshold.reshape(())
    return torch.tensor(float(threshold), dtype=torch.float32)


def _use_triton(x) -> bool:
    return x.device.type == "cuda" and triton_available() and x.shape[0] <= MAX_TRITON_TOKENS


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(
    "squeeze::chunk_sparse_ffn",
    mutates_args=(),
    schema="(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_downT, str act, Tensor? threshold, "
    "str threshold_on) -> Tensor",
)
def _chunk_sparse_ffn_op(x, w_gate, w_up, w_downT, act, threshold, threshold_on):
    if _use_triton(x):
        mod = triton_module("_chunk_ffn_triton")
        return mod.chunk_sparse_ffn_triton(x, w_gate, w_up, w_downT, act, threshold, threshold_on)
    if x.device.type == "cpu":
        return chunk_sparse_ffn_cpu(x, w_gate, w_up, w_downT, act, threshold, threshold_on)
    return chunk_sparse_ffn_reference(x, w_gate, w_up, w_downT, act, threshold, threshold_on)


@_chunk_sparse_ffn_op.register_fake
def _(x, w_gate, w_up, w_downT, act, threshold, threshold_on):
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "squeeze::sparse_ffn_from_indices",
    mutates_args=(),
    schema="(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_downT, Tensor indices, Tensor? count, str act) -> Tensor",
)
def _sparse_ffn_from_indices_op(x, w_gate, w_up, w_downT, indices, count, act):
    if _use_triton(x):
        mod = triton_module("_chunk_ffn_triton")
        return mod.sparse_ffn_from_indices_triton(x, w_gate, w_up, w_downT, indices, count, act)
    if x.device.type == "cpu":
        return sparse_ffn_cpu(x, w_gate, w_up, w_downT, indices, act, count)
    return sparse_ffn_reference(x, w_gate, w_up, w_downT, indices, act, count)


@_sparse_ffn_from_indices_op.register_fake
def _(x, w_gate, w_up, w_downT, indices, count, act):
    return x.new_empty(x.shape)


# ------------------------------------------------------------------------------------ public API


def chunk_sparse_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_downT: torch.Tensor,
    act: str,
    threshold: float | torch.Tensor | None = None,
    *,
    threshold_on: str = "h",
    backend: str = "auto",
) -> torch.Tensor:
    """Chunk-level sparse FFN, y [T, H] for x [T, H] (T tokens of one chunk, 1-64 on the GPU path).

    act: "swiglu" | "relu" | "drelu". threshold: None (relu kinds: active iff gate > 0; swiglu:
    every neuron) or t >= 0 with threshold_on "h" (|act(gate) * up'| > t, TEAL/WINA-style; needs
    up for every neuron) or "gate" (|act(gate)| > t, CATS-style). A neuron active for any token of
    the chunk is computed for all of them. See ``ffn_reference`` for the exact rules.
    The threshold may be a one-element tensor (e.g. a module buffer): on the GPU path the kernel
    reads it from device memory, so it costs no host sync.
    """
    check_backend(backend)
    check_act(act, threshold, threshold_on)
    _check_ffn_args(x, w_gate, w_up, w_downT)
    thr = _threshold_tensor(threshold)
    if backend == "torch":
        return chunk_sparse_ffn_reference(x, w_gate, w_up, w_downT, act, thr, threshold_on)
    if backend == "triton":
        check_triton_device(x, w_gate, w_up, w_downT)
        return triton_module("_chunk_ffn_triton").chunk_sparse_ffn_triton(
            x, w_gate, w_up, w_downT, act, thr, threshold_on)
    if backend == "cpu":
        return chunk_sparse_ffn_cpu(x, w_gate, w_up, w_downT, act, thr, threshold_on)
    return torch.ops.squeeze.chunk_sparse_ffn(x, w_gate, w_up, w_downT, act, thr, threshold_on)


def sparse_ffn_from_indices(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_downT: torch.Tensor,
    indices: torch.Tensor,
    act: str,
    count: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """FFN over the given neurons only: y [T, H] = act(x Wg[idx]^T) * up'(x Wu[idx]^T) @ WdT[idx].

    indices: int tensor of neuron ids (no duplicates; any order). count: optional int tensor [1]
    on the same device — only ``indices[:count]`` are used (device-side count, no host sync, e.g.
    from a router kernel; the GPU grid is sized for len(indices)).
    """
    check_backend(backend)
    check_act(act)
    _check_ffn_args(x, w_gate, w_up, w_downT)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype} (for a mask use mask.nonzero())")
    if backend == "torch":
        return sparse_ffn_reference(x, w_gate, w_up, w_downT, indices, act, count)
    if backend == "triton":
        check_triton_device(x, w_gate, w_up, w_downT)
        return triton_module("_chunk_ffn_triton").sparse_ffn_from_indices_triton(
            x, w_gate, w_up, w_downT, indices, count, act)
    if backend == "cpu":
        return sparse_ffn_cpu(x, w_gate, w_up, w_downT, indices, act, count)
    return torch.ops.squeeze.sparse_ffn_from_indices(x, w_gate, w_up, w_downT, indices, count, act)
