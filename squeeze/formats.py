"""Storage formats for exports.

``auto`` (default): every linear is stored by what the passes promised it, one codec per linear
(below); a linear no codec makes smaller, and every other tensor, stays as it is. An export with
nothing to pack is a plain checkpoint. ``compressed`` is the same, but an error when the recipe
promises nothing to pack.

``dense``: zeros and quantized values baked into ordinary safetensors in the model's dtype, for
engines that need plain weights; plain ``from_pretrained`` loads it (unless a run-time method
marks it, see :mod:`squeeze.autoload`).

Every command that reads weights (compress, recover, finetune, drop-layers, tune-exit, eval,
info, load) reads a packed export as the dense checkpoint it stores (:func:`open_dense`), and a
command that writes one back keeps a packed weight packed (:func:`squeeze.export.write_checkpoint`).

Codecs, described in ``squeeze.json`` under ``format.linears`` (weight key -> entry):

- ``2:4`` — a weight satisfying 2:4 along its input dimension becomes ``<stem>.values`` [N, K/2]
  in the weight's dtype and ``<stem>.meta`` [N, ceil(K/8)] uint8 (four 2-bit in-group positions
  per byte, low bits first; see ``squeeze.kernels.pack_24``): 0.5625x the bytes of a 16-bit weight.
- ``int8`` / ``int4`` / ``fp8`` (a ``quantize`` pass) — ``<stem>.qweight`` codes [N, K] (int4: two
  per byte, :func:`squeeze.algorithms.quant.pack_int4`), ``<stem>.scale`` fp32 [N, G] and, when
  asymmetric, ``<stem>.zero`` uint8 [N, G] (layout in :mod:`squeeze.algorithms.quant`).
- ``2:4+int8`` / ``2:4+int4`` / ``2:4+fp8`` — both: the 2:4 values are stored as codes (int4
  packed) with the metadata and the original-column scales (value column j' is in group
  j' // (g / 2); needs g % 4 == 0, else the linear is stored as quantized codes only).

Only squeeze loads a packed export (it is marked for it). Decoding is exact: the dense
weight it gives equals the compressed model's weight in the export dtype.

``compressed-tensors``: the same sweep as ``auto``, whose codes :mod:`squeeze.export_ct` then writes in
the layout transformers + compressed-tensors loads without squeeze (:mod:`squeeze.formats_ct`).
"""

from __future__ import annotations

import dataclasses

import torch

from squeeze.errors import SqueezeError
from squeeze.kernels.quant_format import unpack_int4

FORMATS = ("auto", "compressed", "dense", "compressed-tensors")  # the last: squeeze.export_ct
COMPRESSED_KIND = "compressed-2:4"  # the record kind of exports whose only codec is 2:4
LAYOUT = ("values [N, K/2] in the weight's dtype (kept entries in column order); meta [N, ceil(K/8)] uint8: "
          "for input-column group g (4 columns), the two kept in-group positions (ascending) occupy 2 bits "
          "each, group 2j in bits 0-3 and group 2j+1 in bits 4-7 of byte j, low bits first; weights of "
          "GPT-2 Conv1D layers are packed in [out, in] orientation (transposed: true); quantized codes, "
          "scales and zero points as in squeeze.algorithms.quant")


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise SqueezeError(f"unknown --format {name!r}: use {', '.join(FORMATS)}")
    return name


def kind_of(packed: dict) -> str:
    """The record's format kind from its entries, e.g. compressed-2:4, compressed-2:4+int4-g128."""
    codecs = sorted({e.get("codec", "2:4") for e in packed.values()})
    return "compressed-" + ",".join(codecs)


