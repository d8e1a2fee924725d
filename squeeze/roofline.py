"""The physical bound of batch-1 decoding: bytes read per token ÷ memory bandwidth.

Decoding one token at batch 1 multiplies a single activation row by every weight the model runs:
the weights stream from memory once per token and are used once, so no kernel can decode faster
than ``bandwidth / bytes_per_token`` tokens/s. ``squeeze bench`` prints this bound beside each
measured speed, so the gap between a run-time and what its format allows is visible.

:func:`decode_bytes` counts, from a loaded model (after :func:`squeeze.load` installed its
run-times), the bytes one decode step must read: every weight at the size the installed module
holds it in, activation-sparse consumers only their kept share, one embedding row, the whole LM
head, and the KV cache at a given context. :func:`read_bandwidth` measures the memory's read
bandwidth on this machine with the threads in use.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

PARTS = ("embedding", "layers", "lm_head", "kv_cache")


def decode_bytes(model: nn.Module, context: int = 0) -> dict:
    """Bytes one batch-1 decode step of ``model`` reads, by part, and their ``total``.

    - ``embedding``: one row of each ``nn.Embedding`` (token, and learned positions where a model
      has them).
    - ``lm_head``: the output projection, in full (every vocabulary logit is computed).
    - ``layers``: every other parameter (decoder linears, norms, biases) at numel × itemsize, with
      the installed run-times at their own sizes: a quantized linear (``QuantLinear``) its codes as
      the kernel holds them (int8: 1 B per weight, int4: 0.5 B; K padded as the op needs) plus its
      scales (and zero terms) in the activation dtype, the copy the op reads; a 2:4 linear
      (``Sparse24Linear``) its values and 2-bit positions; an activation sparsifier's buffers (WINA's
      column scale and rotation) in the activation dtype. A consumer linear of an activation-sparse
      site reads only the weight rows of the inputs it keeps: its weight bytes × the site's kept
      fraction (1 − sparsity; ``mode zero`` sites, whose sparsity only the data knows, count in
      full). That is the bound of the format, whether or not this machine's load-time plan chose
      the sparse kernel for the shape (the path decisions are in the bench's run-time lines).
    - ``kv_cache``: keys and values of every layer over ``context`` positions in the activation
      dtype (``layers × 2 × kv_heads × head_dim × context × itemsize``).

    Linears the CPU loader decoded to dense weights (2:4 exports whose plan kept the dense path,
    quantized layouts no CPU kernel runs) count as the dense weights they now are.
    """
    from squeeze.runtime.act_sparse import ActSparsifier, consumers
    from squeeze.runtime.quant import QuantLinear
    from squeeze.runtime.sparse24 import Sparse24Linear

    act = _act_dtype(model)
    kept = {}
    for m in consumers(model).values():
        active = m.__dict__["_squeeze_sparsifier"].expected_active()
        kept[id(m)] = 1.0 if active is None else float(active)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts = dict.fromkeys(PARTS, 0)
    for m in model.modules():
        bias = _nbytes(m._parameters.get("bias"))
        if isinstance(m, nn.Embedding):
            weight = m.weight.shape[-1] * m.weight.element_size()  # one row
        elif isinstance(m, QuantLinear):
            weight = _quant_bytes(m, act)
        elif isinstance(m, ActSparsifier):  # its decode reads the copies cast to the activation dtype
            weight = sum(b.numel() for b in m.buffers(recurse=False) if b.dim() > 0) * act.itemsize
        elif isinstance(m, Sparse24Linear):  # its weight is the values and meta buffers
            weight = _nbytes(m.values) + _nbytes(m.meta)
        else:  # the module's own parameters: linears, norms
            weight = sum(_nbytes(p) for k, p in m._parameters.items() if k != "bias")
        if id(m) in kept:
            weight = weight * kept[id(m)]
        parts["lm_head" if m is head else "embedding" if isinstance(m, nn.Embedding) else "layers"] += weight + bias
    parts["kv_cache"] = kv_cache_bytes(model, context, act)
    out = {k: int(round(v)) for k, v in parts.items()}
    out["total"] = sum(out[k] for k in PARTS)
    out["context"] = int(context)
    out["act_sparse_consumers"] = len(kept)
    return out


def kv_cache_bytes(model: nn.Module, context: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of the keys and values one decode step attends over at ``context`` positions."""
    if context <= 0:
        return 0
    cfg = getattr(model, "config", None)
    if cfg is None:
        return 0
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    itemsize = (dtype or _act_dtype(model)).itemsize
    return int(layers * 2 * kv_heads * head_dim * context * itemsize)


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _act_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: the model's floating dtype (its first floating parameter)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _quant_bytes(m: nn.Module, act: torch.dtype) -> int:
    """A QuantLinear's weight as its kernel reads it. CPU kernels keep their tensors in
    ``prepared`` (int8: codes [N, Kp] + a per-row scale; int4: torch's packed nibbles + scales and
    zero terms [Kp/g, Np, 2]), and the ops read the scales cast to the activation dtype. The CUDA
    kernels have no ``prepared``: their codes, scales, zeros (or 2:4 values and meta) are the
    tensors the kernel closure holds, counted at their stored size."""
    p = m.prepared
    if p is None:
        cells = getattr(m.fn, "__closure__", None) or ()
        return sum(_nbytes(c.cell_contents) for c in cells if isinstance(c.cell_contents, torch.Tensor))
    if hasattr(p, "codes"):  # Int8CPUWeight
        return _nbytes(p.codes) + p.scale.numel() * act.itemsize
    return _nbytes(p.packed) + p.scales_and_zeros.numel() * act.itemsize  # Int4CPUWeight


# -- memory bandwidth ----------------------------------------------------------------------------
BANDWIDTH_BYTES = 1 << 30  # at least this large, and at least 4x the last-level cache
BANDWIDTH_REPEATS = 5


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), 0 when it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        except (ValueError, OSError):
            continue
    return max(sizes, default=0)


def bandwidth_bytes(device: str = "cpu") -> int:
    """The tensor size :func:`read_bandwidth` streams: :data:`BANDWIDTH_BYTES`, or on a CPU 4x its
    last-level cache when that is larger, so the sum reads memory, not cache (a GPU's L2 is far
    below 1 GiB); on a CPU never more than half the memory available now (a large-cache server
    with little free memory measures a smaller tensor rather than swapping or being killed)."""
    if device != "cpu":
        return BANDWIDTH_BYTES
    want = max(BANDWIDTH_BYTES, 4 * last_level_cache_bytes())
    avail = _mem_available()
    return min(want, avail // 2) if avail else want


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes, 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_bandwidth(nbytes: int | None = None, repeats: int = BANDWIDTH_REPEATS, device: str = "cpu") -> dict:
    """Read bandwidth of this machine's memory with torch's current thread count: ``x.sum()``
    over an fp32 tensor of ``nbytes`` (default :func:`bandwidth_bytes`), bytes ÷ the best of
    ``repeats`` timings (the least disturbed by other jobs). A sum reads every byte once and writes
    nothing, as a decode step streams its weights, without a copy's write traffic."""
    n = max(int(nbytes or bandwidth_bytes(device)) // 4, 1)
    x = torch.ones(n, dtype=torch.float32, device=device)  # written once: every page is mapped before timing
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    x.sum()  # warm-up: thread pool start, first-call dispatch
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    del x
    return {"bytes_per_s": n * 4 / best, "bytes": n * 4, "repeats": repeats, "best_s": best,
            "threads": torch.get_num_threads(), "device": device,
            "how": f"x.sum() over {n * 4 / 2**30:.2f} GiB fp32, best of {repeats}"}
