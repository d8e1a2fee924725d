"""The one seam between squeeze and the parts of transformers that move between releases.

squeeze uses transformers' stable public API freely (``from_pretrained``, configs, tokenizers,
``generate``, ``Cache.get_seq_length``, the ``Auto*`` classes). Everything else it needs -- the
name of the KV-cache argument, cache cropping and layouts, mask builders, rotary signatures,
private attributes -- goes through this module and nowhere else, each function naming what it
relies on and since which release. When an upstream release breaks squeeze, this file is where
the fix belongs (``make test-latest`` runs the suite against the newest releases with their
deprecation warnings turned into errors, to see it coming).

Tested range: ``transformers`` as bounded in ``pyproject.toml`` (both ends run the whole suite:
``make test`` on the lock, ``make test-oldest`` on the floor).
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import torch
from packaging.version import Version
from torch import nn

from squeeze.errors import SqueezeError

# The installed release, read from its metadata: importing this module must not import
# transformers (a compress sweep of a plain Llama never does, squeeze.plain_llama); every function
# below that needs it imports it itself.
TRANSFORMERS_VERSION = Version(version("transformers"))

# 5.24 renamed the KV-cache argument of every model / decoder layer / mask builder, and the field
# of every model output, from `past_key_values` to `cache` (the old names are kept with a
# FutureWarning until 5.40). All models renamed in the same release, so the version decides.
CACHE_ARG = "cache" if TRANSFORMERS_VERSION.release >= (5, 24) else "past_key_values"
_CACHE_ARGS = ("cache", "past_key_values")


# -- the KV cache ----------------------------------------------------------------------------------
def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for a model / decoder layer / mask builder call, under this release's name."""
    return {CACHE_ARG: cache}


def pop_cache(kwargs: dict):
    """Remove the cache from a forward's ``**kwargs`` under either name (a replacement forward
    must accept what the caller of this release passes). Returns it, or None."""
    found = [kwargs.pop(k) for k in _CACHE_ARGS if k in kwargs]
    found = [c for c in found if c is not None]
    if len(found) > 1:
        raise SqueezeError("both `cache` and `past_key_values` were given; pass one")
    return found[0] if found else None


def output_cache(output):
    """The cache a model output carries (field ``cache`` since 5.24, ``past_key_values`` before)."""
    return getattr(output, CACHE_ARG)


def model_output(cls, **fields):
    """Build a transformers ``ModelOutput`` whose cache field is named ``cache``."""
    if "cache" in fields:
        fields[CACHE_ARG] = fields.pop("cache")
    return cls(**fields)


def new_cache(config=None):
    """An empty ``DynamicCache``. With ``config``, sliding-window layers keep only their window
    (what the model itself would build); without, every layer keeps all positions, which is what
    cropping after rejected drafts needs."""
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of a ``DynamicCache``.

    Relies on ``DynamicLayer.crop(n)`` with ``n < 0`` removing ``|n|`` positions: true in every
    5.x release (before 5.16 ``crop`` took an absolute length and read a negative one as a count
    to remove; since 5.16 it takes only the negative count). Layers may hold different lengths."""
    for i, layer in enumerate(cache.layers):
        extra = cache.get_seq_length(i) - length
        if extra > 0:
            layer.crop(-extra)


def layer_kv(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer, each (B, H_kv, T, D). Relies on ``DynamicLayer.keys/.values``
    (public attributes of the dynamic layer since 5.0)."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def gather_positions(cache, layer_idx: int, index: torch.Tensor) -> None:
    """Keep, in each row of one layer's cache, the positions ``index`` (B, K) in that order
    (MustDrop's trimming). Writes ``DynamicLayer.keys/.values`` (since 5.0); the layer's length is
    the tensors' length, so nothing else needs updating for a ``DynamicLayer``."""
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer:  # sliding-window / static layers keep more state than keys/values
        raise SqueezeError(f"cannot trim a {type(layer).__name__} cache layer (needs a DynamicCache without "
                           "a sliding window)")
    g = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
    layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)


def follow_row_ops(cache, select, repeat) -> None:
    """Call ``select(index)`` / ``repeat(n)`` after the cache's own rows are reordered, filtered or
    repeated, so per-row bookkeeping kept beside a cache stays aligned with it.

    Relies on ``generate`` (beam search, contrastive search, assisted decoding) changing the rows
    of a cache only through the public ``Cache.reorder_cache`` / ``batch_select_indices`` /
    ``batch_repeat_interleave`` (5.0 to 5.24). Wraps those methods on this one cache object."""
    for name, follow in (("reorder_cache", select), ("batch_select_indices", select),
                         ("batch_repeat_interleave", repeat)):
        stock = getattr(cache, name, None)
        if stock is None:
            continue

        def both(*args, _stock=stock, _follow=follow, **kwargs):
            out = _stock(*args, **kwargs)
            _follow(*args, **kwargs)
            return out

        setattr(cache, name, both)


