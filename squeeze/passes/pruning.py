"""Shared base for weight-pruning passes: settings (pattern or sparsity), mask application and
the promise recorded in squeeze.json. Subclasses only say how a weight is scored."""

from __future__ import annotations

import dataclasses

import torch

from squeeze.adapters import Block, Linear
from squeeze.errors import SqueezeError
from squeeze.passes.base import Pass
from squeeze.sparsity import check_sparsity, mask_from_scores, parse_pattern


class PruningPass(Pass):
    @dataclasses.dataclass
    class Settings(Pass.Settings):
        pattern: str | None = None
        sparsity: float | None = None
        strict: bool = False

    def validate(self) -> None:
        s = self.settings
        if (s.pattern is None) == (s.sparsity is None):
            raise SqueezeError(f"{self.name}: give exactly one of pattern (e.g. 2:4) or sparsity (e.g. 0.5)")
        self.nm = parse_pattern(s.pattern) if s.pattern is not None else None
        if s.sparsity is not None:
            s.sparsity = check_sparsity(s.sparsity)

    def targets(self, block: Block) -> list[Linear]:
        lins = super().targets(block)
        if self.nm and self.settings.strict:
            for lin in lins:
                if lin.in_features % self.nm[1]:
                    raise SqueezeError(
                        f"{lin.name}: input dimension {lin.in_features} is not a multiple of {self.nm[1]} "
                        f"(--strict); drop --strict to keep the trailing partial group dense, or --ignore it"
                    )
        return lins

    def scores(self, block: Block, linear: Linear) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, block: Block, linear: Linear) -> torch.Tensor:
        return mask_from_scores(self.scores(block, linear), self.nm, self.settings.sparsity)

    def apply(self, block: Block, linear: Linear, mask: torch.Tensor) -> None:
        linear.weight.mul_(mask.to(linear.weight.dtype))

    def promise(self) -> dict:
        if self.nm:
            return {"pattern": f"{self.nm[0]}:{self.nm[1]}"}
        return {"sparsity": self.settings.sparsity}
