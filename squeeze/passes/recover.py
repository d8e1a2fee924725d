"""``recover``: the record of a recovery fine-tune (``squeeze recover``), not a sweep pass.

``squeeze recover`` appends ``{"pass": "recover", ...}`` to ``squeeze.json`` so the record of what
was done to the weights stays complete; ``squeeze.load`` looks every recorded pass up by name,
so the name must be registered. Loading needs nothing (the fine-tuned weights are plain
tensors), and the pass refuses to be put in a compress recipe.
"""

from __future__ import annotations

from squeeze.errors import SqueezeError
from squeeze.passes.base import Pass, register


@register
class Recover(Pass):
    name = "recover"
    needs_calibration = False

    def validate(self) -> None:
        raise SqueezeError("'recover' is not a compression method; run `squeeze recover PRUNED_DIR --reference "
                           "DENSE_DIR --out OUT` on a compressed model instead")
