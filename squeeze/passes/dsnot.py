"""DSnoT: training-free repair of a pruning mask (Zhang et al. 2024, "Dynamic Sparse No
Training: Training-Free Fine-tuning for Sparse LLMs"); math in :mod:`squeeze.algorithms.dsnot`.

Use it after any pruning pass (recipe ``[{pass: wanda, ...}, {pass: dsnot}]`` or
``squeeze compress --repair dsnot``). It reads the current zeros of each weight as the initial
mask and swaps pruned and kept weights so each row's expected output error shrinks, keeping the
number of zeros of every row (and of every N:M group) unchanged. Unlike the authors' default it
repairs MLP linears too.

Statistics: DSnoT shares the statistics forward of the pass before it (it never asks for fresh
statistics), so it sees exactly the inputs that pass calibrated on; the dense weight that grown
weights return to is the block's weight as loaded (``ctx.dense``, before any pass changed it). That is the authors' setting (one forward per
block, then prune and repair). Fresh statistics would differ only for o/down (and gate/up,
behind attention), whose inputs already carry the pruning of q/k/v/gate/up; the mean error
DSnoT corrects is defined against the dense layer on the same inputs, so the shared forward is
the consistent choice.

The pattern: ``pattern`` if given, else the pattern the passes before it promised for each
linear (``ctx.promises``; unstructured if none). For N:M, a linear whose weight does not satisfy the pattern
along its input dimension (e.g. DaSS gate/up, grouped along the output) is left unchanged.
"""

from __future__ import annotations

import dataclasses


from squeeze.calib.stats import ChannelStats
from squeeze.errors import SqueezeError
from squeeze.algorithms.dsnot import dsnot_repair
from squeeze.passes.base import BlockPass, register
from squeeze.sparsity import parse_pattern, satisfies_nm


@register
class DSnoT(BlockPass):
    name = "dsnot"
    flag = "--repair"  # it repairs the mask a pruning pass left: `--method X --repair dsnot`
    wants_dense = True  # grown weights return to their values before this block was pruned
    examples = ([{"pass": "wanda", "sparsity": 0.5}, {"pass": "dsnot"}],
                [{"pass": "magnitude", "pattern": "2:4"}, {"pass": "dsnot", "max_cycles": 5}])

    @dataclasses.dataclass
    class Settings(BlockPass.Settings):
        pattern: str | None = None
        threshold: float = 0.1
        max_cycles: int = 50
        var_power: float = 1.0
        same_sign: bool = True

    def validate(self) -> None:
        s = self.settings
        self.report = {self.name: {"swaps": 0, "linears": 0, "skipped": []}}
        self.nm = parse_pattern(s.pattern) if s.pattern is not None else None
        try:
            s.threshold, s.var_power = float(s.threshold), float(s.var_power)
        except (TypeError, ValueError):
            raise SqueezeError("dsnot: threshold and var_power must be numbers, e.g. 0.1 and 1") from None
        if not isinstance(s.max_cycles, int) or s.max_cycles < 0:
            raise SqueezeError(f"dsnot: bad max_cycles {s.max_cycles!r}: expected a whole number >= 0, e.g. 50")
        if s.threshold < 0:
            raise SqueezeError(f"dsnot: threshold must be >= 0, got {s.threshold}")

    def observe(self, ctx, linear, x, y):
        ctx.scratch(self).setdefault(linear.name, ChannelStats(x.shape[-1])).update(x)

    def _nm(self, ctx, linear):
        """The pattern to keep: ``pattern`` if set, else what the passes before promised."""
        if self.settings.pattern is not None:
            return self.nm
        promised = ctx.promises.get(linear.name, {}).get("pattern")
        return parse_pattern(promised) if promised else None

    def decide(self, ctx):
        out = {}
        for linear in self.targets(ctx.block):
            w, nm = linear.weight.float(), self._nm(ctx, linear)
            if nm and not satisfies_nm(w, *nm):
                self.report[self.name]["skipped"].append(linear.name)
                continue
            st, s = ctx.scratch(self)[linear.name], self.settings
            new, info = dsnot_repair(ctx.dense[linear.name], w, st.mean(), st.var(), st.mean_sq(), nm=nm,
                                     threshold=s.threshold, max_cycles=s.max_cycles, var_power=s.var_power,
                                     same_sign=s.same_sign)
            self.report[self.name]["swaps"] += info["swaps"]
            self.report[self.name]["linears"] += 1
            out[linear.name] = new
        return out

    def apply(self, ctx, decision):
        for name, new_weight in decision.items():
            ctx.block.linears[name].set_weight(new_weight)
