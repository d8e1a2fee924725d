"""Magnitude pruning: score |W_ij|, no calibration data (the classic baseline, e.g. Han et al. 2015)."""

from squeeze.passes.base import register
from squeeze.passes.pruning import PruningPass


@register
class Magnitude(PruningPass):
    name = "magnitude"
    needs_calibration = False

    def observed(self, block):
        return []

    def scores(self, block, linear):
        return linear.weight.abs().float()
