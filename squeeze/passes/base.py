"""The Pass protocol and registry.

A pass is one compression method. The runner drives every pass the same way, block by block::

    setup(run)                         once, before the sweep (model-level preparation)
    for each block:
        targets(block)                 the linears it will change in this block
        observed(block)                the linears whose inputs/outputs it wants to see
        observe(block, linear, x, y)   called during the statistics forward (x: [tokens, in])
        observe_block(block, x, y)     block input/output, if ``wants_block_io``
        decide(block, linear)          -> a decision (mask, threshold, ...)
        apply(block, linear, decision) -> changes the module
        end_block(block)               release per-block statistics
    finish(run)                        model-level wrap-up
    describe()                         what export records in squeeze.json

Consecutive passes share one statistics forward; a pass with ``fresh_statistics = True`` starts
a new one, so it observes the block as already changed by the passes before it. The runner
never branches on a pass's name: passes register with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch

from squeeze.adapters import Block, Linear
from squeeze.errors import SqueezeError

REGISTRY: dict[str, type[Pass]] = {}


def register(cls):
    """Class decorator: make a pass available by its ``name`` in recipes and ``--method``."""
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    import squeeze.passes  # noqa: F401  (registers the built-in passes)

    if name not in REGISTRY:
        raise SqueezeError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


class Pass:
    name: ClassVar[str] = "?"
    needs_calibration: ClassVar[bool] = True
    fresh_statistics: ClassVar[bool] = False
    wants_block_io: ClassVar[bool] = False
    needs_whole_model: ClassVar[bool] = False  # finish() works on the whole model: keep blocks in memory

    @dataclasses.dataclass
    class Settings:
        targets: str | None = None  # regex over full linear names; None = every linear in the blocks
        ignore: str | None = None

    def __init__(self, **settings: Any):
        fields = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = set(settings) - fields
        if unknown:
            raise SqueezeError(
                f"pass {self.name!r}: unknown setting(s) {', '.join(sorted(unknown))}; "
                f"it takes {', '.join(sorted(fields))}"
            )
        self.settings = self.Settings(**settings)
        self._check_regex("targets")
        self._check_regex("ignore")
        self.validate()
        self.records: dict[str, dict] = {}

    def _check_regex(self, attr):
        value = getattr(self.settings, attr, None)
        if value:
            try:
                re.compile(value)
            except re.error as e:
                raise SqueezeError(f"bad --{attr} regex {value!r}: {e}") from None

    def validate(self) -> None:
        """Check settings; raise SqueezeError with a clear message."""

    # -- protocol --------------------------------------------------------------------------
    def setup(self, run) -> None:
        self.run = run

    def targets(self, block: Block) -> list[Linear]:
        t, ig = self.settings.targets, self.settings.ignore
        return [lin for name, lin in block.linears.items()
                if (not t or re.search(t, name)) and not (ig and re.search(ig, name))]

    def observed(self, block: Block) -> list[Linear]:
        return self.targets(block)

    def observe(self, block: Block, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def observe_block(self, block: Block, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def decide(self, block: Block, linear: Linear) -> Any:
        raise NotImplementedError

    def apply(self, block: Block, linear: Linear, decision: Any) -> None:
        raise NotImplementedError

    def end_block(self, block: Block) -> None:
        pass

    def finish(self, run) -> None:
        pass

    @classmethod
    def on_load(cls, model, entry: dict, path, record: dict) -> None:
        """Called by ``squeeze.load`` for each recorded pass: swap in run-time modules, register
        buffers (their values then load from the sidecar). Weight-only passes need nothing."""

    def promise(self) -> dict:
        """The weight pattern this pass guarantees on its targets, e.g. {"pattern": "2:4"}."""
        return {}

    def promise_for(self, linear: Linear) -> dict:
        """The promise for one target linear (default: the pass-wide :meth:`promise`). Passes
        whose promise differs per linear override it, e.g. a per-layer ``sparsity_target`` or
        ``pattern_axis: "out"`` for N:M groups along the output dimension."""
        return self.promise()

    def describe(self) -> dict:
        return {"pass": self.name, **{k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None}}
