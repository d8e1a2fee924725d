"""What plain transformers sees of an export whose numbers need squeeze at load time.

Packed weights, WINA's transform, dReLU, activation thresholds and token dropping all load
*silently wrong* as a plain model: the tensors fit, the outputs are garbage. Such an export is
marked in ``config.json``: ``model_type`` becomes ``"squeeze"``, the model's own config moves under
``squeeze_base_config`` (its model type beside it as ``squeeze_base_model_type``: a nested dict
with the model's type would be picked up by ``LlamaConfig.from_pretrained`` and load the skeleton),
and ``layer_types`` names no layer type (with a ``num_hidden_layers`` of 1 beside it, so that
composite configs such as LLaVA's, which have no layer count of their own, check it too).

- Without squeeze, the auto classes stop with "The checkpoint you are trying to load has model
  type `squeeze` but Transformers does not recognize this architecture", and a model class used
  directly (``LlamaForCausalLM.from_pretrained``, with any keyword arguments) stops while reading
  the config, before building anything: every transformers config validates ``layer_types``
  against the known layer types ("The `layer_types` entries must be in (...) but got
  ['needs_squeeze...']"; transformers' ``PreTrainedConfig.validate_layer_type``, checked by
  tests/test_autoload.py). (An ``attn_implementation`` that names nothing, the mark before this
  one, is overridden by an ``attn_implementation=`` argument, and the model class then built a
  default-sized skeleton from a config without the model's dimensions: a 7B Llama's worth of
  memory.)
- After ``import squeeze``, ``AutoConfig`` and every ``AutoModel*`` class know the type and hand
  the folder to :func:`squeeze.load`, so ``AutoModelForCausalLM.from_pretrained(out)`` (and
  sentence-transformers on top of ``AutoModel``) gives exactly ``squeeze.load(out)``.

Why not ``quantization_config: {quant_method: "squeeze"}`` and a registered HfQuantizer?
transformers 5.24 treats an unknown ``quant_method`` as a log warning ("we will skip the
quantization") and loads the skeleton anyway, which is the silent failure this module exists to
prevent; an unknown ``model_type`` is an error.

Exports whose weights say everything (dense-format pruning, recover, layer drop, LayerSkip) keep
their own ``model_type`` and load anywhere.
"""

from __future__ import annotations

from pathlib import Path

from squeeze.errors import SqueezeError

MODEL_TYPE = "squeeze"
BASE_KEY = "squeeze_base_config"
BASE_TYPE_KEY = "squeeze_base_model_type"
NO_LAYER_TYPE = "needs_squeeze__import_squeeze_then_AutoModel_or_squeeze_load"
NOTE = ("this export needs squeeze at load time (pip install squeeze; then `import squeeze` before "
        "transformers' AutoModel*.from_pretrained, or squeeze.load)")


def needs_squeeze(record: dict) -> bool:
    """Whether loading the export this record describes needs squeeze: packed weights, or a
    method with run-time state (see :mod:`squeeze.runtime.spec`)."""
    from squeeze.runtime.spec import needs_runtime

    if (record.get("format") or {}).get("linears"):
        return True
    return any(needs_runtime(e.get("pass")) for e in record.get("passes") or [])


def loads_with(record: dict) -> str:
    """What loads the export this record describes, as the reports say it."""
    if needs_squeeze(record):
        return "squeeze"
    if (record.get("format") or {}).get("kind") == "compressed-tensors":  # see squeeze.export_ct
        return "transformers + compressed-tensors"
    return "transformers"


def mark(config: dict, record: dict) -> dict:
    """The ``config.json`` to write for an export with this record."""
    config = unmark(config)
    if not needs_squeeze(record):
        return config
    base = {k: v for k, v in config.items() if k != "model_type"}
    return {"model_type": MODEL_TYPE, "architectures": config.get("architectures"), "squeeze_note": NOTE,
            "layer_types": [NO_LAYER_TYPE], "num_hidden_layers": 1, BASE_TYPE_KEY: config.get("model_type"), BASE_KEY: base}


def unmark(config: dict) -> dict:
    """The model's own config from a (possibly marked) ``config.json``."""
    if config.get("model_type") == MODEL_TYPE:
        base = config.get(BASE_KEY)
        if not isinstance(base, dict) or not config.get(BASE_TYPE_KEY):
            raise SqueezeError(f"config.json has model_type {MODEL_TYPE!r} but no {BASE_KEY!r} / {BASE_TYPE_KEY!r}: "
                               "a broken export; export it again")
        return {"model_type": config[BASE_TYPE_KEY], **base}
    return config


# -- transformers side ------------------------------------------------------------------------
_registered = False


def auto_model_classes() -> dict[str, type]:
    """transformers' public ``AutoModel*`` classes by name. (Runs while transformers finishes
    importing, so it must not import squeeze.compat, which imports transformers.)"""
    import transformers

    out = {}
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        try:
            cls = getattr(transformers, name)
        except Exception:  # noqa: BLE001 (an auto class whose optional backend is missing: not ours to load)
            continue
        if isinstance(cls, type) and hasattr(cls, "register") and hasattr(cls, "from_pretrained"):
            out[name] = cls
    return out


def register() -> None:
    """Teach transformers' auto classes the ``squeeze`` model type (idempotent). ``import squeeze``
    arranges for this to run as soon as transformers is imported (public APIs only:
    ``AutoConfig.register`` and ``AutoModel*.register``)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig, PretrainedConfig

    class SqueezeConfig(PretrainedConfig):
        model_type = MODEL_TYPE

        def validate_layer_type(self):  # the mark's layer_types is there to stop every other config
            pass

    AutoConfig.register(MODEL_TYPE, SqueezeConfig, exist_ok=True)
    for name, auto in auto_model_classes().items():
        loader = type(f"Squeeze{name.removeprefix('Auto')}", (_Loader,),
                      {"config_class": SqueezeConfig, "auto_class": auto})
        try:
            auto.register(SqueezeConfig, loader, exist_ok=True)
        except (ValueError, AttributeError, TypeError):  # an auto class with its own rules: leave it
            continue


class _Loader:
    """Stands in for a model class in one auto mapping: ``from_pretrained`` is squeeze.load."""

    auto_class: type  # the transformers auto class this stand-in is registered in

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        return load_for_auto(path, cls.auto_class, **kwargs)


def load_for_auto(path, auto: type, **kwargs):
    """``squeeze.load`` for ``<auto>.from_pretrained(path, **kwargs)``: the same model, or its
    base model for ``AutoModel`` (as transformers gives), or a clear refusal for another head."""
    from squeeze.compat import auto_model_targets
    from squeeze.loading import load

    folder = _local_folder(path, kwargs)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    device = kwargs.get("device_map")
    model = load(folder, dtype=None if dtype in (None, "auto") else dtype,
                 device=device if isinstance(device, str) and device != "auto" else "cpu",
                 trust_remote_code=bool(kwargs.get("trust_remote_code")),
                 attn_implementation=kwargs.get("attn_implementation"))
    wanted = auto_model_targets(auto, model.config)  # the loaded model's own (unmarked) config
    if wanted and isinstance(model, wanted):
        return model
    base = getattr(model, "base_model", None)
    if auto.__name__ == "AutoModel" and base is not None and (not wanted or isinstance(base, wanted)):
        return base
    raise SqueezeError(f"{folder} is a squeeze export of a {type(model).__name__}; {auto.__name__} cannot load it: "
                       "use the auto class for that head, or squeeze.load")


def _local_folder(path, kwargs) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                                  local_files_only=bool(kwargs.get("local_files_only")), token=kwargs.get("token")))
