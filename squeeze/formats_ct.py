"""The compressed-tensors layout (PyPI ``compressed-tensors`` 0.20, the format llm-compressor writes
and vLLM / SGLang serve), written and read by our own code: writing needs no compressed-tensors,
and :class:`CompressedTensorsView` lets ``squeeze.load`` decode the weight-only subset without it.

One quantized linear with checkpoint stem ``S`` (its weight key without ``.weight``), W [N, K]:

==============  ==========================================================================================
int4 / int8     ``S.weight_packed`` int32 [N, ceil(K * b / 32)]: the unsigned codes u = q + 2^(b-1) of a row,
(pack-          32 / b per word, element j in bits (j % (32/b)) * b and up of word j // (32/b), low bits
quantized)      first; ``S.weight_shape`` int64 [N, K]; ``S.weight_scale`` [N, G] (channel: [N, 1]);
                asymmetric: ``S.weight_zero_point`` int32, the unsigned zero points zp + 2^(b-1) [N, G]
                packed the same way along N (dim 0). w = (q - zp) · s
fp8 e4m3        ``S.weight`` float8_e4m3fn [N, K] and ``S.weight_scale``. w = q · s
(naive-quant.)
==============  ==========================================================================================

Squeeze's own codes (:mod:`squeeze.algorithms.quant`) map onto this without arithmetic on the
values: an int4 nibble and an asymmetric code already are u (q + 2^(b-1)), an asymmetric zero point
already is zp + 2^(b-1), and a symmetric int8 code q becomes u = q + 128. Both use the full
two's-complement grid, so the same codes and scales give the same weights. Scales are stored in
fp32, as squeeze computed them (llm-compressor stores them in the model dtype).

The group size must divide K (compressed-tensors refuses a partial last group), weights must be
``nn.Linear`` (it cannot quantize GPT-2's ``Conv1D``), and sparsity is recorded only as metadata
(``sparsity_config`` with format ``dense``): the zeros are stored in the dense codes or weights, so
2:4 + int4 takes K/2 bytes a row here against 3K/8 in squeeze's compact layout. (vLLM serves int4/int8
per channel or group, and fp8 per channel only; transformers loads fp8 groups too.)
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from squeeze.errors import SqueezeError

FORMAT = "compressed-tensors"
VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes (and that loads it in tests)
INT_FORMAT, FP8_FORMAT = "pack-quantized", "naive-quantized"  # what compressed-tensors infers for weight-only
_READS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized", "dense")


# ---------------------------------------------------------------------------------------------
# int32 packing


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """u [R, C] unsigned codes in [0, 2^bits) -> int32 [R, ceil(C * bits / 32)] (layout above; the pad
    of a partial last word is 0)."""
    if bits not in (4, 8):
        raise SqueezeError(f"compressed-tensors packing is written for 4 and 8 bits here, got {bits}")
    rows, cols = u.shape
    per = 32 // bits
    b = torch.nn.functional.pad(u.to(torch.uint8), (0, -cols % per))
    if bits == 4:  # two nibbles a byte, the even element low: four such bytes make a little-endian word
        b = b[:, 0::2] | (b[:, 1::2] << 4)
    b = b.contiguous().view(rows, -1, 4)
    if sys.byteorder == "big":  # a word's low byte comes first in the file
        b = b.flip(-1)
    return b.contiguous().view(torch.int32).view(rows, -1)


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: uint8 [R, cols]."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise SqueezeError(f"packed compressed-tensors codes must be 2-D int32, got {words.dtype} {tuple(words.shape)}")
    rows = words.shape[0]
    b = words.contiguous().view(torch.uint8).view(rows, -1, 4)
    if sys.byteorder == "big":
        b = b.flip(-1)
    b = b.reshape(rows, -1)
    if bits == 4:
        b = torch.stack([b & 0xF, b >> 4], dim=-1).view(rows, -1)
    if b.shape[1] < cols:
        raise SqueezeError(f"packed codes hold {b.shape[1]} columns, weight_shape says {cols}")
    return b[:, :cols]


# ---------------------------------------------------------------------------------------------
# one linear: squeeze codes <-> compressed-tensors tensors


def _offset(spec) -> int:
    return 1 << (spec.bits - 1)


def linear_tensors(codes: torch.Tensor, spec, scale: torch.Tensor, zero: torch.Tensor | None) -> dict:
    """The compressed-tensors tensors of one linear, by local name (``weight_packed``, ...), from
    squeeze's dense codes [N, K] (int4: one nibble per uint8) and fp32 scale (and zero) [N, G]."""
    n, k = codes.shape
    if spec.group_size is not None and k % spec.group_size:
        raise SqueezeError(f"compressed-tensors needs the group size to divide the input dimension: {k} is not a "
                           f"multiple of {spec.group_size}; choose a --group-size that divides it, or --format auto")
    if spec.format == "fp8":
        return {"weight": codes, "weight_scale": scale.float()}
    u = (codes.to(torch.int16) + _offset(spec)).to(torch.uint8) if spec.symmetric and spec.bits == 8 else codes
    out = {"weight_packed": pack_int32(u, spec.bits), "weight_shape": torch.tensor([n, k], dtype=torch.int64),
           "weight_scale": scale.float()}
    if zero is not None:
        out["weight_zero_point"] = pack_int32(zero.t(), spec.bits).t().contiguous()
    return out


