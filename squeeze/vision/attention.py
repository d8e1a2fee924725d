"""Attention probabilities a decoder layer would compute, recomputed for scoring tokens.

Dropping rules rank image tokens by the attention that text queries pay them at a boundary
layer: that layer's input norm, q/k projections (and q/k norms where the model has them) and
rotary embedding applied to the *current* hidden states, a causal softmax over all valid keys,
averaged over heads. Nothing here changes the model.
"""

from __future__ import annotations

import torch

from squeeze.errors import SqueezeError


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention averaged over heads.

    q: (B, H, Q, D) queries, k: (B, H, N, D) keys (already repeated for grouped-query heads),
    allowed: (B, Q, N) bool (causal and validity). Returns (B, Q, N), each row summing to 1
    over its allowed keys.
    """
    assert q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1], (q.shape, k.shape)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Q, N)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0).mean(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al., "RoFormer", 2021) in the half-split layout of the
    Llama / Mistral / Qwen families: x (B, H, N, D), cos/sin (B, N, D) from the model's own
    rotary module (so its frequency scaling is included). Returns (B, H, N, D)."""
    assert x.shape[-1] == cos.shape[-1] == sin.shape[-1], (x.shape, cos.shape)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def layer_attention(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_rows: torch.Tensor,
                    key_valid: torch.Tensor, key_order: torch.Tensor) -> torch.Tensor:
    """Head-mean attention of selected query rows over all rows, as ``layer`` would compute it.

    hidden: (B, N, C) the layer's input; cos/sin: (B, N, Dh) rotary tables of those rows;
    query_rows: (B, Q) indices of the query rows; key_valid: (B, N) bool; key_order: (B, N)
    original sequence index of every row (the causal order). Returns (B, Q, N).
    """
    attn = layer.self_attn
    B, N, _ = hidden.shape
    hd = attn.head_dim
    x = layer.input_layernorm(hidden)
    xq = x.gather(1, query_rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, Q, C)
    q = attn.q_proj(xq).view(B, xq.shape[1], -1, hd)
    k = attn.k_proj(x).view(B, N, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, Q, D), (B, Hkv, N, D)
    if cos.shape[-1] != hd:
        raise SqueezeError(f"vision-token scoring needs rotary over the whole head ({hd} dims); this model rotates "
                           f"{cos.shape[-1]} (partial rotary is not supported)")
    take = query_rows[..., None].expand(-1, -1, cos.shape[-1])
    q = apply_rotary(q, cos.gather(1, take), sin.gather(1, take))
    k = apply_rotary(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    q_order = key_order.gather(1, query_rows)  # (B, Q)
    allowed = key_valid[:, None, :] & (key_order[:, None, :] <= q_order[:, :, None])
    return head_mean_probs(q, k, attn.scaling, allowed)
