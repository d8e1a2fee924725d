"""TEAL: training-free activation sparsity by magnitude.

Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun (2024), "Training-Free Activation Sparsity in Large
Language Models" (FasterDecoding/TEAL). Inputs of every linear are zeroed where |x| is below a
per-site threshold calibrated on activations (uniform per-site sparsity, or TEAL's block-wise
greedy allocation). The math is in :mod:`squeeze.algorithms.actsparse`, the pass machinery in
:mod:`squeeze.passes._actsparse_pass`, the run-time in :mod:`squeeze.runtime.act_sparse`.
"""

from squeeze.passes._actsparse_pass import ActSparsityPass
from squeeze.passes.base import register


@register
class Teal(ActSparsityPass):
    name = "teal"
    weighted = False
    examples = ({"act_sparsity": 0.5}, {"act_sparsity": 0.5, "allocation": "greedy", "greedy_step": 0.25, "greedy_tokens": 32},
                {"act_sparsity": 0.5, "mode": "topk", "sites": "mlp_in,mlp_mid"})
