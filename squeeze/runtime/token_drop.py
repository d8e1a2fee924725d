"""A language-model forward that lets image tokens leave the sequence at chosen layers.

:func:`install` swaps two forwards of a LLaVA-family model (instance attributes, the classes
are untouched): the multimodal model's forward notes where the image tokens are (and lets the
policy look at the vision tower), and the language model's forward walks the decoder layers
on the shared walker (:class:`squeeze.runtime.stack.Stack`), whose ``before_layer`` hook is
where the sequence gets shorter. At a policy's boundary layer the policy returns which tokens
to keep; the runtime gathers the kept rows of the hidden states, the ORIGINAL position ids and the rotary tables,
and builds the causal mask of the shortened sequence. Layers after a boundary therefore store
only the kept tokens in their KV cache: ``DynamicCache`` keeps keys/values per layer, so
per-layer lengths may differ. What each stage holds (original index of every slot, whether
the slot is a valid key) is kept by the runtime beside each cache it filled (and follows the
cache's rows through beam search), so every decode step builds one mask per stage and each
layer attends to its own cache. Everything this touches of transformers' cache, masks and
argument names goes through :mod:`squeeze.compat`.

Stage 0 (the layers before the first drop) uses transformers' own mask, so a policy that drops
nothing reproduces the stock model bit for bit. Batches: rows may keep different numbers of
tokens; the shorter rows are filled with dropped tokens marked as invalid keys (they are
computed but never attended to), which keeps one rectangular tensor per stage.

When tokens are dropped, the returned hidden states / logits cover the kept tokens only (in
order; ``runtime.last.kept`` says which), and ``output_hidden_states`` / ``output_attentions``
are not produced. Inputs without image tokens, and sequences whose cache was filled without
dropping, run the stock forward unchanged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from squeeze import compat
from squeeze.errors import SqueezeError
from squeeze.runtime.stack import LayerInputs, Stack
from squeeze.vision.layout import image_token_id


@dataclass
class Seq:
    """The current (possibly shortened) prefill sequence, every tensor (B, n, ...)."""

    hidden: torch.Tensor  # (B, n, C)
    orig: torch.Tensor  # (B, n) original sequence index of each slot
    valid: torch.Tensor  # (B, n) bool: a real token (not padding, not a filler slot)
    image: torch.Tensor  # (B, n) bool: an image token
    protected: torch.Tensor  # (B, n) bool: never dropped (MustDrop's key set)
    position_ids: torch.Tensor  # (B, n)
    cos: torch.Tensor  # (B, n, Dh)
    sin: torch.Tensor
    n_image: torch.Tensor  # (B,) image tokens each row started with

    def take(self, sel: torch.Tensor, keep: torch.Tensor) -> Seq:
        """Rows ``sel`` (B, K), in order; slots whose ``keep`` is False become invalid fillers."""
        def g(t):
            if t.ndim == 2:
                return t.gather(1, sel)
            return t.gather(1, sel[..., None].expand(-1, -1, t.shape[-1]))

        slot_keep = keep.gather(1, sel)
        return Seq(g(self.hidden), g(self.orig), g(self.valid) & slot_keep, g(self.image) & slot_keep,
                   g(self.protected), g(self.position_ids), g(self.cos), g(self.sin), self.n_image)


@dataclass
class Stage:
    first_layer: int
    orig: torch.Tensor  # (B, K) original index of every cached slot of this stage's layers
    valid: torch.Tensor  # (B, K) bool
    exact: bool = False  # the stock transformers mask applies (nothing was removed before it)


@dataclass
class DropState:
    """Kept beside a KV cache: which stage each layer belongs to and what its cache holds."""

    stages: list[Stage]
    layer_stage: list[int]
    total: int  # original tokens seen so far (the next token's original index)


@dataclass
class PrefillRecord:
    """What the last prefill did (for tests, FLOPs and benchmarks)."""

    layer_lengths: list[int]  # rows each layer processed (max over the batch)
    # boundary layer (-1: before the first layer, MustDrop's merge) -> per row, the original
    # indices still in the sequence after it
    kept: dict = field(default_factory=dict)
    n_image: list = field(default_factory=list)


def selection(keep: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> (B, K) sorted indices: every kept slot of each row, K = the largest kept
    count; shorter rows are filled with their first dropped slots (the caller marks them invalid)."""
    n = keep.shape[1]
    ar = torch.arange(n, device=keep.device).expand_as(keep)
    k = int(keep.sum(1).max())
    first = torch.where(keep, ar, ar + n).sort(1).values[:, :k] % n  # kept first, then dropped
    return first.sort(1).values


