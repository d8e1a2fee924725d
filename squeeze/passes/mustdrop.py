"""The ``mustdrop`` method: no weight changes; records MustDrop-style settings in ``squeeze.json``
and ``squeeze.load`` installs the token-dropping runtime (see :mod:`squeeze.runtime.mustdrop`)."""

from __future__ import annotations

import dataclasses

from squeeze.passes.base import Method, register
from squeeze.passes.pyramiddrop import TokenDropStage, _num_list


@register
class MustDrop(TokenDropStage):
    name = "mustdrop"
    examples = ({"layers": [1, 2], "global_threshold": 0.5, "individual_threshold": 0.2, "window": 2},)

    @dataclasses.dataclass
    class Settings(Method.Settings):
        layers: list | None = None  # prefill drop layers; default 2, 6, 10, 14 of 32, scaled
        global_threshold: float = 0.001
        individual_threshold: float = 0.001
        merge_threshold: float = 0.8
        window: int = 3
        key_fraction: float = 0.08
        trim_cache: bool = True
        vision_layer: int | None = None

    def validate(self) -> None:
        self.settings.layers = _num_list(self.settings.layers, "--layers", int)
        self.policy()

    def policy(self):
        from squeeze.runtime.mustdrop import MustDropPolicy

        s = self.settings
        return MustDropPolicy(s.layers, s.global_threshold, s.individual_threshold, s.merge_threshold, s.window,
                              s.key_fraction, s.trim_cache, s.vision_layer)