def attach_quant(module: torch.nn.Module, spec, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """Leave a linear's quantization on it for the export (non-persistent: not in state_dict)."""
    module.squeeze_quant = spec
    module.register_buffer("squeeze_scale", scale, persistent=False)
    module.register_buffer("squeeze_zero", zero, persistent=False)


def quant_of(module: torch.nn.Module):
    """(spec, scale, zero) a quantize pass left on ``module``, or None."""
    spec = getattr(module, "squeeze_quant", None)
    return None if spec is None else (spec, module.squeeze_scale, module.squeeze_zero)


def fits_quant_grid(w: torch.Tensor, name: str) -> bool:
    """Whether ``w`` [N, K] can be the dequantized weight of quantization ``name`` (e.g. int4-g128,
    int8, fp8-g64): no group of a row holds more distinct values than there are codes. Measured
    from the weight alone, so ``squeeze info`` checks the promise without the scales."""
    import re

    bits = 4 if name.startswith("int4") else 8
    found = re.search(r"-g(\d+)", name)
    g = int(found.group(1)) if found else w.shape[1]
    for start in range(0, w.shape[1], g):
        v = w[:, start:start + g].float().sort(dim=1).values
        if int(((v[:, 1:] != v[:, :-1]).sum(1) + 1).max()) > 2 ** bits:
            return False
    return True


PARTS = ("values", "meta", "mask", "qweight", "scale", "zero")  # entry fields that name a stored tensor


def packed_keys(entry: dict) -> list[str]:
    """The stored tensors of one packed linear."""
    return [entry[part] for part in PARTS if part in entry]


def packed_modules(model: torch.nn.Module, packed: dict) -> dict[str, dict]:
    """{module name: its packed entry}; the record's checkpoint keys may carry or lack the
    base-model prefix the module names have."""
    prefix = getattr(model, "base_model_prefix", "")
    found = {}
    for name, _ in model.named_modules():
        for key in (f"{name}.weight", f"{name}.weight".removeprefix(prefix + "."), f"{prefix}.{name}.weight"):
            if key in packed:
                found[name] = packed[key]
                break
    return found


def spec_of(entry: dict):
    """The QuantSpec of a packed entry that has one."""
    from squeeze.algorithms.quant import QuantSpec

    return QuantSpec(**entry["quant"])


def pack_block(block, weights, tensors: dict) -> dict:
    """Replace the weights of the block's linears in ``tensors`` (checkpoint key -> tensor, export
    dtype) by their codec's tensors. Returns {weight key: entry}."""
    done = {}
    for lin in block.linears.values():
        key = weights.to_ckpt.get(f"{lin.name}.weight")
        if key is None or key not in tensors:
            continue
        entry = pack_linear(tensors[key], key.removesuffix(".weight"), lin.transposed, quant_of(lin.module))
        if entry is None:
            continue
        parts = entry.pop("tensors")
        tensors.pop(key)
        tensors.update({k: t.contiguous() for k, t in parts.items()})
        done[key] = entry
    return done


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K/8)]: column j is bit j % 8 (low bit first) of byte j // 8."""
    n, k = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -k % 8)).view(n, -1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    return ((bits[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).view(bits.shape[0], -1)[:, :k].bool()


def _value_bytes(w: torch.Tensor, spec) -> float:
    if spec is None:
        return w.element_size()
    return 0.5 if spec.format == "int" and spec.bits == 4 else 1.0


def _bytes_op(codes: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` on the codes, through their bytes for fp8 (which indexing does not support)."""
    if codes.dtype == torch.float8_e4m3fn:
        return fn(codes.view(torch.uint8)).view(torch.float8_e4m3fn)
    return fn(codes)


def pack_linear(w: torch.Tensor, stem: str, transposed: bool = False, quant=None) -> dict | None:
    """The codec entry (with its ``tensors``) for one linear whose exported weight is ``w`` (stored
    orientation: [in, out] when ``transposed``, as GPT-2's Conv1D), or None when it is best stored
    dense. Sparsity: 2:4 (values + 2-bit positions) when the weight satisfies it, else a bitmask
    (values + 1 bit per entry) when that is smaller than dense; the values are quantized codes when
    ``quant`` (spec, scale, zero), what a quantize pass left on the linear, is given."""
    from squeeze.kernels import is_24_sparse, pack_24

    w = w.t() if transposed else w  # codecs work on [out, in]
    n, k = w.shape
    spec, scale, zero = quant if quant is not None else (None, None, None)
    two_four = k % 4 == 0 and is_24_sparse(w) and (spec is None or spec.group_width(k) % 4 == 0)
    keep = w != 0
    size = _value_bytes(w, spec)
    bitmask = not two_four and int(keep.sum()) * size + n * -(-k // 8) < n * k * size
    if quant is None and not two_four and not bitmask:
        return None
    sparse = "2:4" if two_four else "bitmask" if bitmask else None
    entry = {"shape": [n, k], "transposed": transposed, "dtype": str(w.dtype).removeprefix("torch.")}
    parts = {}
    if two_four:
        values, parts[f"{stem}.meta"] = pack_24(w.contiguous())
        entry["meta"] = f"{stem}.meta"
    elif bitmask:
        values, parts[f"{stem}.mask"] = w[keep], pack_bits(keep)
        entry["mask"] = f"{stem}.mask"
    if quant is None:
        parts[f"{stem}.values"] = values
        entry.update({"codec": sparse, "values": f"{stem}.values"})
        entry["tensors"] = parts
        return entry
    from squeeze.algorithms.quant import codes_from_weight, pack_int4

    if two_four:  # the values keep the original groups: g input columns hold g / 2 values
        codes = codes_from_weight(values, dataclasses.replace(spec, group_size=spec.group_width(k) // 2),
                                  scale.float(), zero)
    else:
        codes = codes_from_weight(w, spec, scale.float(), zero)
        if bitmask:  # the kept entries' codes, row-major (fp8 handled as its bytes: no fp8 indexing)
            codes = _bytes_op(codes, lambda c: c[keep][None])
    if spec.format == "int" and spec.bits == 4:
        codes = pack_int4(codes)
    name = "values" if sparse else "qweight"
    parts.update({f"{stem}.{name}": codes, f"{stem}.scale": scale.float()})
    entry.update({"codec": "+".join(c for c in (sparse, spec.name.split("-g")[0].removesuffix("-asym")) if c),
                  "quant": dataclasses.asdict(spec), name: f"{stem}.{name}", "scale": f"{stem}.scale"})
    if zero is not None:
        parts[f"{stem}.zero"] = zero
        entry["zero"] = f"{stem}.zero"
    entry["tensors"] = parts
    return entry


def unpack_linear(entry: dict, get) -> torch.Tensor:
    """The dense weight (export dtype, stored orientation) of one codec entry; ``get(key)`` reads
    a stored tensor."""
    from squeeze.kernels import unpack_24

    n, k = entry["shape"]
    dtype = getattr(torch, entry["dtype"]) if "dtype" in entry else None
    keep = unpack_bits(get(entry["mask"]), k) if "mask" in entry else None
    if "quant" in entry:
        from squeeze.algorithms.quant import dequantize

        spec = spec_of(entry)
        zero = get(entry["zero"]) if "zero" in entry else None
        if "meta" in entry:
            spec_v = dataclasses.replace(spec, group_size=spec.group_width(k) // 2)
            w = dequantize(get(entry["values"]), spec_v, get(entry["scale"]), zero, K=k // 2).to(dtype)
            w = unpack_24(w, get(entry["meta"]), k)
        elif keep is not None:
            nnz = int(keep.sum())
            codes = get(entry["values"])
            codes = (unpack_int4(codes, nnz) if spec.format == "int" and spec.bits == 4 else codes)[0]
            dense = _bytes_op(codes, lambda c: torch.zeros(n, k, dtype=c.dtype).index_put_((keep,), c))
            w = torch.where(keep, dequantize(dense, spec, get(entry["scale"]), zero), 0.0).to(dtype)
        else:
            w = dequantize(get(entry["qweight"]), spec, get(entry["scale"]), zero, K=k).to(dtype)
    elif keep is not None:
        values = get(entry["values"])
        w = torch.zeros(n, k, dtype=values.dtype)
        w[keep] = values
    else:
        w = unpack_24(get(entry["values"]), get(entry["meta"]), k)
        w = w if dtype is None else w.to(dtype)
    return w.t().contiguous() if entry["transposed"] else w


def codes_of(entry: dict, get) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [N, K] in the quant layout, int4 one nibble per uint8; scale; zero) of a quantized
    codec entry, in [out, in] orientation: a sparse layout's kept codes in place and the code that
    decodes to 0 elsewhere, so ``dequantize`` of them is :func:`unpack_linear`'s weight in fp32."""
    from squeeze.kernels import unpack_24

    n, k = entry["shape"]
    spec = spec_of(entry)
    scale = get(entry["scale"])
    zero = get(entry["zero"]) if "zero" in entry else None
    int4 = spec.format == "int" and spec.bits == 4
    stored = get(entry["qweight"] if "qweight" in entry else entry["values"])
    if "qweight" in entry:
        return (unpack_int4(stored, k) if int4 else stored), scale, zero
    if "meta" in entry:  # 2:4: two kept positions per group of 4, the values in row-major order
        keep = unpack_24(torch.ones(n, k // 2, dtype=torch.uint8), get(entry["meta"]), k).bool()
        kept = unpack_int4(stored, k // 2) if int4 else stored
    else:  # bitmask: the kept entries' codes as one row
        keep = unpack_bits(get(entry["mask"]), k)
        kept = unpack_int4(stored, int(keep.sum())) if int4 else stored
    if spec.symmetric:  # the code that decodes to 0: int4 nibble 8, else 0 (fp8 +0.0 is the byte 0)
        dense = torch.full((n, k), 8 if int4 else 0, dtype=torch.uint8)
    else:
        dense = zero.repeat_interleave(spec.group_width(k), dim=1)[:, :k].clone()
    dense[keep] = kept.reshape(-1).view(torch.uint8)  # through the bytes: int8 and fp8 codes alike
    return dense.view(spec.code_dtype), scale, zero


SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class DenseView:
    """A compressed checkpoint seen as the dense one it stores: its keys are the dense model's
    (a packed weight's key instead of its codec's tensors), ``get`` of a packed weight unpacks it,
    and everything else is the checkpoint's own. Every command that reads weights reads a packed
    export through this view (:func:`open_dense`), so it works on packed and dense exports alike;
    :func:`squeeze.export.write_checkpoint` copies a packed weight nothing replaced as its stored
    tensors (``raw``, ``packed``)."""

    def __init__(self, ckpt, packed: dict):
        self.raw, self.packed = ckpt, packed
        hidden = {k for p in packed.values() for k in packed_keys(p)}
        missing = sorted(hidden - set(ckpt.keys()))
        if missing:
            raise SqueezeError(f"{ckpt.path}: squeeze.json names packed tensors the checkpoint lacks (e.g. "
                               f"{missing[0]}); the export is incomplete: export it again")
        self.key_to_shard = {k: s for k, s in ckpt.key_to_shard.items() if k not in hidden}
        self.key_to_shard.update({k: ckpt.key_to_shard[packed_keys(e)[0]] for k, e in packed.items()})

    def __getattr__(self, name):  # path, config_dict, shards, extra_files, ...: the checkpoint's own
        return getattr(self.raw, name)

    def source_dtype(self) -> torch.dtype:
        """The dtype the dense weights are in: the one the packed entries name (codes may outweigh
        every float tensor on disk), else the checkpoint's."""
        named = {e["dtype"] for e in self.packed.values() if "dtype" in e}
        return getattr(torch, named.pop()) if len(named) == 1 else self.raw.source_dtype()

    def keys(self):
        return self.key_to_shard.keys()

    def dtype_of(self, key: str) -> str:
        entry = self.packed.get(key)
        if entry is None:
            return self.raw.dtype_of(key)
        return SAFETENSORS_NAMES[entry["dtype"]]

    def shape_of(self, key: str) -> list[int]:
        entry = self.packed.get(key)
        if entry is None:
            return self.raw.shape_of(key)
        return entry["shape"][::-1] if entry["transposed"] else list(entry["shape"])

    def get(self, key: str) -> torch.Tensor:
        entry = self.packed.get(key)
        if entry is None:
            return self.raw.get(key)
        return unpack_linear(entry, self.raw.get)


def open_dense(path):
    """The checkpoint folder ``path`` with its dense keys: a :class:`DenseView` of a packed squeeze
    export, a :class:`~squeeze.formats_ct.CompressedTensorsView` of a compressed-tensors checkpoint,
    the :class:`~squeeze.checkpoint.Checkpoint` itself otherwise."""
    from squeeze.checkpoint import Checkpoint
    from squeeze.formats_ct import CompressedTensorsView, is_compressed_tensors
    from squeeze.loading import read_record

    ckpt = Checkpoint(path)
    if is_compressed_tensors(ckpt.config_dict):  # decoded by squeeze too: no compressed-tensors needed
        return CompressedTensorsView(ckpt, ckpt.config_dict["quantization_config"])
    packed = (read_record(ckpt.path).get("format") or {}).get("linears")
    return DenseView(ckpt, packed) if packed else ckpt


def renamed_entry(entry: dict, old_key: str, new_key: str) -> dict:
    """A packed entry whose weight key moves from ``old_key`` to ``new_key`` (layer drop renumbers
    blocks): its stored tensors move with it."""
    if old_key == new_key:
        return entry
    old, new = old_key.removesuffix(".weight"), new_key.removesuffix(".weight")
    return {k: new + v.removeprefix(old) if k in PARTS else v for k, v in entry.items()}