def causal_allowed(q_orig: torch.Tensor, k_orig: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) bool: key at or before the query in the original order, and a valid key. A query
    with no allowed key (a padding row) may see itself, so no softmax row is empty."""
    allowed = (k_orig[:, None, :] <= q_orig[:, :, None]) & k_valid[:, None, :]
    return allowed | (k_orig[:, None, :] == q_orig[:, :, None]) & ~allowed.any(-1, keepdim=True)


class TokenDropRuntime:
    def __init__(self, model: nn.Module, policy):
        self.model, self.policy = model, policy
        self.vlm = model.model
        self.lm = self.vlm.language_model
        self.config = model.config
        self.text_config = self.lm.config
        self.image_token = image_token_id(model.config)
        impl = compat.attn_implementation(self.text_config)
        if impl not in ("sdpa", "eager"):
            raise SqueezeError(f"vision-token dropping supports sdpa and eager attention, not {impl!r}; load with "
                               "attn_implementation='sdpa'")
        if getattr(self.text_config, "sliding_window", None) and any(
                t != "full_attention" for t in (getattr(self.text_config, "layer_types", None) or ["sliding"])):
            raise SqueezeError("vision-token dropping does not support sliding-window language models yet")
        self.impl = impl
        self.stack = Stack(model, decoder=self.lm)
        self.pending: dict | None = None
        self.last: PrefillRecord | None = None
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> DropState
        self._orig_vlm_forward = self.vlm.forward
        self._orig_lm_forward = self.lm.forward

    # -- hooks into the model ---------------------------------------------------------------
    def vlm_forward(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            mask = input_ids == self.image_token
        elif embeds is not None:  # same test as transformers' get_placeholder_mask
            tok = self.vlm.get_input_embeddings()(torch.tensor(self.image_token, device=embeds.device))
            mask = (embeds == tok).all(-1)
        else:
            mask = None
        self.pending = {"image_mask": mask, "pixel_values": kwargs.get("pixel_values")}
        handles = self.policy.before_vision(self, self.pending) if hasattr(self.policy, "before_vision") else []
        try:
            return self._orig_vlm_forward(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self.pending = None

    def state(self, cache) -> DropState | None:
        """What the caches of a prefill that dropped tokens hold (None for a stock cache)."""
        return self._states.get(cache) if cache is not None else None

    def lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                   use_cache=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        cache = compat.pop_cache(kwargs)  # the caller names it as its transformers release does
        state = self.state(cache)
        image_mask = (self.pending or {}).get("image_mask")
        fresh = cache is None or cache.get_seq_length() == 0
        if state is None and not (fresh and image_mask is not None and bool(image_mask.any())):
            return self._orig_lm_forward(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                                         use_cache=use_cache, **compat.cache_kwargs(cache), **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.stack.embed(input_ids)
        if use_cache is None:
            use_cache = getattr(self.text_config, "use_cache", True)
        if use_cache and cache is None:
            cache = compat.new_cache(self.text_config)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise SqueezeError("vision-token dropping needs a 2-D attention_mask (or none)")
        kwargs.pop("output_hidden_states", None), kwargs.pop("output_attentions", None)
        if state is None:
            hidden = self._prefill(inputs_embeds, attention_mask, position_ids, cache if use_cache else None,
                                   image_mask, kwargs)
        else:
            hidden = self._decode(inputs_embeds, attention_mask, position_ids, cache, state, kwargs)
        return compat.model_output(BaseModelOutputWithPast, last_hidden_state=self.stack.norm(hidden), cache=cache)

    # -- masks ------------------------------------------------------------------------------
    def mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, Q, K) allowed pairs -> the mask the attention implementation takes."""
        allowed = allowed[:, None]  # (B, 1, Q, K)
        if self.impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # -- prefill ----------------------------------------------------------------------------
    def _prefill(self, embeds, attention_mask, position_ids, cache, image_mask, kwargs):
        B, T, _ = embeds.shape
        dev = embeds.device
        if position_ids is None:
            position_ids = torch.arange(T, device=dev)[None].expand(B, T)
        position_ids = position_ids.expand(B, T)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        walk = _PrefillDrops(self, valid, image_mask.to(dev) & valid)
        hidden = self.stack.run(embeds, 0, self.stack.num_layers, position_ids, cache, attention_mask=attention_mask,
                                before_layer=walk, **kwargs)
        self.last = walk.record
        stages = walk.stages
        if cache is not None and (len(stages) > 1 or not stages[0].exact):
            state = DropState(stages, walk.layer_stage, T)
            if getattr(self.policy, "trim_after_prefill", False):
                self._trim(cache, state)
            self._states[cache] = state
            _follow_batch_ops(cache, state)
        return hidden

    def _trim(self, cache, state: DropState) -> None:
        """MustDrop stage 3: after prefill, cut the caches of every layer from the first drop on
        down to the tokens that survived the last drop."""
        final = state.stages[-1]
        for s, stage in enumerate(state.stages[1:-1], start=1):
            idx = torch.searchsorted(stage.orig.contiguous(), final.orig.contiguous())  # (B, K_final)
            for li, ls in enumerate(state.layer_stage):
                if ls != s:
                    continue
                compat.gather_positions(cache, li, idx)
                state.layer_stage[li] = len(state.stages) - 1

    # -- decode -----------------------------------------------------------------------------
    def _decode(self, embeds, attention_mask, position_ids, cache, state: DropState, kwargs):
        B, T, _ = embeds.shape
        dev = embeds.device
        new_orig = (state.total + torch.arange(T, device=dev))[None].expand(B, T)
        if position_ids is None:
            position_ids = new_orig
        position_ids = position_ids.expand(B, T)
        if attention_mask is not None and attention_mask.shape[1] != state.total + T:
            raise SqueezeError("attention_mask does not cover the cached and new tokens")
        new_valid = attention_mask[:, -T:].bool() if attention_mask is not None else \
            torch.ones(B, T, dtype=torch.bool, device=dev)
        masks = []  # per stage; None: the walker's stock mask (nothing was removed before that stage)
        for stage in state.stages:
            stage.orig = torch.cat([stage.orig, new_orig], 1)
            stage.valid = torch.cat([stage.valid, new_valid], 1)
            masks.append(None if stage.exact else self.mask(causal_allowed(new_orig, stage.orig, stage.valid),
                                                            embeds.dtype))
        state.total += T

        def each_layer_its_stage(i, h, inputs):
            mask = masks[state.layer_stage[i]]
            return h, inputs if mask is None else replace(inputs, mask=mask)

        return self.stack.run(embeds, 0, self.stack.num_layers, position_ids, cache, attention_mask=attention_mask,
                              before_layer=each_layer_its_stage, **kwargs)


