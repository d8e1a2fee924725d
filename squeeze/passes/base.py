"""Method roles and the registry.

A registered method (a recipe entry ``{pass: NAME, ...settings}``) plays one or both roles:

- a **block pass** works block by block inside the calibration sweep of
  :class:`squeeze.calib.runner.BlockRunner`::

      prepare(sweep)                       once: the adapter, the number of blocks
      survey(ctx) -> value; plan(values)   optional dense pre-sweep (``wants_survey``), e.g. OWL
      for each block (ctx: BlockContext):
          targets(block)                   the linears it changes
          observed(block)                  the linears whose inputs/outputs it wants to see
          observe(ctx, linear, x, y)       during the statistics forward (x: [tokens, in])
          reduce_statistics(ctx)           several processes only: combine the ranks' statistics
          decide(ctx) -> decision          for the whole block
          apply(ctx, decision)             changes the block's modules

  Per-block state lives in ``ctx.scratch(self)`` and dies with the block; what a pass carries
  from block to block (its report, a plan, a generator) it returns from ``sweep_state()``, which
  a resumable sweep saves after every block (:mod:`squeeze.resume`). The context also gives
  the block's calibration inputs and call arguments (``ctx.batches``), ``ctx.replay()`` to run the
  block as it is now, the weights as they were when the block was loaded (``ctx.dense``) and what
  the passes before promised for each linear (``ctx.promises``), so no pass reaches into the
  runner or into other passes.
- a **model stage** (:class:`ModelStage`) does whole-model work after the sweep (recovery
  training, installing a run-time policy) on a :class:`ModelContext`.

Consecutive block passes share one statistics forward; a pass with ``fresh_statistics = True``
starts a new one, so it observes the block as already changed by the passes before it. What an
export needs at load time is keyed by the recorded method name in :mod:`squeeze.runtime.spec`.
The runner never branches on a method's name: methods register with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from squeeze.adapters import Adapter, Block, Linear
from squeeze.errors import SqueezeError
from squeeze.runtime.stack import block_output

REGISTRY: dict[str, type[Method]] = {}

# Jobs that are whole commands of their own, not steps of a compress sweep: a user who asks for them
# as a method is pointed at the command instead of a bare "unknown method".
COMMANDS = {"recover": "squeeze recover", "finetune": "squeeze finetune", "layerskip": "squeeze finetune",
            "layerdrop": "squeeze drop-layers", "drop-layers": "squeeze drop-layers"}


def register(cls):
    """Class decorator: make a method available by its ``name`` in recipes and ``--method``."""
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Method]:
    import squeeze.passes  # noqa: F401  (registers the built-in methods)

    if name in COMMANDS and name not in REGISTRY:
        raise SqueezeError(_command_hint(name))
    if name not in REGISTRY:
        names = sorted([*REGISTRY, *PRESETS])
        raise SqueezeError(f"unknown method {name!r}: {_did_you_mean(name, names)}"
                           f"available: {', '.join(names)}")
    return REGISTRY[name]


def compress_names(flag: str = "--method") -> list[str]:
    """The names ``squeeze compress`` accepts for ``flag`` (``--method`` or ``--repair``): the
    registered methods whose :attr:`Method.flag` it is; presets (which expand to a pruning pass)
    go with ``--method``. Recipes accept every registered name and preset."""
    import squeeze.passes  # noqa: F401  (registers the built-in methods)

    names = [n for n, cls in REGISTRY.items() if cls.flag == flag]
    return sorted(names + list(PRESETS) if flag == "--method" else names)


def check_compress_name(name: str, flag: str = "--method") -> str:
    """``name`` if ``squeeze compress`` accepts it for ``flag``, else a SqueezeError whose one line
    says what to use instead: the command that does the job, the flag that selects the method, or
    the nearest accepted name."""
    names = compress_names(flag)
    if name in names:
        return name
    if name in COMMANDS and name not in REGISTRY:
        raise SqueezeError(_command_hint(name))
    if name in REGISTRY:
        raise SqueezeError(f"{name!r} is not a {flag} choice: compress runs it with {REGISTRY[name].flag} "
                           "(see `squeeze compress --help`)")
    if name in SETTINGS:
        raise SqueezeError(f"{name!r} is not a method: it is {SETTINGS[name]}")
    raise SqueezeError(f"unknown method {name!r}: {_did_you_mean(name, names)}"
                       f"{flag} accepts: {', '.join(names)}")


# Names people reach for that are settings of other methods, not methods of their own.
SETTINGS = {"owl": "--sparsity-profile owl, with --sparsity and a pruning --method (e.g. wanda)"}


def _command_hint(name: str) -> str:
    return f"{name!r} is not a compression method: it is its own command: run `{COMMANDS[name]} --help`"


def _did_you_mean(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), list(names), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


# -- what a block pass is given ------------------------------------------------------------------
@dataclass
class Batch:
    """Calibration inputs of one block: hidden states and the block's call arguments."""

    hidden: torch.Tensor  # (B, T, C)
    calls: list  # per block: (extra positional args, kwargs)


