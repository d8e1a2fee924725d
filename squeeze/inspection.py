"""``squeeze info``: what is in a checkpoint folder, measured from its weights (read one tensor
at a time), checked against what ``squeeze.json`` promised."""

from __future__ import annotations

from squeeze.adapters import Adapter
from squeeze.formats import fits_quant_grid, kind_of, open_dense
from squeeze.loading import read_record
from squeeze.modeling import WeightMap, build_skeleton, load_config
from squeeze.sparsity import fraction_zero, parse_pattern, satisfies_nm
from squeeze.versions import KEYS as VERSION_KEYS


PLANNED_KINDS = ("teal", "wina", "drelu")  # record kinds whose run-time has a sparse and a dense path


def info(path, trust_remote_code: bool = False, runtime: bool = True) -> dict:
    """``runtime=True``: also load the model (``squeeze.load``) when its run-time chooses between
    a sparse and a dense path, and report what the plan for this machine decided."""
    ckpt = open_dense(path)
    config = load_config(ckpt, trust_remote_code)
    skeleton = build_skeleton(config, trust_remote_code)
    adapter = Adapter(skeleton)
    record = read_record(ckpt.path)
    packed = getattr(ckpt, "packed", None)
    weights = WeightMap(skeleton, ckpt)
    promised = record.get("linears", {})
    linears = {}
    lin_params = lin_zeros = 0
    for i in range(len(adapter)):
        for name, lin in adapter.block(i).linears.items():
            w = weights.ckpt.get(weights.to_ckpt[f"{name}.weight"])
            w = w.t() if lin.transposed else w
            rec = {"role": lin.role, "shape": list(w.shape), "sparsity": round(fraction_zero(w), 6),
                   "fits_2_4": satisfies_nm(w, 2, 4), "dtype": str(w.dtype).removeprefix("torch.")}
            p = promised.get(name, {})
            said, ok = [], []
            if "pattern" in p:
                n, m = parse_pattern(p["pattern"])
                dim = 0 if p.get("pattern_axis") == "out" else 1  # N:M groups along in (default) or out
                said.append(p["pattern"] + (" (out)" if dim == 0 else ""))
                ok.append(satisfies_nm(w, n, m, dim=dim))
                if w.shape[dim] % m:
                    rec["dense_tail_columns" if dim else "dense_tail_rows"] = w.shape[dim] % m
            elif "sparsity" in p and p.get("pass"):
                said.append(f"{p['sparsity']:.0%}" if isinstance(p["sparsity"], float) else p["sparsity"])
                target = p.get("sparsity_target", p["sparsity"])
                # unstructured: floor(s * in) zeros per row, so measured >= target - 1/in
                ok.append(rec["sparsity"] >= float(target) - 1.0 / w.shape[1] - 1e-9)
            if "quant" in p:  # re-measured: no group of a row holds more distinct values than codes
                said.append(p["quant"])
                ok.append(fits_quant_grid(w, p["quant"]))
            if said:
                rec["promised"], rec["promise_ok"] = " + ".join(said), all(ok)
            linears[name] = rec
            lin_params += w.numel()
            lin_zeros += rec["sparsity"] * w.numel()
    n_params = sum(p.numel() for _, p in skeleton.named_parameters())
    planned = any(e.get("pass") in PLANNED_KINDS for e in record.get("passes") or []) or \
        any("meta" in e and "quant" not in e for e in (packed or {}).values())
    out = {
        "path": str(ckpt.path),
        "model_type": config.model_type,
        "architecture": type(skeleton).__name__,
        "parameters": n_params,
        "linear_parameters": lin_params,
        "zero_fraction_linears": round(lin_zeros / max(lin_params, 1), 6),
        "file_bytes": _file_bytes(ckpt.path),
        "format": kind_of(packed) if packed else (record.get("format") or {}).get("kind", "dense"),
        "linears": linears,
        "squeeze": {"passes": record.get("passes"), "calibration": record.get("calibration"),
                    "made_with": {k: record.get(k) for k in VERSION_KEYS}} if record else None,
    }
    if runtime and planned:
        out["runtime"] = runtime_plan(ckpt.path, trust_remote_code)
    return out


def runtime_plan(path, trust_remote_code: bool = False) -> dict:
    """What ``squeeze.load`` decides on this machine (threads: torch's current count): per run-time
    kind, how many modules run the sparse and the dense path, and the measured speed of the sparse
    path relative to the dense one (from the plan cache when this machine measured it before)."""
    import torch

    from squeeze.loading import load

    model = load(path, trust_remote_code=trust_remote_code)
    plan = dict(model.squeeze_runtime)
    plan.setdefault("threads", torch.get_num_threads())
    return plan


def _file_bytes(folder) -> dict[str, int]:
    """Every file of the checkpoint folder (shards, the packed ``squeeze.safetensors`` sidecar,
    config, index, tokenizer, record): what the folder costs on disk."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
