"""The ``pyramiddrop`` method: no weight changes; a model stage that checks the model and
resolves the stage plan, recorded in ``squeeze.json``; ``squeeze.load`` installs the
token-dropping runtime (see :mod:`squeeze.runtime.pyramiddrop`)."""

from __future__ import annotations

import dataclasses

from squeeze.adapters import Adapter
from squeeze.errors import SqueezeError
from squeeze.passes.base import Method, ModelContext, ModelStage, register


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


class TokenDropStage(ModelStage):
    """Shared shape of the vision-token methods: nothing to calibrate, no weight touched."""

    needs_weights = False

    def policy(self):
        raise NotImplementedError

    @classmethod
    def unsupported(cls, adapter: Adapter) -> str | None:
        from squeeze.vision.layout import image_token_id

        if adapter.model_type not in ("llava", "llava_next"):
            return f"{cls.name} needs a LLaVA-family model (model_type llava / llava_next), got {adapter.model_type!r}"
        try:
            image_token_id(adapter.config)
        except SqueezeError as e:
            return str(e)
        return None

    def run(self, ctx: ModelContext) -> None:
        from squeeze.runtime.spec import install

        self.resolved_layers = self.policy().layers(len(ctx.adapter))
        # the in-memory result runs what squeeze.load will install, through the same spec
        install(ctx.model, {"passes": [self.describe()]})

    def describe(self) -> dict:
        out = super().describe()
        if getattr(self, "resolved_layers", None) is not None:
            out["layers"] = self.resolved_layers
        return out


@register
class PyramidDrop(TokenDropStage):
    name = "pyramiddrop"
    examples = ({"layers": [1, 2, 3], "ratios": [0.5, 0.25, 0.125]},)

    @dataclasses.dataclass
    class Settings(Method.Settings):
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
