"""Record-only passes for the depth methods (``squeeze finetune --recipe layerskip`` and
``squeeze drop-layers``).

They are not run by the block runner (they change the whole model, or its layer count); they are
registered so that ``squeeze.load`` recognises their entries in ``squeeze.json``. Their weights
are plain checkpoint tensors, so ``on_load`` has nothing to do.
"""

from __future__ import annotations

from squeeze.errors import SqueezeError
from squeeze.passes.base import Pass, register


class _RecordOnly(Pass):
    command = "?"

    def setup(self, run) -> None:
        raise SqueezeError(f"{self.name!r} is not a compression pass; run `squeeze {self.command}` instead")


@register
class LayerSkip(_RecordOnly):
    """LayerSkip continued training (layer dropout + early-exit loss); see squeeze.depth.layerskip."""

    name = "layerskip"
    command = "finetune --recipe layerskip"


@register
class LayerDrop(_RecordOnly):
    """Whole-layer removal; see squeeze.depth.layerdrop."""

    name = "layerdrop"
    command = "drop-layers"