def squeeze_codes(tensors: dict, spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`linear_tensors` (also for the naive/int/float-quantized formats, whose
    ``weight`` holds the signed codes): (codes [N, K], scale fp32 [N, G], zero or None)."""
    scale = tensors["weight_scale"].float()
    if "weight_packed" in tensors:
        n, k = (int(v) for v in tensors["weight_shape"].tolist())
        u = unpack_int32(tensors["weight_packed"], spec.bits, k)
    else:
        q = tensors["weight"]
        n, k = q.shape
        if spec.format == "fp8":
            return q, _rows(scale, n), None
        u = (q.to(torch.int16) + _offset(spec)).to(torch.uint8)
    zero = None
    if not spec.symmetric:  # (a symmetric checkpoint may carry zero points of 0: not part of the numbers)
        zero = tensors["weight_zero_point"]
        if zero.dtype == torch.int32:  # packed along N (channel and group strategies)
            zero = unpack_int32(zero.t().contiguous(), spec.bits, n).t().contiguous()
        else:  # signed, one per tensor
            zero = (zero.to(torch.int16) + _offset(spec)).to(torch.uint8)
        zero = _rows(zero, n)
    if spec.symmetric and spec.bits == 8:
        u = (u.to(torch.int16) - _offset(spec)).to(torch.int8)
    return u, _rows(scale, n), zero


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Per-tensor qparams ([1] or [1, 1]) as one per row [N, 1]; others as stored."""
    t = t.reshape(1, 1) if t.numel() == 1 and t.dim() < 2 else t
    return t.expand(n, t.shape[1]).contiguous() if t.shape[0] == 1 and n > 1 else t


# ---------------------------------------------------------------------------------------------
# config


def weights_args(spec) -> dict:
    """compressed-tensors ``QuantizationArgs`` (as serialized) of a squeeze QuantSpec."""
    return {"num_bits": spec.bits, "type": "float" if spec.format == "fp8" else "int", "symmetric": spec.symmetric,
            "strategy": "group" if spec.group_size else "channel", "group_size": spec.group_size, "dynamic": False}


def spec_of_args(args: dict):
    """The squeeze QuantSpec of serialized compressed-tensors weight args (SqueezeError if squeeze's
    layout cannot express them)."""
    from squeeze.algorithms.quant import QuantSpec

    kind, bits, strategy = args.get("type", "int"), args.get("num_bits", 8), args.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if args.get("group_size") is None else "channel" if args["group_size"] == -1 else "group"
    what = f"{kind}{bits} {strategy}"
    if (kind, bits) not in (("int", 4), ("int", 8), ("float", 8)) or strategy not in ("channel", "group", "tensor") \
            or args.get("dynamic") or args.get("actorder") not in (None, "weight", "static") \
            or args.get("block_structure") or args.get("scale_dtype"):
        raise SqueezeError(f"compressed-tensors weights {what} (args {args}) are not a layout squeeze decodes "
                           "(int4/int8/fp8, channel, group or tensor scales): load it with transformers + "
                           "compressed-tensors")
    return QuantSpec(bits=bits, format="fp8" if kind == "float" else "int", symmetric=bool(args.get("symmetric", True)),
                     group_size=args.get("group_size") if strategy == "group" else None)


def quantization_config(spec, ignore: list[str], sparsity: dict | None) -> dict:
    """config.json's ``quantization_config`` for linears quantized with ``spec`` (None: sparsity only).

    ``dequantize: true`` makes transformers decode the codes while loading, from the checkpoint's
    fp32 scales, so it builds exactly the weights squeeze computed in any model dtype (its other
    route first casts the scales to the model dtype, and in 5.24 + compressed-tensors 0.20 cannot
    load packed zero points at all: it allocates them unpacked). Engines that serve the packed
    layout (vLLM, SGLang) do not read the key."""
    fmt = "dense" if spec is None else FP8_FORMAT if spec.format == "fp8" else INT_FORMAT
    groups = {} if spec is None else {"group_0": {"targets": ["Linear"], "weights": weights_args(spec),
                                                   "input_activations": None, "output_activations": None,
                                                   "format": fmt}}
    out = {"quant_method": "compressed-tensors", "version": VERSION, "format": fmt, "config_groups": groups,
           "ignore": ignore, "quantization_status": "compressed", "kv_cache_scheme": None,
           "global_compression_ratio": None, "sparsity_config": sparsity or {}, "transform_config": {}}
    if spec is not None:
        out["dequantize"] = True
    return out


def sparsity_config(structure: str, global_sparsity: float, targets: list[str]) -> dict:
    """``sparsity_config`` for zeros stored in place (format ``dense``): metadata engines may use
    (vLLM runs 2:4 kernels on unquantized "2:4" linears); compressed-tensors knows the structures
    "2:4" and "unstructured". The sparse linears are named, not matched as every ``Linear`` minus
    an ignore list: vLLM subtracts ignore names from target strings, so a dense linear matched by
    ``Linear`` would be taken for a 2:4 one."""
    return {"format": "dense", "sparsity_structure": structure, "global_sparsity": round(global_sparsity, 6),
            "targets": targets, "ignore": []}


def module_names(model: nn.Module, names: set[str], complement: bool = False) -> list[str]:
    """The linear modules of ``model`` in ``names`` (``complement``: not in them), as compressed-tensors
    matches module names (GPT-2's ``Conv1D`` included: vLLM builds it as a linear). A name under the
    base model is also given without its prefix, so the base class (AutoModel) matches as well as
    the head class."""
    from squeeze.adapters import is_linear

    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    out = []
    for name, module in model.named_modules():
        if is_linear(module) and (name in names) != complement:
            out.append(name)
            if prefix != "." and name.startswith(prefix):
                out.append(name.removeprefix(prefix))
    return out


def is_compressed_tensors(config: dict) -> bool:
    """Whether a config.json (dict) describes a compressed-tensors checkpoint."""
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


# ---------------------------------------------------------------------------------------------
# reading


def _scheme(path, qconfig: dict):
    """The one weight-only QuantSpec of a compressed-tensors config (None: nothing quantized)."""
    def refuse(what):
        return SqueezeError(f"{path}: {what}, which squeeze's decoder does not read (it reads weight-only int4/int8/fp8 "
                            "compressed-tensors checkpoints): load it with transformers + compressed-tensors")

    if qconfig.get("transform_config") or qconfig.get("kv_cache_scheme"):
        raise refuse("the compressed-tensors config has transforms or a quantized KV cache")
    sparsity = qconfig.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise refuse(f"sparsity is stored as {sparsity.get('format')!r}")
    groups = list((qconfig.get("config_groups") or {}).values())
    if any(not isinstance(g, dict) for g in groups):
        raise refuse("a config group names a preset scheme")
    if any(g.get("input_activations") or g.get("output_activations") for g in groups):
        raise refuse("activations are quantized too (their run-time quantization is part of the numbers)")
    weights = [g.get("weights") for g in groups if g.get("weights")]
    if any(w != weights[0] for w in weights):
        raise refuse("several weight quantization schemes are used")
    formats = {g.get("format") or qconfig.get("format") for g in groups} | {qconfig.get("format") or "dense"}
    if not formats <= set(_READS) | {"mixed-precision"}:
        raise refuse(f"weights are stored as {sorted(f for f in formats if f not in _READS)}")
    return spec_of_args(weights[0]) if weights else None


class CompressedTensorsView:
    """A compressed-tensors checkpoint seen as the dense one it stores, with the interface of
    :class:`squeeze.formats.DenseView` (what :func:`squeeze.formats.open_dense` gives every command
    that reads weights): a quantized linear's ``.weight`` key instead of its tensors, ``get``
    decoding it exactly as squeeze dequantizes (fp32, then the export dtype), a config without
    ``quantization_config``; everything else is the checkpoint's own (``raw``)."""

    _SUFFIXES = ("_packed", "_scale", "_shape", "_zero_point")

    def __init__(self, ckpt, qconfig: dict):
        from squeeze.checkpoint import SAFETENSORS_DTYPES

        self.raw = ckpt
        self.spec = _scheme(ckpt.path, qconfig)
        keys = set(ckpt.keys())
        self.stems = {k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale")}
        if self.stems and self.spec is None:
            raise SqueezeError(f"{ckpt.path}: quantization scales but no quantization scheme in config.json; a broken "
                               "compressed-tensors checkpoint")
        if any(k.endswith(".weight_g_idx") for k in keys):
            raise SqueezeError(f"{ckpt.path}: activation-ordered groups (weight_g_idx), which squeeze's decoder does "
                               "not read: load it with transformers + compressed-tensors")
        hidden = {f"{s}.weight{x}" for s in self.stems for x in self._SUFFIXES}
        self.key_to_shard = {k: shard for k, shard in ckpt.key_to_shard.items() if k not in hidden}
        self.key_to_shard.update({f"{s}.weight": ckpt.key_to_shard[f"{s}.weight_scale"] for s in self.stems})
        # the export dtype: the other floats' (scales are fp32, fp8 codes are no model dtype)
        counts: dict[str, int] = {}
        for k in self.key_to_shard:
            if k.removesuffix(".weight") not in self.stems:
                info = ckpt.headers[ckpt.key_to_shard[k]][k]
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + info["data_offsets"][1] - info["data_offsets"][0]
        floats = {k: c for k, c in counts.items() if SAFETENSORS_DTYPES.get(k, torch.int8).is_floating_point}
        self._dtype = max(floats, key=floats.get) if floats else "F32"

    def __getattr__(self, name):  # path, shards, headers, extra_files, weight_bytes, ...: the checkpoint's own
        return getattr(self.raw, name)

    @property
    def config_dict(self) -> dict:
        return {k: v for k, v in self.raw.config_dict.items() if k != "quantization_config"}

    def keys(self):
        return self.key_to_shard.keys()

    def source_dtype(self) -> torch.dtype:
        from squeeze.checkpoint import SAFETENSORS_DTYPES

        return SAFETENSORS_DTYPES[self._dtype]

    def dtype_of(self, key: str) -> str:
        return self._dtype if key.removesuffix(".weight") in self.stems else self.raw.dtype_of(key)

    def shape_of(self, key: str) -> list[int]:
        stem = key.removesuffix(".weight")
        if stem not in self.stems or key in self.raw.keys():  # not quantized, or fp8 codes of the weight's shape
            return self.raw.shape_of(key)
        return [int(v) for v in self.raw.get(f"{stem}.weight_shape").tolist()]

    def get(self, key: str) -> torch.Tensor:
        stem = key.removesuffix(".weight")
        if not key.endswith(".weight") or stem not in self.stems:
            return self.raw.get(key)
        from squeeze.algorithms.quant import dequantize

        names = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
        parts = {n: self.raw.get(f"{stem}.{n}") for n in names if f"{stem}.{n}" in self.raw.keys()}
        codes, scale, zero = squeeze_codes(parts, self.spec)
        return dequantize(codes, self.spec, scale, zero).to(self.source_dtype())
