"""The ``mustdrop`` method: no weight changes; records MustDrop-style settings in ``squeeze.json``
and ``squeeze.load`` installs the token-dropping runtime (see :mod:`squeeze.runtime.mustdrop`)."""

from __future__ import annotations

import dataclasses

from squeeze.passes.base import Method, register
from squeeze.passes.pyramiddrop import TokenDropStage, _num_list
from squeeze.runtime.mustdrop import MustDropPolicy


@register
class MustDrop(TokenDropStage):
    name = "mustdrop"
    examples = ({"layers": [1, 2], "global_threshold": 0.5, "individual_threshold": 0.2, "window": 2},)

    # the policy's own fields and defaults (one source of truth); its `boundaries` is called `layers`
    # here: prefill drop layers, default 2, 6, 10, 14 of 32, scaled to the model's depth
    Settings = dataclasses.make_dataclass(
        "Settings", [("layers", "list | None", None)]
        + [(f.name, f.type, f.default) for f in dataclasses.fields(MustDropPolicy) if f.name != "boundaries"],
        bases=(Method.Settings,))

    def validate(self) -> None:
        self.settings.layers = _num_list(self.settings.layers, "--layers", int)
        self.policy()

    def policy(self) -> MustDropPolicy:
        s = self.settings
        names = [f.name for f in dataclasses.fields(MustDropPolicy) if f.name != "boundaries"]
        return MustDropPolicy(s.layers, **{n: getattr(s, n) for n in names})
