"""``squeeze.load``: a transformers model from an export, with squeeze's run-time state applied.

The weights load through plain ``from_pretrained`` (safetensors only). Then every method recorded
in ``squeeze.json`` gets its run-time installed (:mod:`squeeze.runtime.spec`), and tensors from
the ``squeeze.safetensors`` sidecar (thresholds and other run-time buffers) are loaded by name.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from squeeze import progress
from squeeze.errors import SqueezeError
from squeeze.export import RECORD, SIDECAR
from squeeze.modeling import as_loaded, load_config, model_class


def read_record(path: str | Path) -> dict:
    f = Path(path) / RECORD
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise SqueezeError(f"{f}: unreadable ({e})") from None


def recorded_source(path: str | Path) -> tuple[Path | None, str | None]:
    """The dense checkpoint an export was made from, by its record's ``source`` (a mapping with
    ``path`` from compress and recover, a plain path from drop-layers and finetune), followed back
    through exports made from exports to the first folder that records none. Returns (folder, None),
    or (None, why not): nothing recorded, or a recorded folder that no longer exists."""
    here, seen = Path(path).resolve(), set()
    while True:
        src = read_record(here).get("source")
        src = src.get("path") if isinstance(src, dict) else src
        if not src:
            return (None, "no source recorded") if here == Path(path).resolve() else (here, None)
        nxt = Path(src).resolve()
        if not (nxt / "config.json").is_file():
            return None, f"source {src} recorded but not found"
        if nxt in seen or nxt == here:  # a record pointing back at itself: stop where we are
            return nxt, None
        seen.add(here)
        here = nxt


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         trust_remote_code: bool = False, attn_implementation: str | None = None,
         sparse24: bool | None = None, quant_kernels: bool | None = None,
         runtime: str | None = None) -> torch.nn.Module:
    """Load a checkpoint (squeeze export or any HF checkpoint folder) ready for inference.

    A compressed export is rebuilt from its packed tensors, exactly the dense model the compress
    run kept. On CUDA, or with ``sparse24=True``, its 2:4 linears become
    :class:`~squeeze.runtime.sparse24.Sparse24Linear` modules over the packed data; its quantized
    linears run weight-only kernels where one pays (:mod:`squeeze.runtime.quant`: CUDA; on CPU
    weights of 512 x 512 and more, in bf16, and for int8 in fp32 / fp16 too with squeeze's own
    kernel built); ``quant_kernels=True`` takes them wherever one runs, ``False`` keeps the exact dense
    path. A compressed-tensors checkpoint
    (``--format compressed-tensors``, or weight-only int4/int8/fp8 from llm-compressor) is decoded by
    squeeze (:mod:`squeeze.formats_ct`) into that exact dense model, without compressed-tensors.

    ``runtime``: "auto" (default, or ``$SQUEEZE_RUNTIME``) gives every run-time with a sparse and
    a dense path (activation-sparse linears, the dReLU FFN, 2:4 linears on CPU) the one a plan
    measured on this machine for its shapes says is faster (:mod:`squeeze.runtime.plan`; cached);
    "sparse" / "dense" force one without measuring. The dense path computes the same function,
    except at activation-sparse sites: their thresholds only serve the sparse kernel, so their dense
    path multiplies the unmasked input (the source's activations; "sparse" keeps every mask, the
    model ``compress`` scored). ``sparse24`` set explicitly wins for 2:4.
    What was decided is ``model.squeeze_runtime``.
    """
    from squeeze.runtime.plan import resolve_mode

    mode = resolve_mode(runtime)
    with progress.phase(f"loading {Path(path).resolve().name}"):  # seconds to minutes for a large model
        return _load(path, dtype, device, trust_remote_code, attn_implementation, sparse24, quant_kernels, mode)


def _load(path, dtype, device, trust_remote_code, attn_implementation, sparse24, quant_kernels, mode="auto"):
    from squeeze.formats import open_dense
    from squeeze.formats_ct import CompressedTensorsView

    ckpt = open_dense(path)
    config = load_config(ckpt, trust_remote_code)
    record = read_record(ckpt.path)
    packed = getattr(ckpt, "packed", None)
    on_cpu = torch.device(device).type == "cpu"
    candidates = []
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if packed:
        dtype = dtype if isinstance(dtype, torch.dtype) else ckpt.source_dtype()  # the export's
        model = load_dense(ckpt, config, dtype, attn_implementation, trust_remote_code)
    elif isinstance(ckpt, CompressedTensorsView):  # decoded here: loading it needs no compressed-tensors
        del config.quantization_config  # the model is a dense one now (and saves as one)
        dtype = dtype if isinstance(dtype, torch.dtype) else ckpt.source_dtype()
        model = load_dense(ckpt, config, dtype, attn_implementation, trust_remote_code)
    else:
        model = as_loaded(_from_pretrained(ckpt, config, dtype, attn_implementation, trust_remote_code))
    if record:
        from squeeze.runtime.spec import install

        install(model, record, str(ckpt.path / RECORD))
        sidecar = ckpt.path / SIDECAR
        if sidecar.is_file():
            from safetensors.torch import load_file

            state = load_file(str(sidecar))
            missing = [k for k in state if k not in dict(model.state_dict())]
            if missing:
                raise SqueezeError(f"{sidecar}: tensors {missing[:3]} have no place in the loaded model")
            model.load_state_dict(state, strict=False)
    model.squeeze_record = record
    if packed:  # weight kernels after the run-times: a swap carries their state (runtime.swap)
        if sparse24 is True or (sparse24 is None and not on_cpu and mode != "dense"):
            _swap_sparse24(model, ckpt.raw, packed)
        if quant_kernels is not False and any("quant" in e for e in packed.values()):
            from squeeze.runtime.quant import install as install_quant

            install_quant(model, ckpt.raw, packed, str(device), force=quant_kernels is True)
        if sparse24 is None and on_cpu:
            candidates += _sparse24_candidates(model, ckpt.raw, packed)
    model.squeeze_runtime = _plan(model, candidates, mode, on_cpu)
    return model.to(device).eval()


def _from_pretrained(ckpt, config, dtype, attn_implementation, trust_remote_code):
    cls = model_class(config, trust_remote_code)
    kwargs = {"dtype": dtype or "auto", "use_safetensors": True, "config": config}  # config.json may be marked
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cls.from_pretrained(str(ckpt.path), trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise SqueezeError(f"{ckpt.path}: cannot load model ({str(e).splitlines()[0][:160]})") from None


def load_dense(ckpt, config, dtype: torch.dtype, attn_implementation: str | None = None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """The plain model of a checkpoint with dense keys (a packed export through
    :class:`~squeeze.formats.DenseView`), through the lazy loader: no run-time state, exactly the
    stored weights (what recover trains and what a compressed export decodes to)."""
    from squeeze.modeling import WeightMap, build_skeleton

    model = build_skeleton(config, trust_remote_code, attn_implementation or "sdpa")
    WeightMap(model, ckpt).materialize(model, "", dtype)
    as_loaded(model)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    except (OSError, ValueError):
        pass
    return model


def _plan(model, candidates, mode: str, on_cpu: bool) -> dict:
    """Every run-time's sparse-or-dense decision (:mod:`squeeze.runtime.plan`). Off the CPU the
    run-time modules keep their device dispatch (Triton where there is a kernel) unless a path is
    forced."""
    from squeeze.runtime import act_sparse, drelu
    from squeeze.runtime.plan import plan, summary

    fast = drelu.fast_mlps(model)
    # down_proj inside a chunk-sparse FFN never runs its own forward at decode: nothing to plan
    inside = {id(m) for mlp in fast.values() for m in mlp.modules()}
    candidates = candidates + drelu.plan_candidates(model) + act_sparse.plan_candidates(model, skip=inside)
    if not candidates:
        return {"mode": mode, "decisions": [], "summary": {}}
    if not on_cpu and mode == "auto":
        return {"mode": mode, "decisions": [], "summary": {}, "note": "not planned off the CPU"}
    decisions = plan(candidates, mode)
    return {"mode": mode, "threads": torch.get_num_threads(), "decisions": [d.as_dict() for d in decisions],
            "summary": summary(decisions)}


def _packed_24(model, packed) -> dict:
    from squeeze.formats import packed_modules

    # 2:4 with quantized values: the quant run-time's (runtime.quant), or decoded
    return {name: e for name, e in packed_modules(model, packed).items() if "quant" not in e and "meta" in e}


def _sparse24_linear(model, ckpt, name, p):
    from squeeze.runtime.sparse24 import Sparse24Linear

    old = model.get_submodule(name)
    values = ckpt.get(p["values"]).to(old.weight.dtype)
    return Sparse24Linear(values, ckpt.get(p["meta"]), None if old.bias is None else old.bias.data,
                          p["shape"][1], transposed=p["transposed"])


def _swap_sparse24(model, ckpt, packed) -> None:
    from squeeze.runtime.swap import replace_linear

    for name, p in _packed_24(model, packed).items():
        replace_linear(model, name, _sparse24_linear(model, ckpt, name, p))


def _sparse24_candidates(model, ckpt, packed) -> list:
    """CPU 2:4 linears: the compressed module (``Sparse24Linear``) against the decoded dense
    linear the model already holds, on a seeded random decode token; keyed by shape and dtype."""
    from squeeze.runtime.plan import Candidate
    from squeeze.runtime.swap import replace_linear

    out = []
    for name, p in _packed_24(model, packed).items():
        old = model.get_submodule(name)
        if "forward" in old.__dict__ or "act_sparse" in old._modules:
            # an activation-sparse site's consumer: its own plan chooses between the input-sparse
            # path over these dense rows and the dense kernel; the two are not planned jointly
            continue
        w = old.weight

        def bench(_name=name, _p=p, _old=old):
            new = _sparse24_linear(model, ckpt, _name, _p)
            x = torch.randn(1, 1, _p["shape"][1], generator=torch.Generator().manual_seed(0)).to(_old.weight.dtype)
            return (lambda: new(x)), (lambda: _old(x))

        def apply(path, _name=name, _p=p):
            if path == "sparse":
                replace_linear(model, _name, _sparse24_linear(model, ckpt, _name, _p))

        key = ("x".join(map(str, w.shape)), str(w.dtype).removeprefix("torch."),
               "conv1d" if p["transposed"] else "linear", "tokens=1")
        out.append(Candidate("sparse24", key, bench, apply))
    return out
