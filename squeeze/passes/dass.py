"""DaSS: dependency-aware (semi-)structured sparsity for MLPs.

Guo et al. (2024), "Dependency-Aware Semi-Structured Sparsity of GLU Variants in Large Language
Models" (math in :mod:`squeeze.passes._dass_math`). In every block:

- gate / up (GLU MLPs; Phi-3's fused gate_up is rows [0:I) gate, [I:2I) up): score
  |W_ij| · ‖X_int,i‖^(1/2), where X_int,i is intermediate channel i, the input of down's
  column i; groups run along the OUTPUT dimension (unstructured: within each input column;
  N:M: M consecutive output rows of each column, recorded as ``pattern_axis: "out"``).
- down: Wanda scores with the intermediate norms, groups along the input dimension.
- non-gated MLPs (OPT/GPT-2/BERT fc1 -> up, fc2 -> down): the same rule. fc1's row i produces
  intermediate channel i, whose norm is measured at fc2's input, i.e. after the activation
  function, so a neuron that the activation mostly switches off is pruned harder; fc2 is Wanda.
- everything else (attention projections, unknown roles): the pruning pass named by
  ``attn_method`` (default ``wanda``) with the same pattern / sparsity.

If a block's MLP cannot be matched (no single down whose input size equals gate/up's output),
its gate/up fall back to ``attn_method`` as well.
"""

from __future__ import annotations

import dataclasses

from squeeze.adapters import Block, Linear
from squeeze.calib.stats import ChannelStats
from squeeze.errors import SqueezeError
from squeeze.passes._dass_math import down_mask, up_mask
from squeeze.passes.base import get_pass, register
from squeeze.passes.pruning import PruningPass

UP_ROLES = ("gate", "up", "gate_up")


@register
class DaSS(PruningPass):
    name = "dass"

    @dataclasses.dataclass
    class Settings(PruningPass.Settings):
        attn_method: str = "wanda"

    def validate(self) -> None:
        super().validate()
        s = self.settings
        cls = get_pass(s.attn_method)
        if not issubclass(cls, PruningPass) or cls is DaSS:
            raise SqueezeError(f"dass: attn_method {s.attn_method!r} is not a weight-pruning pass; use e.g. wanda, "
                               "sparsegpt or magnitude")
        self.other = cls(pattern=s.pattern, sparsity=s.sparsity, strict=s.strict)

    # -- which linear gets which rule --------------------------------------------------------
    def _down_of(self, block: Block) -> Linear | None:
        downs = block.by_role("down")
        return downs[0] if len(downs) == 1 else None

    def _rule(self, block: Block, lin: Linear) -> str:
        down = self._down_of(block)
        if lin.role == "down" and down is not None:
            return "down"
        if lin.role in UP_ROLES and down is not None:
            parts = 2 if lin.role == "gate_up" else 1
            if lin.out_features == parts * down.in_features:
                return "up"
        return "other"

    # -- protocol ----------------------------------------------------------------------------
    def setup(self, run):
        super().setup(run)
        self.other.setup(run)
        self.other.layer_sparsity = self.layer_sparsity  # OWL shares decided by this pass
        self.stats: dict[str, ChannelStats] = {}

    def observed(self, block):
        lins = self.targets(block)
        down = self._down_of(block)
        if down is not None and down not in lins and any(self._rule(block, x) == "up" for x in lins):
            lins = lins + [down]  # gate/up need the intermediate norms even when down is not pruned
        return lins

    def observe(self, block, linear, x, y):
        if linear.role == "down":
            self.stats.setdefault(linear.name, ChannelStats(x.shape[-1])).update(x)
        if linear in self.targets(block) and self._rule(block, linear) == "other":
            self.other.observe(block, linear, x, y)

    def decide(self, block, linear):
        rule = self._rule(block, linear)
        if rule == "other":
            return self.other.decide(block, linear)
        down = self._down_of(block)
        norms = self.stats[down.name].mean_sq()
        s = self.sparsity_for(linear)
        if rule == "down":
            return down_mask(linear.weight.float(), norms, self.nm, s)
        return up_mask(linear.weight.float(), norms, self.nm, s, parts=2 if linear.role == "gate_up" else 1)

    def apply(self, block, linear, decision):
        if self._rule(block, linear) == "other":
            self.other.apply(block, linear, decision)
        else:
            super().apply(block, linear, decision)

    def end_block(self, block):
        self.stats.clear()
        self.other.end_block(block)

    def promise_for(self, linear):
        p = super().promise_for(linear)
        block = self.run.adapter.block(linear.block_index)
        if self.nm and self._rule(block, linear) == "up":
            p = {**p, "pattern_axis": "out"}
        return p
