"""The ``pyramiddrop`` pass: no weight changes; records the stage plan in ``squeeze.json`` and
installs the token-dropping runtime at ``squeeze.load`` (see :mod:`squeeze.runtime.pyramiddrop`)."""

from __future__ import annotations

import dataclasses

from squeeze.errors import SqueezeError
from squeeze.passes.base import Pass, register


def _num_list(value, name, cast):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    if isinstance(value, (int, float)):
        value = [value]
    try:
        return [cast(v) for v in value]
    except (TypeError, ValueError):
        raise SqueezeError(f"bad {name} {value!r}: expected a comma-separated list of numbers") from None


class TokenDropPass(Pass):
    """Shared shape of the vision-token passes: nothing to calibrate, no linear touched."""

    needs_calibration = False

    def targets(self, block):
        return []

    def policy(self):
        raise NotImplementedError

    def setup(self, run) -> None:
        super().setup(run)
        model = run.model
        if not hasattr(getattr(model, "model", None), "language_model"):
            raise SqueezeError(f"{self.name} needs a LLaVA-family model (model_type llava / llava_next), got "
                               f"{getattr(model.config, 'model_type', '?')!r}")
        from squeeze.vision.layout import image_token_id

        image_token_id(model.config)
        self.resolved_layers = self.policy().layers(len(run.adapter))

    @classmethod
    def on_load(cls, model, entry: dict, path, record: dict) -> None:
        from squeeze.runtime.token_drop import install

        settings = {k: v for k, v in entry.items() if k in {f.name for f in dataclasses.fields(cls.Settings)}}
        install(model, cls(**settings).policy())

    def describe(self) -> dict:
        out = super().describe()
        if getattr(self, "resolved_layers", None) is not None:
            out["layers"] = self.resolved_layers
        return out


@register
class PyramidDropPass(TokenDropPass):
    name = "pyramiddrop"

    @dataclasses.dataclass
    class Settings(Pass.Settings):
        layers: list | None = None  # boundary layers; default quarters of the language model
        ratios: list | None = None  # keep ratio (of the original image tokens) at each boundary; default 0.5^i

    def validate(self) -> None:
        self.settings.layers = _num_list(self.settings.layers, "--layers", int)
        self.settings.ratios = _num_list(self.settings.ratios, "--ratios", float)
        self.policy()

    def policy(self):
        from squeeze.runtime.pyramiddrop import PyramidDropPolicy

        return PyramidDropPolicy(self.settings.layers, self.settings.ratios)

    def describe(self) -> dict:
        out = super().describe()
        if getattr(self, "resolved_layers", None) is not None and self.settings.ratios is None:
            from squeeze.runtime.pyramiddrop import default_ratios

            out["ratios"] = default_ratios(len(self.resolved_layers))
        return out
