"""``--format compressed-tensors``: a squeeze export rewritten in the compressed-tensors layout
(:mod:`squeeze.formats_ct`), which transformers + compressed-tensors loads without squeeze and
vLLM / SGLang serve.

One mechanism, :func:`write`: it reads a compact squeeze export (the codes, scales and zero points
the quantize pass chose, in ``squeeze.json``'s ``format.linears``) and writes the same codes in the
compressed-tensors layout. ``compress(format="compressed-tensors")`` sweeps as for ``auto``, stages
that compact export inside its staging folder and converts it there; :func:`convert` (``squeeze
convert``) does the same for a compact export already on disk. Nothing is quantized twice.

What the layout cannot hold is refused, before any work where the recipe tells (:func:`check_recipe`):
run-time methods (activation sparsity, dReLU, token dropping: their numbers are not in the weights),
quantized GPT-2 ``Conv1D`` layers, group sizes that do not divide a quantized linear's input
dimension. Sparsity is kept as zeros in the weights (or codes) plus ``sparsity_config`` metadata.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from squeeze import progress
from squeeze.checkpoint import Checkpoint
from squeeze.errors import SqueezeError
from squeeze.formats_ct import (FORMAT, VERSION, is_compressed_tensors, linear_tensors, module_names,
                                quantization_config, sparsity_config)

LAYOUT = (f"compressed-tensors {VERSION}: quantized linears as weight_packed int32 (pack-quantized int4/int8: unsigned "
          "codes q + 2^(b-1), 32/b per word, low bits first) + weight_shape + fp32 weight_scale (+ weight_zero_point "
          "packed along the output dimension), or fp8 weight + weight_scale (naive-quantized); pruned zeros stored in "
          "place (sparsity_config format dense)")


def _refuse_runtime(names, fix: str) -> None:
    from squeeze.runtime.spec import needs_runtime

    runtime = sorted({n for n in names if needs_runtime(n)})
    if runtime:
        raise SqueezeError(f"--format compressed-tensors holds weights only, and {', '.join(runtime)} needs squeeze's "
                           f"run-time at load time (its state is not in the weights): {fix}")


def _check_linear(name: str, transposed: bool, k: int, spec) -> None:
    if transposed:
        raise SqueezeError(f"compressed-tensors quantizes nn.Linear modules only, and {name} is a GPT-2 Conv1D (weights "
                           "stored transposed): use --format auto (squeeze.load) or --format dense")
    if spec.group_size and k % spec.group_size:
        raise SqueezeError(f"compressed-tensors needs the group size to divide every quantized linear's input "
                           f"dimension, and {name} has {k} (not a multiple of {spec.group_size}): choose a --group-size "
                           "that divides it (or --group-size channel), or use --format auto")


def check_recipe(methods, passes, adapter) -> None:
    """Refuse, before the sweep, a recipe whose export compressed-tensors cannot hold."""
    _refuse_runtime([m.name for m in methods], "use --format auto (squeeze.load), or leave that method out")
    if not any(set(p.promise()) & {"pattern", "sparsity", "quant"} for p in passes):
        raise SqueezeError("--format compressed-tensors stores quantized and sparse checkpoints, and this recipe "
                           "promises neither: add --pattern, --sparsity or --quantize, or use --format dense")
    for p in passes:
        spec = getattr(p, "spec", None) if "quant" in p.promise() else None  # the quantize pass's QuantSpec
        if spec is None:
            continue
        for i in range(len(adapter)):
            for lin in p.targets(adapter.block(i)):
                _check_linear(lin.name, lin.transposed, lin.in_features, spec)


def _plan(src: Checkpoint, record: dict, packed: dict):
    """(QuantSpec or None, {weight key: entry} of the quantized linears, quantization_config)."""
    from squeeze.export import SIDECAR
    from squeeze.formats import packed_modules, spec_of
    from squeeze.modeling import build_skeleton, load_config

    if not record:
        raise SqueezeError(f"{src.path} has no squeeze.json: convert reads squeeze exports (compress with --format "
                           "compressed-tensors instead)")
    if is_compressed_tensors(src.config_dict):
        raise SqueezeError(f"{src.path} is already in the compressed-tensors layout")
    _refuse_runtime([e.get("pass") for e in record.get("passes") or []], "compress the dense source again with "
                    "--format compressed-tensors, leaving that method out")
    if (src.path / SIDECAR).is_file():
        raise SqueezeError(f"{src.path} has run-time state ({SIDECAR}), which compressed-tensors cannot hold")
    quantized = {k: e for k, e in packed.items() if "quant" in e}
    specs = {spec_of(e) for e in quantized.values()}
    if len(specs) > 1:
        raise SqueezeError(f"{src.path} mixes quantizations {sorted(s.name for s in specs)}; compressed-tensors is "
                           "written here with one scheme")
    if not quantized and any(e.get("pass") == "quantize" for e in record.get("passes") or []):
        raise SqueezeError(f"{src.path} was quantized into a dense export, which does not store the scales: compress "
                           "its source again with --format compressed-tensors (or auto)")
    spec = specs.pop() if specs else None
    for key, e in quantized.items():
        _check_linear(key, e["transposed"], e["shape"][1], spec)
    skeleton = build_skeleton(load_config(src))
    modules = packed_modules(skeleton, quantized)
    sparse = {n: r for n, r in (record.get("linears") or {}).items() if r.get("pass") != "quantize"}
    sparsity = None
    if sparse:
        two_four = all(r.get("pattern") == "2:4" and r.get("pattern_ok") and r.get("pattern_axis") != "out"
                       and not r.get("dense_tail_columns") for r in sparse.values())
        params = sum(r["shape"][0] * r["shape"][1] for r in sparse.values())
        zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in sparse.values())
        sparsity = sparsity_config("2:4" if two_four else "unstructured", zeros / max(params, 1),
                                   module_names(skeleton, set(sparse)))
    # the Linear target would claim every linear: the ones not quantized are ignored by name
    qconfig = quantization_config(spec, module_names(skeleton, set(modules), complement=True), sparsity)
    return spec, quantized, qconfig


def write(src: Checkpoint, dest: Path) -> tuple[dict, dict]:
    """Write the squeeze export ``src`` into the (staging) folder ``dest`` in the compressed-tensors
    layout, shard by shard as ``src`` is sharded. Returns ({file: bytes}, the squeeze.json record)."""
    from squeeze.export import RECORD, copy_extra_files, seal, write_index
    from squeeze.formats import codes_of, packed_keys, unpack_linear
    from squeeze.loading import read_record
    from squeeze.report import write_json
    from squeeze.versions import made_with

    record = read_record(src.path)
    packed = (record.get("format") or {}).get("linears") or {}
    spec, quantized, qconfig = _plan(src, record, packed)
    owner = {part: key for key, e in packed.items() for part in packed_keys(e)}
    sizes, weight_map, total, done = {}, {}, 0, set()
    with progress.phase("writing compressed-tensors", total=len(src.shards), unit="shard") as shown:
        for shard in src.shards:
            tensors = {}
            for k in [k for k, s in src.key_to_shard.items() if s == shard]:
                key = owner.get(k)
                if key is None:
                    tensors[k] = src.get(k)
                elif key not in done:
                    done.add(key)
                    entry = packed[key]
                    if key in quantized:
                        stem = key.removesuffix(".weight")
                        codes, scale, zero = codes_of(entry, src.get)
                        parts = linear_tensors(codes, spec, scale, zero)
                        tensors.update({f"{stem}.{name}": t for name, t in parts.items()})
                    else:  # sparse only: the zeros stay in place, the weight as the model holds it
                        tensors[key] = unpack_linear(entry, src.get)
            for name, t in tensors.items():
                weight_map[name] = shard
                total += t.numel() * t.element_size()
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(dest / shard), metadata={"format": "pt"})
            sizes[shard] = (dest / shard).stat().st_size
            del tensors
            shown.advance()
    write_index(src, dest, weight_map, total)
    from squeeze.formats import DenseView

    dtype = str((DenseView(src, packed) if packed else src).source_dtype()).removeprefix("torch.")
    # transformers 5 reads "dtype", older versions "torch_dtype": both name the stored floats
    write_json(dest / "config.json", {**src.config_dict, "dtype": dtype, "torch_dtype": dtype,
                                      "quantization_config": qconfig})
    copy_extra_files(src, dest)
    sparsity = qconfig["sparsity_config"]
    record = {**made_with(), **record, "format": {
        "kind": FORMAT, "layout": LAYOUT, "quantization_format": qconfig["format"],
        "quant": spec.name if spec else None, "sparsity_structure": sparsity.get("sparsity_structure"),
        "quantized_linears": sorted(quantized)}}
    write_json(dest / RECORD, record)
    seal(dest)
    return sizes, record


def report_format(record: dict) -> dict:
    """The report's ``format`` entry for a compressed-tensors export's record."""
    f = record["format"]
    kind = ", ".join(str(v) for v in (f["quantization_format"], f["quant"], f["sparsity_structure"]) if v)
    # "stored_dense" lists linears a compact squeeze layout would not shrink; here zeros are always in place
    return {"kind": f"{f['kind']} ({kind})", "packed_linears": len(f["quantized_linears"]), "stored_dense": []}


def convert(src: str | Path, out: str | Path, format: str = FORMAT, overwrite: bool = False) -> dict:
    """Rewrite the compact squeeze export ``src`` (``--format auto``/``compressed``; a sparse-only
    dense export too) as a compressed-tensors checkpoint in ``out``, atomically. Returns the report."""
    from squeeze.export import check_output_dir, commit, size_report, staging_dir

    if format != FORMAT:
        raise SqueezeError(f"unknown --format {format!r}: convert writes {FORMAT}")
    ckpt = Checkpoint(src)
    if out is None:
        raise SqueezeError("no output folder: give --out DIR")
    out = Path(out)
    check_output_dir(out, ckpt.path, overwrite)
    with staging_dir(out) as tmp:
        sizes, record = write(ckpt, tmp)
        commit(tmp, out)
    return {"source": str(ckpt.path), "out": str(out.resolve()), "files": sizes, "format": report_format(record),
            **size_report(ckpt, sizes, record)}
