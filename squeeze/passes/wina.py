"""WINA: weight-informed activation sparsity.

Chen et al. (2025), "WINA: Weight Informed Neuron Activation for Accelerating Large Language
Model Inference" (microsoft/wina). Like TEAL, but an input x_i is scored by |x_i| * ||W_{:,i}||_2
with W the consuming linear (for the shared attention input: k_proj; for the shared MLP input:
gate_proj, as in the reference), so small inputs that feed large columns survive. The column
norms are a registered buffer of each site's sparsifier (saved in the export's sidecar).

``transform=true`` (``--set transform=true``) adds the paper's orthogonal transform: each block's
shared attention input and MLP input are rotated by V from the SVD of their stacked consumers
(q;k;v, gate;up), whose weights are rotated to match, so those columns are orthogonal and the
scores use the singular values (:func:`squeeze.algorithms.actsparse.orthogonal_transform`; at
0% sparsity the model's outputs are unchanged). The export then stores rotated weights: only
``squeeze.load`` runs it correctly. Not combinable with weight pruning (the rotation densifies).
"""

from squeeze.passes._actsparse_pass import ActSparsityPass
from squeeze.passes.base import register


@register
class Wina(ActSparsityPass):
    name = "wina"
    weighted = True
    examples = ({"act_sparsity": 0.5}, {"act_sparsity": 0.5, "transform": True},
                {"act_sparsity": 0.5, "allocation": "greedy", "greedy_step": 0.25, "greedy_tokens": 32},
                [{"pass": "wanda", "pattern": "2:4"}, {"pass": "wina", "act_sparsity": 0.3}])