class _PrefillDrops:
    """The walker's ``before_layer`` hook for one prefill: before layer 0 it sets up the sequence
    (and lets the policy merge tokens, MustDrop's stage 1); at each boundary layer it asks the
    policy which image tokens stay and shortens the sequence; it notes what every layer's cache
    will hold (``stages``, ``layer_stage``) and what the prefill did (``record``)."""

    def __init__(self, runtime: TokenDropRuntime, valid: torch.Tensor, image: torch.Tensor):
        self.runtime, self.policy = runtime, runtime.policy
        self.valid, self.image = valid, image  # (B, T) bool
        self.boundaries = set(self.policy.layers(len(runtime.lm.layers)))
        self.seq: Seq | None = None
        self.mask = None
        self.dtype: torch.dtype | None = None
        self.stages: list[Stage] = []
        self.layer_stage: list[int] = []
        self.record: PrefillRecord | None = None

    def __call__(self, i: int, h: torch.Tensor, inputs: LayerInputs) -> tuple[torch.Tensor, LayerInputs]:
        if self.seq is None:
            self._start(h, inputs)
        else:
            self.seq.hidden = h
        seq = self.seq
        if i in self.boundaries and bool(seq.image.any()):
            with torch.no_grad():
                keep = self.policy.select(self.runtime, i, self.runtime.lm.layers[i], seq)
            keep = keep | ~seq.image  # text (and padding) is never dropped
            # force_compact (tests): rebuild the stage even when nothing is dropped
            if not bool(keep.all()) or getattr(self.policy, "force_compact", False):
                self._compact(i, keep)
        self.layer_stage.append(len(self.stages) - 1)
        self.record.layer_lengths.append(self.seq.hidden.shape[1])
        return self.seq.hidden, LayerInputs(self.mask, self.seq.position_ids, (self.seq.cos, self.seq.sin))

    def _start(self, embeds: torch.Tensor, inputs: LayerInputs) -> None:
        B, T, _ = embeds.shape
        dev = embeds.device
        cos, sin = inputs.rotary
        self.dtype = embeds.dtype
        self.seq = Seq(embeds, torch.arange(T, device=dev).expand(B, T), self.valid, self.image,
                       torch.zeros(B, T, dtype=torch.bool, device=dev), inputs.position_ids, cos.expand(B, -1, -1),
                       sin.expand(B, -1, -1), self.image.sum(1))
        self.record = PrefillRecord([], {}, self.seq.n_image.tolist())
        self.stages = [Stage(0, self.seq.orig, self.seq.valid, exact=True)]
        self.mask = inputs.mask  # transformers' own: a policy that drops nothing reproduces the stock model
        with torch.no_grad():
            keep = self.policy.before_llm(self.runtime, self.seq) if hasattr(self.policy, "before_llm") else None
        if keep is not None and not bool(keep.all()):
            self.stages = []
            self._compact(-1, keep)

    def _compact(self, boundary: int, keep: torch.Tensor) -> None:
        seq = self.seq = self.seq.take(selection(keep), keep)
        self.record.kept[boundary] = [o[v].tolist() for o, v in zip(seq.orig, seq.valid)]
        self.stages.append(Stage(max(boundary, 0), seq.orig, seq.valid))
        self.mask = self.runtime.mask(causal_allowed(seq.orig, seq.orig, seq.valid), self.dtype)


