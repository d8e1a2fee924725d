"""Magnitude pruning: score |W_ij|, no calibration data (the classic baseline, e.g. Han et al. 2015)."""

from squeeze.passes.base import register
from squeeze.passes.pruning import ScorePruningPass


@register
class Magnitude(ScorePruningPass):
    name = "magnitude"
    needs_calibration = False
    examples = ({"pattern": "2:4"}, {"sparsity": 0.5})

    def own_observed(self, block):
        return []

    def scores(self, ctx, linear):
        return linear.weight.abs().float()
