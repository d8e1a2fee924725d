"""SparseGPT: prune with second-order (OBS) weight updates of the weights that stay.

Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". Per linear: H = (2/n)·Σ x xᵀ over the calibration tokens (float64), dampening
``dampening``·mean(diag H), upper Cholesky of H⁻¹, columns swept in blocks of ``blocksize``
with lazy batch updates; the math is in :mod:`squeeze.algorithms.sparsegpt`.

Like the reference and llm-compressor, every linear of a block is calibrated on one statistics
forward of the block as it was before any of its linears were pruned (the block's input is
still the compressed model's activations: the runner is sequential over blocks).
"""

from __future__ import annotations

import dataclasses

import torch

from squeeze.calib.stats import hessian_for
from squeeze.errors import SqueezeError
from squeeze.algorithms.sparsegpt import sparsegpt_prune
from squeeze.passes.base import register
from squeeze.passes.pruning import PruningPass


@register
class SparseGPT(PruningPass):
    name = "sparsegpt"
    hessians = True
    examples = ({"pattern": "2:4"}, {"sparsity": 0.5, "blocksize": 16},
                {"pattern": "2:4", "mlp_scoring": "dass"})

    @dataclasses.dataclass
    class Settings(PruningPass.Settings):
        blocksize: int = 128
        dampening: float = 0.01

    def validate(self) -> None:
        super().validate()
        s = self.settings
        if not isinstance(s.blocksize, int) or s.blocksize < 1:
            raise SqueezeError(f"sparsegpt: bad blocksize {s.blocksize!r}: expected a whole number >= 1, e.g. 128")
        try:
            s.dampening = float(s.dampening)
        except (TypeError, ValueError):
            raise SqueezeError(f"sparsegpt: bad dampening {s.dampening!r}: expected a number, e.g. 0.01") from None
        if not s.dampening > 0:
            raise SqueezeError(f"sparsegpt: dampening must be > 0 (e.g. 0.01), got {s.dampening}")

    def observe_linear(self, ctx, linear, x):
        hessian_for(ctx.scratch(self), linear.name, x).update(x)

    def prune(self, ctx, linear) -> torch.Tensor:
        s = self.settings
        # the accumulated sums go as soon as the matrix is made: the largest linear's solve holds
        # three in x in float64 matrices already (memory_bound)
        W, _ = sparsegpt_prune(linear.weight.float(), ctx.scratch(self).pop(linear.name).matrix(),
                               sparsity=None if self.nm else self.sparsity_for(linear), nm=self.nm,
                               blocksize=s.blocksize, dampening=s.dampening)
        return W
