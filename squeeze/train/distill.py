"""A teacher/student pair scored by the losses of :mod:`squeeze.train.losses`.

Causal LMs: KL(teacher || student) of the next-token distributions, averaged over the real
(unpadded) tokens. Encoders (no LM head): a weighted sum of ``terms`` on the hidden states,
``last`` (relative MSE of the last hidden state), ``layers`` (mean relative MSE of every block's
output) and ``pooled`` (1 − cosine of the mean-pooled embeddings).
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze import progress
from squeeze.train.batches import collate
from squeeze.train.losses import kl_per_token, layerwise_relative_mse, masked_mean, pooled_cosine_loss, relative_mse


class Distiller:
    def __init__(self, student: nn.Module, teacher: nn.Module, kind: str = "causal",
                 terms: dict[str, float] | None = None):
        self.student, self.teacher, self.kind = student, teacher, kind
        self.terms = terms or {"last": 1.0}

    def _outputs(self, model, ids, mask):
        extra = {} if mask is None else {"attention_mask": mask}
        if self.kind == "causal":
            return model(input_ids=ids, use_cache=False, **extra).logits
        out = model(input_ids=ids, output_hidden_states=True, **extra)
        last = getattr(out, "last_hidden_state", None)
        return out.hidden_states, out.hidden_states[-1] if last is None else last

    def loss(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of the batch ``ids`` (B, T) (``mask``: attention mask, padding ignored);
        differentiable w.r.t. the student."""
        with torch.no_grad():
            t = self._outputs(self.teacher, ids, mask)
        s = self._outputs(self.student, ids, mask)
        if self.kind == "causal":
            return masked_mean(kl_per_token(t, s), mask)
        (t_states, t_last), (s_states, s_last) = t, s
        total = 0.0
        for term, w in self.terms.items():
            if term == "last":
                value = relative_mse(t_states[-1], s_states[-1], mask)
            elif term == "layers":  # hidden_states[0] is the (frozen) embedding output: blocks only
                value = layerwise_relative_mse(t_states[1:], s_states[1:], mask)
            else:
                value = pooled_cosine_loss(t_last, s_last, mask)
            total = total + w * value
        return total

    @torch.no_grad()
    def mean_loss(self, samples: list[torch.Tensor], batch_size: int, pad_id: int = 0) -> float:
        """Token-weighted mean loss over every sample."""
        total, count = 0.0, 0
        with progress.phase("loss over the data", total=len(samples), unit="row") as shown:
            for i in range(0, len(samples), batch_size):
                ids, mask = collate(samples[i:i + batch_size], pad_id)
                n = ids.numel() if mask is None else int(mask.sum())
                total += float(self.loss(ids, mask)) * n
                count += n
                shown.advance(len(samples[i:i + batch_size]))
        return total / max(count, 1)