# -- masks and rotary embeddings --------------------------------------------------------------------
def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask, cache, position_ids: torch.Tensor,
                *, sliding: bool = False, layer_idx: int | None = None):
    """The mask the model's own forward would pass its (sliding-window) attention layers.

    Relies on ``transformers.masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask``
    taking ``(config, inputs_embeds, attention_mask, cache, position_ids, ..., layer_idx=)``: the
    cache is passed by position because its keyword was renamed in 5.24; ``position_ids`` replaced
    ``cache_position`` in 5.10 and ``layer_idx`` (size the mask on that layer's cache) came in 5.14,
    which is why 5.14 is squeeze's floor."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    fn = create_sliding_window_causal_mask if sliding else create_causal_mask
    return fn(config, inputs_embeds, attention_mask, cache, position_ids=position_ids, layer_idx=layer_idx)


_PER_TYPE_ROTARY: dict[type, bool] = {}


def rotary(rotary_emb: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
    """(cos, sin) from a model's rotary module, each (B, T, D), for the layers of ``layer_type``.

    Relies on ``rotary_emb(x, position_ids)``, or ``rotary_emb(x, position_ids, layer_type)`` for
    modules that keep one table per layer type (Gemma 3, since 5.0), told apart by signature."""
    kind = type(rotary_emb)
    if kind not in _PER_TYPE_ROTARY:
        _PER_TYPE_ROTARY[kind] = "layer_type" in inspect.signature(rotary_emb.forward).parameters
    if _PER_TYPE_ROTARY[kind]:
        return rotary_emb(x, position_ids, layer_type)
    return rotary_emb(x, position_ids)


def run_decoder_layer(layer: nn.Module, hidden: torch.Tensor, *, attention_mask, position_ids: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor], cache, **kwargs) -> torch.Tensor:
    """One decoder layer called as the model's own forward calls it; returns its hidden states.

    Relies on the decoder layers of the rotary families taking ``(hidden_states, attention_mask=,
    position_ids=, position_embeddings=(cos, sin), <cache>=, use_cache=)`` (5.0 to 5.24; the cache
    keyword renamed in 5.24) and returning the hidden states (a tuple whose first item they are
    in older releases)."""
    out = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                position_embeddings=position_embeddings, use_cache=cache is not None, **cache_kwargs(cache),
                **kwargs)
    return out[0] if isinstance(out, tuple) else out


def attn_implementation(config) -> str:
    """The attention implementation a loaded model runs (``config._attn_implementation``, the
    value ``from_pretrained(attn_implementation=...)`` resolved; no public getter in 5.x)."""
    return getattr(config, "_attn_implementation", None) or "eager"


# -- building models --------------------------------------------------------------------------------
def auto_class_for(config) -> type | None:
    """The causal-LM class for ``config`` if transformers has one, else its base-model class, else
    None. Uses the public ``MODEL_FOR_CAUSAL_LM_MAPPING`` / ``MODEL_MAPPING`` tables."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    return None


def auto_model_targets(auto: type, config) -> tuple[type, ...]:
    """The model classes auto class ``auto`` builds for ``config`` (its ``_model_mapping``, the
    table ``from_pretrained`` itself consults), or () when it has none."""
    try:
        found = auto._model_mapping[type(config)]
    except KeyError:
        return ()
    return tuple(found) if isinstance(found, (list, tuple)) else (found,)


def config_from_dict(config: dict, name_or_path: str):
    """The transformers config object of a ``config.json`` dict (public: ``AutoConfig.for_model``
    names the class for ``model_type``; ``from_dict`` builds it as ``from_pretrained`` would)."""
    from transformers import AutoConfig

    cls = type(AutoConfig.for_model(config["model_type"]))
    out = cls.from_dict(config)
    out._name_or_path = name_or_path
    return out


def instantiate(cls, config, attn: str) -> nn.Module:
    """``cls(config)`` running attention implementation ``attn`` (public: the constructor and
    ``set_attn_implementation``, since 5.0)."""
    model = cls(config)
    if attn_implementation(model.config) != attn:
        model.set_attn_implementation(attn)
    return model


def no_split_modules(model: nn.Module) -> set[str]:
    """Class names transformers treats as indivisible blocks (``_no_split_modules``, the attribute
    ``device_map`` planning reads; set on every PreTrainedModel)."""
    return set(getattr(model, "_no_split_modules", None) or [])


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{tied parameter name: source parameter name}, from ``_tied_weights_keys`` (a dict
    {target: source} since 5.0; a list of targets tied to the input embeddings before)."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return dict(keys)
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if inp is None:
        return {}
    src = next(n for n, m in model.named_modules() if m is inp) + ".weight"
    return {k: src for k in keys}


def checkpoint_renamings(model: nn.Module, keys) -> dict[str, str]:
    """{model parameter name: checkpoint key} for checkpoints saved in a legacy layout that
    transformers renames on load (e.g. LLaVA's ``language_model.model.layers`` ->
    ``model.language_model.layers``). Renamings only, never tensor-changing converters.

    Relies on ``transformers.conversion_mapping.get_model_conversion_mapping`` and
    ``core_model_loading.WeightRenaming`` / ``rename_source_key(key, renamings, converters)``
    (5.0 to 5.24). Called only when a checkpoint's keys do not match the model, so a change
    upstream surfaces here, as this error, and only for such checkpoints."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError as e:
        raise SqueezeError(f"this checkpoint's weight names need transformers' legacy-layout renaming, which "
                           f"transformers {TRANSFORMERS_VERSION} no longer offers ({e}); install a "
                           "transformers release within squeeze's supported range") from None
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return {}
    return {rename_source_key(k, renamings, [])[0]: k for k in keys}


def forward_accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes the keyword ``name`` (e.g. ``use_cache``, which decoders
    take and encoders do not; there is no public flag for it)."""
    params = inspect.signature(module.forward).parameters
    return name in params


def forward_takes_any_keyword(module: nn.Module) -> bool:
    """Whether ``module.forward`` has ``**kwargs`` (LLaVA passes ``use_cache`` on to its language
    model through it)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values())
