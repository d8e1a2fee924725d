"""Distillation losses as pure tensor functions: (teacher, student[, attention mask]) -> loss.

Padding positions (``mask == 0``) never count in any of them.
"""

from __future__ import annotations

import torch


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats, per position. logits: (..., V) -> (...)."""
    logp = torch.log_softmax(teacher_logits.float(), -1)
    logq = torch.log_softmax(student_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-position ``values`` (B, T) over the positions where ``mask`` is nonzero."""
    if mask is None:
        return values.mean()
    m = (mask != 0).to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def relative_mse(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖h_s − h_t‖² / ‖h_t‖² over the whole batch (a scalar); with ``mask`` (B, T) only the
    positions where it is nonzero count (padding is ignored)."""
    t, s = teacher_hidden.float(), student_hidden.float()
    if mask is not None:
        m = (mask != 0).to(t.dtype)[..., None]
        t, s = t * m, s * m
    return ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)


def layerwise_relative_mse(teacher_states, student_states, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of :func:`relative_mse` of each block's output hidden state (the
    intermediate-layer distillation of TinyBERT, Jiao et al. 2020, "TinyBERT: Distilling BERT for
    Natural Language Understanding", with a relative instead of a plain MSE so every block
    counts equally whatever its scale). ``*_states``: the per-block outputs, same count."""
    if len(teacher_states) != len(student_states) or not teacher_states:
        raise ValueError(f"{len(teacher_states)} teacher vs {len(student_states)} student hidden states")
    return sum(relative_mse(t, s, mask) for t, s in zip(teacher_states, student_states)) / len(teacher_states)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention-mask-aware mean over tokens (the sentence-transformers pooling): (B, T, H) -> (B, H)."""
    if mask is None:
        return hidden.float().mean(1)
    m = (mask != 0).to(torch.float32)[..., None]
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_cosine_loss(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of 1 − cos(mean-pooled student, mean-pooled teacher): the quantity
    ``squeeze evaluate`` scores encoders by (its ``cosine_mean`` is 1 minus this on its data)."""
    t, s = mean_pool(teacher_hidden, mask), mean_pool(student_hidden, mask)
    return (1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