def _follow_batch_ops(cache, state: DropState) -> None:
    """Beam search reorders (and may repeat) the batch rows of the cache; make the per-stage
    bookkeeping follow (instance-level wrappers, this cache object only)."""
    def select(idx, *_, **__):
        for st in state.stages:
            i = idx.to(st.orig.device)
            st.orig, st.valid = st.orig[i], st.valid[i]

    def repeat(repeats, *_, **__):
        for st in state.stages:
            st.orig, st.valid = st.orig.repeat_interleave(repeats, 0), st.valid.repeat_interleave(repeats, 0)

    compat.follow_row_ops(cache, select, repeat)


def install(model: nn.Module, policy) -> TokenDropRuntime:
    """Make ``model`` (a LLaVA-family ``...ForConditionalGeneration``) drop image tokens as
    ``policy`` says, in ``forward`` and ``generate``. Returns the runtime (also at
    ``model.squeeze_token_drop``); :func:`uninstall` restores the stock forwards."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "language_model") or not hasattr(inner.language_model, "layers"):
        raise SqueezeError(f"{type(model).__name__} is not a LLaVA-family model (no model.language_model.layers); "
                           "vision-token dropping needs one")
    if getattr(model, "squeeze_token_drop", None) is not None:
        uninstall(model)
    rt = TokenDropRuntime(model, policy)
    rt.vlm.forward = rt.vlm_forward
    rt.lm.forward = rt.lm_forward
    model.squeeze_token_drop = rt
    return rt


def uninstall(model: nn.Module) -> None:
    rt = getattr(model, "squeeze_token_drop", None)
    if rt is None:
        return
    for m in (rt.vlm, rt.lm):
        m.__dict__.pop("forward", None)
    model.squeeze_token_drop = None
