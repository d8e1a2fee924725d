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
        sparsity_profile: str | None = None  # None/"uniform", or "owl" (unstructured only)
        owl_m: float | None = None  # OWL outlier threshold: score > owl_m x mean (default 5)
        owl_lambda: float | None = None  # OWL spread: per-layer sparsity within s ± owl_lambda (default 0.08)

    def validate(self) -> None:
        s = self.settings
        if (s.pattern is None) == (s.sparsity is None):
            raise SqueezeError(f"{self.name}: give exactly one of pattern (e.g. 2:4) or sparsity (e.g. 0.5)")
        self.nm = parse_pattern(s.pattern) if s.pattern is not None else None
        if s.sparsity is not None:
            s.sparsity = check_sparsity(s.sparsity)
        if s.sparsity_profile not in (None, "uniform", "owl"):
            raise SqueezeError(f"{self.name}: bad sparsity_profile {s.sparsity_profile!r}: use uniform or owl")
        if s.sparsity_profile == "owl":
            if self.nm:
                raise SqueezeError(f"{self.name}: --sparsity-profile owl is for unstructured --sparsity, "
                                   "not N:M patterns")
            self.needs_calibration = True  # the outlier ratios come from calibration activations
        self.layer_sparsity: list[float] | None = None

    def setup(self, run) -> None:
        super().setup(run)
        if self.settings.sparsity_profile == "owl":
            from squeeze.passes._owl import allocate, dense_outlier_ratios

            s = self.settings
            ratios = dense_outlier_ratios(run, self, 5.0 if s.owl_m is None else float(s.owl_m))
            self.layer_sparsity = allocate(ratios, s.sparsity, 0.08 if s.owl_lambda is None else float(s.owl_lambda))
            self.report = {self.name: {"owl_outlier_ratio": [round(r, 6) for r in ratios],
                                       "owl_layer_sparsity": [round(x, 6) for x in self.layer_sparsity]}}

    def sparsity_for(self, linear: Linear) -> float | None:
        """The unstructured target of this linear (its layer's OWL share, or the uniform one)."""
        if self.layer_sparsity is not None:
            return self.layer_sparsity[linear.block_index]
        return self.settings.sparsity

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
        return mask_from_scores(self.scores(block, linear), self.nm, self.sparsity_for(linear))

    def apply(self, block: Block, linear: Linear, mask: torch.Tensor) -> None:
        linear.weight.mul_(mask.to(linear.weight.dtype))

    def promise(self) -> dict:
        if self.nm:
            return {"pattern": f"{self.nm[0]}:{self.nm[1]}"}
        return {"sparsity": self.settings.sparsity}

    def promise_for(self, linear: Linear) -> dict:
        if self.layer_sparsity is not None:
            target = round(self.sparsity_for(linear), 6)
            return {"sparsity": target, "sparsity_target": target, "sparsity_profile": "owl"}
        return self.promise()
