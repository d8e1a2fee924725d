"""Wanda: prune by weight magnitude times input activation norm.

Sun, Liu, Bair, Kolter (2023), "A Simple and Effective Pruning Approach for Large Language
Models". S_ij = |W_ij| * ||X_j||_2 compared within each output row (N:M: within groups of M
consecutive input columns). No weight update.
"""

from squeeze.calib.stats import ChannelStats
from squeeze.passes.base import register
from squeeze.passes.pruning import ScorePruningPass
from squeeze.sparsity import wanda_scores


@register
class Wanda(ScorePruningPass):
    name = "wanda"
    examples = ({"pattern": "2:4"}, {"pattern": "4:8"}, {"sparsity": 0.5},
                {"sparsity": 0.5, "sparsity_profile": "owl"}, {"pattern": "2:4", "mlp_scoring": "dass"},
                [{"pass": "wanda", "pattern": "2:4"}, {"pass": "dsnot"}])

    def observe_linear(self, ctx, linear, x):
        ctx.scratch(self).setdefault(linear.name, ChannelStats(x.shape[-1])).update(x)

    def scores(self, ctx, linear):
        return wanda_scores(linear.weight.float(), ctx.scratch(self)[linear.name].mean_sq())
