"""WINA: weight-informed activation sparsity.

Chen et al. (2025), "WINA: Weight Informed Neuron Activation for Accelerating Large Language
Model Inference" (microsoft/wina). Like TEAL, but an input x_i is scored by |x_i| * ||W_{:,i}||_2
with W the consuming linear (for the shared attention input: k_proj; for the shared MLP input:
gate_proj, as in the reference), so small inputs that feed large columns survive. The column
norms are a registered buffer of each site's sparsifier (saved in the export's sidecar).
"""

from squeeze.passes._actsparse_pass import ActSparsityPass
from squeeze.passes.base import register


@register
class Wina(ActSparsityPass):
    name = "wina"
    weighted = True
