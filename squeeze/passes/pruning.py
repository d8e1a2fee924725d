"""Shared base for weight-pruning passes: settings (pattern or sparsity), the OWL layer budget,
DaSS scoring of MLP linears, and the promise recorded in squeeze.json. Subclasses only say how
a linear is observed and pruned (:meth:`PruningPass.observe_linear`, :meth:`PruningPass.prune`).

Composition lives here, so every pruning method gets it:

- ``sparsity_profile: owl`` (Yin et al. 2023, :mod:`squeeze.algorithms.owl`): a dense pre-sweep
  (``survey``) measures each block's outlier ratio of Wanda scores; ``plan`` turns them into
  per-layer sparsities averaging the target.
- ``mlp_scoring: dass`` (Guo et al. 2024, :mod:`squeeze.algorithms.dass`): the MLP's gate/up
  (and fc1) are masked by DaSS scores grouped along the output dimension and down (fc2) by Wanda
  with the intermediate norms; every other linear is pruned by the method itself. The recipe
  name ``dass`` is this option on ``attn_method`` (default wanda).
"""

from __future__ import annotations

import dataclasses

import torch

from squeeze.adapters import Block, Linear
from squeeze.algorithms.dass import down_mask, up_mask
from squeeze.algorithms.owl import allocate, outlier_ratio
from squeeze.calib.stats import ChannelStats
from squeeze.errors import SqueezeError
from squeeze.passes.base import REGISTRY, BlockContext, BlockPass, get_pass, preset
from squeeze.sparsity import check_sparsity, mask_from_scores, parse_pattern, wanda_scores

UP_ROLES = ("gate", "up", "gate_up")


