"""Wanda: prune by weight magnitude times input activation norm.

Sun, Liu, Bair, Kolter (2023), "A Simple and Effective Pruning Approach for Large Language
Models". S_ij = |W_ij| * ||X_j||_2 compared within each output row (N:M: within groups of M
consecutive input columns). No weight update.
"""

from squeeze.calib.stats import ChannelStats
from squeeze.passes.base import register
from squeeze.passes.pruning import PruningPass
from squeeze.sparsity import wanda_scores


@register
class Wanda(PruningPass):
    name = "wanda"

    def setup(self, run):
        super().setup(run)
        self.stats: dict[str, ChannelStats] = {}

    def observe(self, block, linear, x, y):
        self.stats.setdefault(linear.name, ChannelStats(x.shape[-1])).update(x)

    def scores(self, block, linear):
        return wanda_scores(linear.weight.float(), self.stats[linear.name].mean_sq())

    def end_block(self, block):
        self.stats.clear()
