"""PyramidDrop: rank image tokens at stage boundaries by the last instruction token's attention.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (2024), https://arxiv.org/abs/2410.17247 (reference code:
Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py``). The language model is split into stages
at ``layers``; at the start of each boundary layer the layer's own input norm, q/k projections
and rotary embedding are applied to the current hidden states, the attention that the last
token of the prompt pays every image token is averaged over heads, and the top
``ratio x (original image-token count)`` image tokens are kept in their original order. Text
tokens are never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.errors import SqueezeError
from squeeze.vision.attention import layer_attention


def default_layers(num_layers: int) -> list[int]:
    """Quarters of the stack: e.g. 32 layers -> [8, 16, 24]."""
    return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)} - {num_layers})


def default_ratios(n: int) -> list[float]:
    """Halve the image tokens at every boundary (lambda = 0.5): 0.5, 0.25, 0.125, ..."""
    return [0.5 ** (i + 1) for i in range(n)]


def topk_keep(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, n) scores, (B, n) bool candidates, (B,) counts -> (B, n) bool: per row the ``k``
    highest-scoring candidates (ties: the earlier token). Non-candidates are False."""
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # stable: earlier wins ties
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < k[:, None]) & candidates


def last_token_rows(seq) -> torch.Tensor:
    """(B, 1): index of each row's last valid slot (the last instruction token)."""
    n = seq.valid.shape[1]
    ar = torch.arange(n, device=seq.valid.device).expand_as(seq.valid)
    return torch.where(seq.valid, ar, -1).max(1, keepdim=True).values


@dataclass
class PyramidDropPolicy:
    boundaries: list[int] | None = None  # None: quarters of the stack
    ratios: list[float] | None = None  # keep ratio at each boundary, of the ORIGINAL image-token count

    def __post_init__(self):
        if self.ratios is not None and any(not (0.0 <= r <= 1.0) for r in self.ratios):
            raise SqueezeError(f"pyramiddrop ratios must be in [0, 1], got {self.ratios}")
        if self.boundaries is not None:
            if list(self.boundaries) != sorted(set(self.boundaries)) or any(b < 1 for b in self.boundaries):
                raise SqueezeError(f"pyramiddrop layers must be increasing layer indices >= 1, got {self.boundaries}")
            if self.ratios is not None and len(self.ratios) != len(self.boundaries):
                raise SqueezeError(f"pyramiddrop: {len(self.boundaries)} layers but {len(self.ratios)} ratios; give "
                                   "one keep ratio per layer")

    def plan(self, num_layers: int) -> list[tuple[int, float]]:
        layers = list(self.boundaries) if self.boundaries is not None else default_layers(num_layers)
        if any(b >= num_layers for b in layers):
            raise SqueezeError(f"pyramiddrop layers {layers} exceed the language model's {num_layers} layers")
        ratios = list(self.ratios) if self.ratios is not None else default_ratios(len(layers))
        if len(ratios) != len(layers):
            raise SqueezeError(f"pyramiddrop: {len(layers)} layers but {len(ratios)} ratios")
        return list(zip(layers, ratios))

    def layers(self, num_layers: int) -> list[int]:
        return [b for b, _ in self.plan(num_layers)]

    def scores(self, layer, seq) -> torch.Tensor:
        """(B, n): head-mean attention from the last instruction token to every slot."""
        q = last_token_rows(seq)
        return layer_attention(layer, seq.hidden, seq.cos, seq.sin, q, seq.valid, seq.orig)[:, 0]

    def select(self, runtime, index: int, layer, seq) -> torch.Tensor:
        ratio = dict(self.plan(len(runtime.lm.layers)))[index]
        k = torch.floor(seq.n_image.double() * ratio).long()
        return topk_keep(self.scores(layer, seq), seq.image & seq.valid, k) | ~seq.image
