"""FLOPs of a token-dropping language model: per stage in prefill, and per decode step.

Counted for Llama-style decoder layers (a multiply-add is 2 FLOPs): the linear layers cost
``2 x params`` per token; attention costs ``4 x heads x head_dim`` per (query, key) pair
(QK^T and AV), with causal pairs ``n (n + 1) / 2`` in prefill and ``cache + 1`` keys per
decode step. A boundary's scoring (recomputed q/k and the attention rows the rule needs) is
counted as overhead. The vision tower, projector and embeddings are the same with and without
dropping and are left out; the LM head is counted for one token (what ``generate`` computes).
"""

from __future__ import annotations

import torch

from squeeze.errors import SqueezeError


def layer_costs(text_config) -> dict:
    d = text_config.hidden_size
    h = text_config.num_attention_heads
    hkv = getattr(text_config, "num_key_value_heads", None) or h
    hd = getattr(text_config, "head_dim", None) or d // h
    ff = text_config.intermediate_size
    attn_params = d * h * hd + 2 * d * hkv * hd + h * hd * d
    mlp_params = 3 * d * ff  # gated MLP (Llama / Mistral / Qwen)
    return {"linear": 2 * (attn_params + mlp_params), "pair": 4 * h * hd, "k_proj": 2 * d * hkv * hd,
            "q_proj": 2 * d * h * hd, "score_pair": 2 * h * hd, "lm_head": 2 * d * text_config.vocab_size}


def prefill_flops(text_config, layer_lengths: list[int], score_queries: dict[int, int] | None = None) -> dict:
    """Per stage (a run of layers with the same length) and total prefill FLOPs.

    layer_lengths: tokens each layer processed; score_queries: boundary layer -> query rows the
    drop rule scored there (1 for PyramidDrop's last token, every row for MustDrop)."""
    c = layer_costs(text_config)
    stages, total = [], 0
    for i, n in enumerate(layer_lengths):
        f = c["linear"] * n + c["pair"] * n * (n + 1) // 2
        if not stages or stages[-1]["tokens"] != n:
            stages.append({"first_layer": i, "layers": 0, "tokens": n, "flops": 0})
        stages[-1]["layers"] += 1
        stages[-1]["flops"] += f
        total += f
    overhead = 0
    for layer, q in (score_queries or {}).items():
        n = layer_lengths[layer - 1] if layer > 0 else layer_lengths[0]
        overhead += c["k_proj"] * n + c["q_proj"] * q + c["score_pair"] * q * n
    return {"stages": stages, "layers_flops": total, "scoring_overhead": overhead,
            "total": total + overhead + c["lm_head"]}


def decode_flops(text_config, cache_lengths: list[int]) -> int:
    """FLOPs of one decode step given each layer's cached length before the step."""
    c = layer_costs(text_config)
    return sum(c["linear"] + c["pair"] * (n + 1) for n in cache_lengths) + c["lm_head"]


def synthetic_prompt(config, text_tokens: int = 64, seed: int = 0):
    """input_ids (one image between two halves of random text) and random pixel_values for a
    plain LLaVA config."""
    if getattr(config, "model_type", None) != "llava":
        raise SqueezeError("FLOPs accounting builds a synthetic LLaVA prompt; only model_type 'llava' is supported")
    from squeeze.vision.layout import image_token_id

    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n_img += 1
    g = torch.Generator().manual_seed(seed)
    tok = image_token_id(config)
    vocab = config.text_config.vocab_size
    text = torch.randint(3, vocab, (1, text_tokens), generator=g)
    text[text == tok] = 3
    half = text_tokens // 2
    ids = torch.cat([text[:, :half], torch.full((1, n_img), tok), text[:, half:]], 1)
    pixels = torch.randn(1, vc.num_channels, vc.image_size, vc.image_size, generator=g)
    return ids, pixels


@torch.no_grad()
def flops_report(model, text_tokens: int = 64, seed: int = 0) -> dict:
    """Run one synthetic prefill through ``model`` (with or without a token-drop runtime) and
    report its prefill FLOPs per stage and the FLOPs of the next decode step, next to the same
    model without dropping. Drop decisions of attention-threshold rules depend on the input; the
    input here is random (random pixels, random text)."""
    from squeeze.compat import cache_kwargs, new_cache

    cfg = model.config
    tcfg = cfg.get_text_config()
    ids, pixels = synthetic_prompt(cfg, text_tokens, seed)
    dtype = next(model.parameters()).dtype
    cache = new_cache(tcfg)
    rt = getattr(model, "squeeze_token_drop", None)
    if rt is not None:
        rt.last = None
    model(input_ids=ids, pixel_values=pixels.to(dtype), use_cache=True, **cache_kwargs(cache))
    L = tcfg.num_hidden_layers
    T = ids.shape[1]
    lengths = rt.last.layer_lengths if rt is not None and rt.last is not None else [T] * L
    cached = [cache.get_seq_length(i) for i in range(L)]
    queries = {}
    if rt is not None:
        per = getattr(rt.policy, "score_queries", None)
        for b in rt.policy.layers(L):
            queries[b] = per(lengths[b - 1], text_tokens) if per else 1  # PyramidDrop: the last token
    pre, dense = prefill_flops(tcfg, lengths, queries), prefill_flops(tcfg, [T] * L)
    dec, dec_dense = decode_flops(tcfg, cached), decode_flops(tcfg, [T] * L)
    from squeeze.vision.layout import image_token_id

    n_img = int((ids == image_token_id(cfg)).sum())
    return {"policy": repr(rt.policy) if rt is not None else None, "text_tokens": text_tokens,
            "image_tokens": n_img, "sequence": T, "prefill": pre, "prefill_dense": dense["total"],
            "prefill_ratio": pre["total"] / dense["total"], "decode_step": dec, "decode_step_dense": dec_dense,
            "decode_ratio": dec / dec_dense, "cache_lengths": cached}


def flops_summary(model, text_tokens: int = 64) -> dict:
    """``squeeze eval --flops``: a model folder (loaded with ``squeeze.load``, so its recorded
    token-drop passes apply) or a model -> flat report keys plus the full report under "flops"."""
    if not isinstance(model, torch.nn.Module):
        from squeeze.loading import load

        model = load(model)
    r = flops_report(model, text_tokens)
    stages = "; ".join(f"layers {s['first_layer']}-{s['first_layer'] + s['layers'] - 1}: {s['tokens']} tok"
                       for s in r["prefill"]["stages"])
    return {"flops_image_tokens": r["image_tokens"], "flops_text_tokens": r["text_tokens"], "flops_stages": stages,
            "flops_prefill": r["prefill"]["total"], "flops_prefill_dense": r["prefill_dense"],
            "flops_prefill_ratio": round(r["prefill_ratio"], 4), "flops_decode_step": r["decode_step"],
            "flops_decode_step_dense": r["decode_step_dense"], "flops_decode_ratio": round(r["decode_ratio"], 4),
            "flops": r}
