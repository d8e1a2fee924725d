"""The one decoder-stack walker, and predictions read at any depth.

- :class:`Stack`: call a contiguous range of decoder layers ``[lo, hi)`` directly, with a shared
  ``DynamicCache``. It mirrors what the model's own ``forward`` does around the layers (rotary
  position embeddings, one causal or sliding-window mask per layer type, sized against the cache
  of the first layer of the range) so that running ``[0, E)`` then ``[E, L)`` gives the same
  numbers as the full forward. Early exit and self-speculative decoding run on it, and so does
  the token-drop runtime (:mod:`squeeze.runtime.token_drop`), which shortens the sequence
  between layers through a ``before_layer`` hook. It supports the rotary decoder-only families
  (llama, mistral, qwen2, qwen3, gemma, gemma3_text, phi3); OPT and GPT-2 add learned position
  embeddings outside the layers and are refused with a clear error.
- :func:`exit_logits`: next-token logits from the hidden state after any layer, through the
  model's own final norm and LM head (the "shared exit head" of LayerSkip / CALM), including
  OPT's ``project_out`` and Gemma's final logit soft-capping.

Early exit and speculative decoding build their cache without a config, so every layer keeps full
keys/values (sliding-window layers are then masked, not truncated): that is what makes cropping
after a rejected draft exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from squeeze.compat import causal_mask, rotary, run_decoder_layer
from squeeze.errors import SqueezeError

# Final norm of each supported causal family, by attribute path on the *ForCausalLM model.
FINAL_NORM_PATHS = ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f",
                    "model.final_layernorm", "gpt_neox.final_layer_norm")
STACK_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (llama family ``model.norm``, OPT
    ``model.decoder.final_layer_norm``, GPT-2 ``transformer.ln_f``)."""
    for path in FINAL_NORM_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise SqueezeError(f"cannot find the final norm of {type(model).__name__}; early exit needs a causal LM "
                       f"(llama, mistral, qwen2, qwen3, gemma, gemma3_text, phi3, opt, gpt2)")


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise SqueezeError(f"{type(model).__name__} has no LM head: early exit and speculative decoding need a "
                           "causal LM (…ForCausalLM)")
    return head


def exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from a (pre-norm) residual-stream hidden state, through the shared final norm and head."""
    h = final_norm(model)(hidden)
    proj = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
    if proj is not None:  # OPT with word_embed_proj_dim != hidden_size
        h = proj(h)
    logits = lm_head(model)(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def block_output(out):
    """The hidden states a block's forward returned (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def layer_outputs(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the model once; return the residual stream after every block and the final logits.
    Works for every causal arch (forward hooks on the blocks), with or without grad."""
    from squeeze.adapters import Adapter

    blocks = Adapter(model).blocks
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(block_output(o))) for b in blocks]
    try:
        logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits


@dataclass
class LayerInputs:
    """What one decoder layer is called with besides the hidden states."""

    mask: object  # what the attention implementation takes (a tensor, or None when causal is implied)
    position_ids: torch.Tensor  # (B, T)
    rotary: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B or 1, T, head_dim)


class Stack:
    """The one walker over the decoder layers of a rotary decoder-only LM.

    ``Stack(model)`` takes a causal LM of :data:`STACK_TYPES` (early exit, self-speculative
    decoding); ``Stack(model, decoder=...)`` takes a bare decoder whose caller has checked it
    (the language model of a LLaVA-family model, for token dropping); :meth:`head` then does
    not apply."""

    def __init__(self, model: nn.Module, decoder: nn.Module | None = None):
        cfg = model.config if decoder is None else decoder.config
        if decoder is None:
            decoder = getattr(model, "model", None)
            if cfg.model_type not in STACK_TYPES or decoder is None or not all(
                    hasattr(decoder, a) for a in ("embed_tokens", "layers", "rotary_emb")):
                raise SqueezeError(f"layer-range decoding supports {', '.join(STACK_TYPES)}; "
                                   f"got model_type {cfg.model_type!r}")
        self.model, self.base, self.config = model, decoder, cfg
        self.layers = decoder.layers
        self.num_layers = len(self.layers)
        lt = getattr(cfg, "layer_types", None)
        if lt:
            self.types = list(lt)[: self.num_layers]
        else:  # mistral / phi3 style: one mask kind for all layers, sliding when a window is set
            kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
            self.types = [kind] * self.num_layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids)

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm (what its own forward returns as ``last_hidden_state``)."""
        return self.base.norm(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return exit_logits(self.model, hidden)

    def run(self, h: torch.Tensor, lo: int, hi: int, position_ids: torch.Tensor, cache, *, attention_mask=None,
            before_layer: Callable[[int, torch.Tensor, LayerInputs], tuple[torch.Tensor, LayerInputs]] | None = None,
            **layer_kwargs) -> torch.Tensor:
        """Hidden states after layers ``[lo, hi)`` given the input of layer ``lo``, as the model's
        own forward computes them: one causal (or sliding-window) mask and one rotary table per
        layer type, built once for the whole range. Every layer in the range must hold the same
        number of cached positions (the masks are sized on ``lo``). ``attention_mask``: an optional
        (B, cached + T) 2-D padding mask. ``before_layer(i, h, inputs)`` may replace the hidden
        states and the inputs of layer ``i`` (the token-drop runtime shortens the sequence there);
        ``layer_kwargs`` go to every layer call."""
        if hi <= lo:
            return h
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        kinds = set(self.types[lo:hi])
        masks = {k: causal_mask(self.config, h, attention_mask, cache, position_ids,
                                sliding=k == "sliding_attention", layer_idx=lo) for k in kinds}
        pos = {k: rotary(self.base.rotary_emb, h, position_ids, k) for k in kinds}
        for i in range(lo, hi):
            k = self.types[i]
            inputs = LayerInputs(masks[k], position_ids, pos[k])
            if before_layer is not None:
                h, inputs = before_layer(i, h, inputs)
            h = run_decoder_layer(self.layers[i], h, attention_mask=inputs.mask, position_ids=inputs.position_ids,
                                  position_embeddings=inputs.rotary, cache=cache, **layer_kwargs)
        return h
