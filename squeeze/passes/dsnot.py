"""DSnoT: training-free repair of a pruning mask (Zhang et al. 2024, "Dynamic Sparse No
Training: Training-Free Fine-tuning for Sparse LLMs"); math in :mod:`squeeze.passes._dsnot_math`.

Use it after any pruning pass (recipe ``[{pass: wanda, ...}, {pass: dsnot}]`` or
``squeeze compress --repair dsnot``). It reads the current zeros of each weight as the initial
mask and swaps pruned and kept weights so each row's expected output error shrinks, keeping the
number of zeros of every row (and of every N:M group) unchanged. Unlike the authors' default it
repairs MLP linears too.

Statistics: DSnoT shares the statistics forward of the pass before it (it never asks for fresh
statistics), so it sees exactly the inputs that pass calibrated on, and it snapshots each
weight during that forward, before the pruning pass applies its decision: the snapshot is the
dense weight that grown weights return to. That is the authors' setting (one forward per
block, then prune and repair). Fresh statistics would differ only for o/down (and gate/up,
behind attention), whose inputs already carry the pruning of q/k/v/gate/up; the mean error
DSnoT corrects is defined against the dense layer on the same inputs, so the shared forward is
the consistent choice.

The pattern: ``pattern`` if given, else the pattern of the last pruning pass before it in the
recipe (unstructured if none). For N:M, a linear whose weight does not satisfy the pattern
along its input dimension (e.g. DaSS gate/up, grouped along the output) is left unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from squeeze.calib.stats import ChannelStats
from squeeze.errors import SqueezeError
from squeeze.passes._dsnot_math import dsnot_repair
from squeeze.passes.base import Pass, register
from squeeze.sparsity import parse_pattern, satisfies_nm


@register
class DSnoT(Pass):
    name = "dsnot"

    @dataclasses.dataclass
    class Settings(Pass.Settings):
        pattern: str | None = None
        threshold: float = 0.1
        max_cycles: int = 50
        var_power: float = 1.0
        same_sign: bool = True

    def validate(self) -> None:
        s = self.settings
        self.nm = parse_pattern(s.pattern) if s.pattern is not None else None
        try:
            s.threshold, s.var_power = float(s.threshold), float(s.var_power)
        except (TypeError, ValueError):
            raise SqueezeError("dsnot: threshold and var_power must be numbers, e.g. 0.1 and 1") from None
        if not isinstance(s.max_cycles, int) or s.max_cycles < 0:
            raise SqueezeError(f"dsnot: bad max_cycles {s.max_cycles!r}: expected a whole number >= 0, e.g. 50")
        if s.threshold < 0:
            raise SqueezeError(f"dsnot: threshold must be >= 0, got {s.threshold}")

    def setup(self, run):
        super().setup(run)
        if self.settings.pattern is None:
            before = run.passes[:run.passes.index(self)] if self in run.passes else []
            for p in before:
                if hasattr(p, "nm"):
                    self.nm = p.nm  # follow the last pruning pass before this one
        self.stats: dict[str, ChannelStats] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.report = {self.name: {"swaps": 0, "linears": 0, "skipped": []}}

    def observe(self, block, linear, x, y):
        if linear.name not in self.dense:
            self.dense[linear.name] = linear.weight.detach().float().clone()
        self.stats.setdefault(linear.name, ChannelStats(x.shape[-1])).update(x)

    def decide(self, block, linear):
        w = linear.weight.float()
        if self.nm and not satisfies_nm(w, *self.nm):
            self.report[self.name]["skipped"].append(linear.name)
            return None
        st, s = self.stats[linear.name], self.settings
        new, info = dsnot_repair(self.dense.get(linear.name, w), w, st.mean(), st.var(), st.mean_sq(), nm=self.nm,
                                 threshold=s.threshold, max_cycles=s.max_cycles, var_power=s.var_power,
                                 same_sign=s.same_sign)
        self.report[self.name]["swaps"] += info["swaps"]
        self.report[self.name]["linears"] += 1
        return new

    def apply(self, block, linear, new_weight):
        if new_weight is not None:
            linear.set_weight(new_weight)

    def end_block(self, block):
        self.stats.clear()
        self.dense.clear()