def _slice_batch(obj, batch: int, keep: int):
    """Keep the first ``keep`` sequences of every tensor whose leading dim is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj[:keep] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice_batch(o, batch, keep) for o in obj)
    if isinstance(obj, dict):
        return {k: _slice_batch(v, batch, keep) for k, v in obj.items()}
    return obj


@dataclass
class SweepInfo:
    """What a block pass may know about the whole sweep before it starts."""

    adapter: Adapter
    num_blocks: int
    calibrated: bool  # calibration data is present


@dataclass
class BlockContext:
    block: Block
    batches: list[Batch]  # this block's inputs (the compressed model's activations so far)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # linear weights when the block was loaded
    promises: dict[str, dict] = field(default_factory=dict)  # linear name -> promise of the passes so far
    _scratch: dict = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.block.index

    def scratch(self, owner) -> dict:
        """Per-block working memory of ``owner`` (statistics, cached decisions)."""
        return self._scratch.setdefault(id(owner), {})

    def call(self, i: int = 0, tokens: int | None = None):
        """(hidden, args, kwargs) of batch ``i``, cut to its first sequences holding at least
        ``tokens`` tokens (all of it when None)."""
        b = self.batches[i]
        rest, kwargs = b.calls[self.block.index]
        n, t = b.hidden.shape[:2]
        keep = n if tokens is None else max(1, min(n, -(-tokens // max(t, 1))))
        return b.hidden[:keep], _slice_batch(rest, n, keep), _slice_batch(dict(kwargs), n, keep)

    def replay(self, tokens: int | None = None, batch: int = 0) -> torch.Tensor:
        """Run the block as it is now on (the first ``tokens`` tokens of) calibration batch
        ``batch``; returns its output hidden state. Greedy searches call it once per trial."""
        hidden, rest, kwargs = self.call(batch, tokens)
        hidden = hidden.to(next(self.block.module.parameters()).dtype)
        return block_output(self.block.module(hidden, *rest, **kwargs))

    def input_stats(self, linears: list[Linear]) -> dict:
        """Per-channel input statistics of ``linears`` over every calibration batch (one forward
        of the block as it is now)."""
        from squeeze.calib.stats import ChannelStats

        stats = {lin.name: ChannelStats(lin.in_features) for lin in linears}
        self.watch(linears, lambda lin, x, out: stats[lin.name].update(x))
        for name in sorted(stats):  # every rank's batches (a no-op in one process)
            stats[name].reduce()
        return stats

    def watch(self, linears: list[Linear], fn) -> None:
        """Replay every calibration batch through the block as it is now, calling
        ``fn(lin, x, out)`` for each of ``linears`` with its input as (N, in) fp32 and its raw output.
        Linears that share an input get the very same ``x`` object, so statistics can memoise on it."""
        memo: dict = {}

        from squeeze.runtime.act_sparse import masked_input

        def hook(module, inputs, out, lin):
            x = masked_input(module, inputs[0])  # what it multiplies, after a run-time mask of an earlier pass
            if memo.get("src") is not x:
                memo["src"], memo["x"] = x, lin.inputs_2d(x).float()
            fn(lin, memo["x"], out)

        handles = [lin.module.register_forward_hook(functools.partial(hook, lin=lin)) for lin in linears]
        try:
            for i in range(len(self.batches)):
                self.replay(batch=i)
        finally:
            for h in handles:
                h.remove()


@dataclass
class ModelContext:
    """What a model stage is given: the whole model in memory and what the sweep used."""

    model: torch.nn.Module
    adapter: Adapter
    source: Any  # the source Checkpoint (read only)
    calibration: Any  # squeeze.calib.Calibration or None
    dtype: torch.dtype
    report: dict  # stage reports go here, keyed by method name


# -- the method base -------------------------------------------------------------------------------
class Method:
    name: ClassVar[str] = "?"
    needs_calibration: ClassVar[bool] = True
    # Example settings (recipe entries without "pass"; a list of entries for a recipe of several):
    # the conformance grid runs every one on every architecture the method applies to.
    examples: ClassVar[tuple] = ()
    # The compress flag that runs it on its own: most methods are a --method; a pass with flags of
    # its own (quantize: --quantize) or that only follows a pruning pass (dsnot: --repair) says so,
    # and the CLI lists and checks the names of each flag from here (:func:`compress_names`).
    flag: ClassVar[str] = "--method"

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
        self.report: dict = {}
        self.validate()

    def _check_regex(self, attr):
        value = getattr(self.settings, attr, None)
        if value:
            try:
                re.compile(value)
            except re.error as e:
                raise SqueezeError(f"bad --{attr} regex {value!r}: {e}") from None

    def validate(self) -> None:
        """Check settings; raise SqueezeError with a clear message."""

    @classmethod
    def unsupported(cls, adapter: Adapter) -> str | None:
        """Why this method cannot run on the model ``adapter`` describes (None: it can)."""
        return None

    def selects(self, linear_name: str) -> bool:
        """Whether ``--targets``/``--ignore`` select a linear."""
        t, ig = self.settings.targets, self.settings.ignore
        return (not t or bool(re.search(t, linear_name))) and not (ig and re.search(ig, linear_name))

    def stages(self) -> list[ModelStage]:
        """The model stages this method runs after the sweep."""
        return []

    def describe(self) -> dict:
        return {"pass": self.name, **{k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None}}

    # settings that say how the work is run, not what was chosen: left out of the report's lines
    QUIET_SETTINGS: ClassVar[tuple] = ("runtime", "progress", "resume", "save_every", "seed")

    def per_layer(self) -> dict[str, list]:
        """What this pass chose per block, ``{label: [value of block 0, 1, ...]}`` (e.g. OWL's
        sparsity per layer, TEAL's thresholds); empty when it chose nothing per layer."""
        return {}

    def results(self) -> dict:
        """Scalar outcomes of this pass (counts, losses) from its ``report``."""
        mine = self.report.get(self.name) if isinstance(self.report.get(self.name), dict) else {}
        return {k: v for k, v in mine.items() if isinstance(v, (int, float, str, bool)) and v is not None}

    def chosen(self) -> dict:
        """What was done, for the report: the settings in effect (:meth:`describe`), the outcomes
        (:meth:`results`) and the per-layer choices (:meth:`per_layer`). The CLI renders every
        pass from this one shape, so a new pass reports by overriding those two methods."""
        d = {k: v for k, v in self.describe().items() if k not in self.QUIET_SETTINGS}
        out = {"pass": d.pop("pass"), "settings": d}
        if self.results():
            out["results"] = self.results()
        if self.per_layer():
            out["per_layer"] = self.per_layer()
        return out


class BlockPass(Method):
    fresh_statistics: ClassVar[bool] = False
    wants_survey: ClassVar[bool] = False  # survey() each block in a dense pre-sweep, then plan()
    wants_dense: ClassVar[bool] = False  # ctx.dense: the block's weights before any pass changed them
    # observed linears each get an in x in float64 Hessian (second-order solvers): what a streamed
    # sweep's memory bound adds for them (squeeze.calib.runner.memory_bound)
    hessians: ClassVar[bool] = False

    def prepare(self, sweep: SweepInfo) -> None:
        self.sweep = sweep

    def sweep_state(self) -> dict:
        """What this pass carries from one block to the next (JSON-able): saved after every
        finished block so a resumed sweep (:mod:`squeeze.resume`) continues exactly. The default
        is the report it accumulates; a pass with more (a plan, a random generator) adds it."""
        return {"report": self.report}

    def load_sweep_state(self, state: dict) -> None:
        """Restore :meth:`sweep_state` after :meth:`prepare`, instead of the blocks already done."""
        self.report = state["report"]

    def survey(self, ctx: BlockContext) -> Any:
        raise NotImplementedError

    def plan(self, values: list) -> None:
        raise NotImplementedError

    def targets(self, block: Block) -> list[Linear]:
        return [lin for name, lin in block.linears.items() if self.selects(name)]

    def observed(self, block: Block) -> list[Linear]:
        return self.targets(block)

    def observe(self, ctx: BlockContext, linear: Linear, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def reduce_statistics(self, ctx: BlockContext) -> None:
        """Between observe and decide, with several processes (the runner calls it only then):
        combine what each rank observed so every rank decides alike. The default reduces every
        statistic in ``ctx.scratch(self)`` that knows how (``reduce()``: ChannelStats, Hessian), in
        name order so the ranks' collectives line up; a pass with other state overrides it, or
        refuses to run distributed (:func:`squeeze.distributed.refuse`)."""
        done = set()  # a statistic shared by linears (calib.stats.hessian_for) is reduced once
        for _, value in sorted(ctx.scratch(self).items(), key=lambda kv: str(kv[0])):
            if callable(getattr(value, "reduce", None)) and id(value) not in done:
                done.add(id(value))
                value.reduce()

    def decide(self, ctx: BlockContext) -> Any:
        raise NotImplementedError

    def apply(self, ctx: BlockContext, decision: Any) -> None:
        raise NotImplementedError

    def promise(self) -> dict:
        """The weight pattern this pass guarantees on its targets, e.g. {"pattern": "2:4"}."""
        return {}

    def promise_for(self, block: Block, linear: Linear) -> dict:
        """The promise for one target linear (default: the pass-wide :meth:`promise`). Passes
        whose promise differs per linear override it, e.g. a per-layer ``sparsity_target`` or
        ``pattern_axis: "out"`` for N:M groups along the output dimension."""
        return self.promise()


class ModelStage(Method):
    needs_calibration: ClassVar[bool] = False
    needs_weights: ClassVar[bool] = True  # False: works on the config / skeleton only

    def stages(self) -> list[ModelStage]:
        return [self]

    def run(self, ctx: ModelContext) -> None:
        raise NotImplementedError


# Recipe names that expand to a configured method (one mechanism, a familiar name).
PRESETS: dict[str, Any] = {}


def preset(name: str):
    """Function decorator: ``fn(settings) -> recipe entry`` makes ``name`` usable in recipes."""
    def deco(fn):
        PRESETS[name] = fn
        return fn
    return deco