class PruningPass(BlockPass):
    @dataclasses.dataclass
    class Settings(BlockPass.Settings):
        pattern: str | None = None
        sparsity: float | None = None
        strict: bool = False
        sparsity_profile: str | None = None  # None/"uniform", or "owl" (unstructured only)
        owl_m: float | None = None  # OWL outlier threshold: score > owl_m x mean (default 5)
        owl_lambda: float | None = None  # OWL spread: per-layer sparsity within s ± owl_lambda (default 0.08)
        mlp_scoring: str | None = None  # None, or "dass": DaSS masks for the MLP linears

    def validate(self) -> None:
        s = self.settings
        if (s.pattern is None) == (s.sparsity is None):
            raise SqueezeError(f"{self.name}: give exactly one of pattern (e.g. 2:4) or sparsity (e.g. 0.5)")
        self.nm = parse_pattern(s.pattern) if s.pattern is not None else None
        if s.sparsity is not None:
            s.sparsity = check_sparsity(s.sparsity)
        if s.sparsity_profile not in (None, "uniform", "owl"):
            raise SqueezeError(f"{self.name}: bad sparsity_profile {s.sparsity_profile!r}: use uniform or owl")
        if s.mlp_scoring not in (None, "dass"):
            raise SqueezeError(f"{self.name}: bad mlp_scoring {s.mlp_scoring!r}: use dass (or leave it out)")
        if s.sparsity_profile == "owl":
            if self.nm:
                raise SqueezeError(f"{self.name}: --sparsity-profile owl is for unstructured --sparsity, "
                                   "not N:M patterns")
            self.needs_calibration = True  # the outlier ratios come from calibration activations
        if s.mlp_scoring == "dass":
            self.needs_calibration = True  # the intermediate channel norms
        self.layer_sparsity: list[float] | None = None

    @property
    def wants_survey(self) -> bool:
        return self.settings.sparsity_profile == "owl"

    # -- OWL: survey the dense model, then plan per-layer sparsities --------------------------
    def survey(self, ctx: BlockContext) -> float:
        lins = self.targets(ctx.block)
        if not lins:
            return 0.0
        stats = ctx.input_stats(lins)
        m = 5.0 if self.settings.owl_m is None else float(self.settings.owl_m)
        return outlier_ratio([wanda_scores(lin.weight.float(), stats[lin.name].mean_sq()) for lin in lins], m)

    def plan(self, ratios: list[float]) -> None:
        s = self.settings
        self.layer_sparsity = allocate(ratios, s.sparsity, 0.08 if s.owl_lambda is None else float(s.owl_lambda))
        self.report = {self.name: {"owl_outlier_ratio": [round(r, 6) for r in ratios],
                                   "owl_layer_sparsity": [round(x, 6) for x in self.layer_sparsity]}}

    def sweep_state(self) -> dict:  # OWL's plan comes from the dense pre-sweep, which a resume skips
        return {**super().sweep_state(), "layer_sparsity": self.layer_sparsity}

    def load_sweep_state(self, state: dict) -> None:
        super().load_sweep_state(state)
        self.layer_sparsity = state["layer_sparsity"]

    def per_layer(self) -> dict[str, list]:
        if self.layer_sparsity is None:
            return {}
        rep = self.report.get(self.name, {})
        return {"sparsity (OWL)": rep.get("owl_layer_sparsity"), "outlier ratio": rep.get("owl_outlier_ratio")}

    def results(self) -> dict:
        return {}  # the OWL lists are per layer, nothing scalar

    def sparsity_for(self, linear: Linear) -> float | None:
        """The unstructured target of this linear (its layer's OWL share, or the uniform one)."""
        if self.layer_sparsity is not None:
            return self.layer_sparsity[linear.block_index]
        return self.settings.sparsity

    # -- DaSS: which linear gets which rule ----------------------------------------------------
    def _down_of(self, block: Block) -> Linear | None:
        downs = block.by_role("down")
        return downs[0] if len(downs) == 1 else None

    def dass_rule(self, block: Block, lin: Linear) -> str | None:
        """"up" / "down" when DaSS masks ``lin``, None when the method's own rule prunes it. A
        block whose MLP cannot be matched (no single down whose input is gate/up's output)
        falls back to the own rule."""
        if self.settings.mlp_scoring != "dass":
            return None
        down = self._down_of(block)
        if down is None:
            return None
        if lin.role == "down":
            return "down"
        parts = 2 if lin.role == "gate_up" else 1
        if lin.role in UP_ROLES and lin.out_features == parts * down.in_features:
            return "up"
        return None

    # -- the block-pass protocol --------------------------------------------------------------
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

    def own_observed(self, block: Block) -> list[Linear]:
        """Targets whose inputs the method's own rule needs (all, unless it needs no data)."""
        return [lin for lin in self.targets(block) if self.dass_rule(block, lin) is None]

    def observed(self, block: Block) -> list[Linear]:
        lins = self.own_observed(block)
        down = self._down_of(block)
        if any(self.dass_rule(block, lin) for lin in self.targets(block)) and down not in lins:
            lins = lins + [down]  # the intermediate norms, even when down itself is not pruned
        return lins

    def observe(self, ctx: BlockContext, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> None:
        scratch = ctx.scratch(self)  # keys: linear names (subclasses), "dass", "own"
        if self.settings.mlp_scoring == "dass" and linear.role == "down":
            scratch.setdefault("dass", ChannelStats(x.shape[-1])).update(x)
        if "own" not in scratch:  # targets are fixed for the block: resolve them once, not per batch
            scratch["own"] = {lin.name for lin in self.own_observed(ctx.block)}
        if linear.name in scratch["own"]:
            self.observe_linear(ctx, linear, x)

    def observe_linear(self, ctx: BlockContext, linear: Linear, x: torch.Tensor) -> None:
        """Accumulate what :meth:`prune` needs into ``ctx.scratch(self)``."""

    def prune(self, ctx: BlockContext, linear: Linear) -> torch.Tensor:
        """A bool keep-mask, or the new (pruned) weight, for one linear."""
        raise NotImplementedError

    def decide(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        out = {}
        for lin in self.targets(ctx.block):
            rule = self.dass_rule(ctx.block, lin)
            if rule is None:
                out[lin.name] = self.prune(ctx, lin)
                continue
            norms = ctx.scratch(self)["dass"].mean_sq()
            s, w = self.sparsity_for(lin), lin.weight.float()
            out[lin.name] = down_mask(w, norms, self.nm, s) if rule == "down" else \
                up_mask(w, norms, self.nm, s, parts=2 if lin.role == "gate_up" else 1)
        return out

    def apply(self, ctx: BlockContext, decision: dict[str, torch.Tensor]) -> None:
        for name, d in decision.items():
            lin = ctx.block.linears[name]
            if d.dtype == torch.bool:
                lin.weight.mul_(d.to(lin.weight.dtype))
            else:
                lin.set_weight(d)

    def promise(self) -> dict:
        if self.nm:
            return {"pattern": f"{self.nm[0]}:{self.nm[1]}"}
        return {"sparsity": self.settings.sparsity}

    def promise_for(self, block: Block, linear: Linear) -> dict:
        if self.layer_sparsity is not None:
            target = round(self.sparsity_for(linear), 6)
            return {"sparsity": target, "sparsity_target": target, "sparsity_profile": "owl"}
        p = self.promise()
        if self.nm and self.dass_rule(block, linear) == "up":
            p = {**p, "pattern_axis": "out"}
        return p


class ScorePruningPass(PruningPass):
    """A pruning method that only scores weights; the mask keeps the best per row / N:M group."""

    def scores(self, ctx: BlockContext, linear: Linear) -> torch.Tensor:
        raise NotImplementedError

    def prune(self, ctx: BlockContext, linear: Linear) -> torch.Tensor:
        return mask_from_scores(self.scores(ctx, linear), self.nm, self.sparsity_for(linear))


@preset("dass")
def dass(settings: dict) -> dict:
    """``{pass: dass, attn_method: M, ...}`` = ``{pass: M, mlp_scoring: dass, ...}`` (M: wanda by default)."""
    settings = dict(settings)
    method = str(settings.pop("attn_method", "wanda"))
    cls = get_pass(method)
    if not issubclass(cls, PruningPass):
        raise SqueezeError(f"dass: attn_method {method!r} is not a weight-pruning pass; use e.g. "
                           f"{', '.join(sorted(n for n, c in REGISTRY.items() if issubclass(c, PruningPass)))}")
    return {"pass": method, "mlp_scoring": "dass", **settings}
