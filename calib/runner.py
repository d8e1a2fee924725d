"""The sequential block runner.

Embed once, then block by block: load the block -> statistics forward (hooks feed each block
pass) -> decide -> apply -> propagation forward, so the next block sees the compressed model's
activations -> hand the block's tensors to the export spill -> release it. Only one block's
weights and the calibration activations are in memory at a time.

Each block's call arguments (attention masks, rotary embeddings; they differ between layers of
models such as Gemma 2/3) are recorded once, in a single forward of the model whose blocks are
replaced by pass-through recorders. Passes see a block only through
:class:`squeeze.passes.base.BlockContext`; a pass that needs every block's statistics before the
first block changes (OWL) gets a dense pre-sweep (``survey``/``plan``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from squeeze.calib.packing import Calibration
from torch import nn

from squeeze import distributed, progress
from squeeze.memory import FORWARD_BYTES, LARGE_BLOCK_BYTES, MAX_BATCH_TOKENS, largest_block_fp32, unmap_freed_tensors
from squeeze.adapters import Adapter, Block
from squeeze.compat import forward_accepts, forward_takes_any_keyword
from squeeze.errors import SqueezeError
from squeeze.passes.base import Batch, BlockContext, BlockPass, SweepInfo


def forward_tokens(adapter: Adapter) -> int:
    """Tokens per calibration batch: :data:`~squeeze.memory.FORWARD_BYTES` over the per-token bytes
    of the widest linear output of a block (read from the skeleton's shapes, nothing loaded), so a
    wide model's sweep stays near one block + the calibration activations; models up to an MLP
    width of 1536 keep 4096-token batches."""
    widest = max((m.out_features for m in adapter.blocks[0].modules() if isinstance(m, nn.Linear)), default=1)
    return max(1, min(MAX_BATCH_TOKENS, FORWARD_BYTES // (16 * widest)))


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block ``index``: records its call arguments and passes the hidden state on."""

    def __init__(self, index: int, last: bool, store: list):
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.store.append((self.index, hidden, rest, kwargs))
        if self.last:
            raise _StopForward
        return hidden


@dataclass
class RunResult:
    linears: dict = field(default_factory=dict)  # per-linear report
    seconds: dict = field(default_factory=dict)  # phase -> seconds (BlockRunner._clock)
    forwards_per_block: int = 0


class BlockRunner:
    def __init__(self, model: nn.Module, adapter: Adapter, weights, passes: list[BlockPass],
                 calib: Calibration | None, dtype: torch.dtype = torch.float32, keep: bool = True, spill=None,
                 on_block=None, batch_tokens: int | None = None, promised: dict[str, dict] | None = None,
                 state=None, saved: dict | None = None):
        self.model, self.adapter, self.weights, self.passes = model, adapter, weights, passes
        # state: a squeeze.resume.SweepState saved after every block; saved: what a killed run
        # left there, to continue from (the blocks it finished are skipped, their spill kept)
        self.state, self.saved = state, saved
        self.promised = promised or {}  # linear name -> what the source export promised (e.g. its mask)
        self.calib, self.dtype, self.keep, self.spill, self.on_block = calib, dtype, keep, spill, on_block
        self.batch_tokens = batch_tokens or forward_tokens(adapter)
        self.result = RunResult()

    # -- stages ----------------------------------------------------------------------------
    def _stages(self) -> list[list]:
        """Group passes that can share one statistics forward."""
        stages: list[list] = []
        for p in self.passes:
            if not stages or p.fresh_statistics:
                stages.append([])
            stages[-1].append(p)
        return stages

    # -- calibration activations -----------------------------------------------------------
    def _batches(self) -> list[torch.Tensor]:
        by_len: dict[int, list[torch.Tensor]] = {}
        for s in self.calib.samples:
            by_len.setdefault(int(s.numel()), []).append(s)
        out = []
        for length, group in by_len.items():
            per = max(1, self.batch_tokens // length)
            for i in range(0, len(group), per):
                out.append(torch.stack(group[i:i + per]))
        # distributed: this rank's contiguous share of the very batches one process would run
        return distributed.split(out)

    def _capture(self) -> list[Batch]:
        """Every batch's hidden state entering block 0, and each block's call arguments. The
        modules outside the blocks (embeddings, final norm) are read for this forward only: a
        streamed sweep drops them again, so a large vocabulary's fp32 table is not held beside
        every block (the export copies them from the source)."""
        head = self._untied_head()
        outside = [name for name in self.adapter.non_block_modules() if name != head]
        # a large vocabulary's embedding table alone can take seconds to read
        with progress.phase("loading weights outside the blocks", total=len(outside), unit="module") as shown:
            for name in outside:
                with self._clock("load"):
                    self.weights.materialize(self.model, name, self.dtype)
                shown.advance()
        try:
            with self._clock("capture"):
                return self._record_calls()
        finally:
            if not self.keep:
                for name in outside:
                    self.weights.release(self.model.get_submodule(name))
                self.weights.ckpt.close()

    def _record_calls(self) -> list[Batch]:
        blocks = self.adapter.blocks
        originals = list(blocks)
        store: list = []
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, i == len(blocks) - 1, store)
        # No KV cache while calibrating: every block call must see only its own batch. A VLM takes
        # use_cache through **kwargs and hands it to the decoder that owns the blocks.
        owner = self.model.get_submodule(self.adapter.blocks_path.rpartition(".")[0])
        takes = forward_accepts(self.model, "use_cache") or (
            forward_takes_any_keyword(self.model) and forward_accepts(owner, "use_cache"))
        kw = {"use_cache": False} if takes else {}
        batches = []
        todo = self._batches()
        try:
            with progress.phase("calibration capture", total=len(todo), unit="batch") as shown:
                for ids in todo:
                    store.clear()
                    try:
                        self.model(input_ids=ids, **kw)
                    except _StopForward:
                        pass
                    if len(store) != len(blocks):
                        raise SqueezeError(f"{type(self.model).__name__}: blocks were not called in order; "
                                           "this architecture is not supported by the sequential runner")
                    calls = [(rest, kwargs) for _, _, rest, kwargs in store]
                    batches.append(Batch(store[0][1].to(self.dtype), calls))
                    shown.advance()
        finally:
            for i, b in enumerate(originals):
                blocks[i] = b
        return batches

    def _load(self, i: int) -> Block:
        with self._clock("load"):
            self.weights.materialize(self.model, f"{self.adapter.blocks_path}.{i}", self.dtype)
        return self.adapter.block(i)

    @contextlib.contextmanager
    def _clock(self, phase: str):
        """Add the time spent inside to ``result.seconds[phase]``: where a sweep's time goes (load,
        capture, statistics, solve, propagate, spill), summed over the blocks."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.result.seconds[phase] = self.result.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def _propagate(self, ctx: BlockContext) -> None:
        with self._clock("propagate"):
            for k, b in enumerate(ctx.batches):
                b.hidden = ctx.replay(batch=k)
                if not torch.isfinite(b.hidden).all():
                    raise SqueezeError(
                        f"non-finite activations after block {ctx.index} during calibration; the model or the "
                        "compression diverged (check the checkpoint, or prune less)")

    # -- the dense pre-sweep -----------------------------------------------------------------
    @torch.no_grad()
    def _survey(self, surveyors: list[BlockPass]) -> None:
        """Every block of the dense model, loaded and released one at a time: each surveying
        pass measures it (``survey``), then plans from all the measurements (``plan``)."""
        if self.calib is None:
            raise SqueezeError(f"{surveyors[0].name} needs calibration data (--calib)")
        batches = self._capture()
        values: dict[int, list] = {id(p): [] for p in surveyors}
        n = len(self.adapter)
        names = ", ".join(dict.fromkeys(p.name for p in surveyors))
        with progress.phase(f"dense pre-sweep ({names})", total=n, unit="block") as shown:
            for i in range(n):
                ctx = BlockContext(self._load(i), batches)
                with self._clock("statistics"):
                    for p in surveyors:
                        values[id(p)].append(p.survey(ctx))
                if i < n - 1:
                    self._propagate(ctx)
                self.weights.release(ctx.block.module)
                shown.advance()
        for p in surveyors:
            p.plan(values[id(p)])

    # -- the sweep -------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> RunResult:
        if largest_block_fp32(self.adapter) >= LARGE_BLOCK_BYTES:
            unmap_freed_tensors()
        info = SweepInfo(self.adapter, len(self.adapter), self.calib is not None)
        for p in self.passes:
            p.prepare(info)
        surveyors = [p for p in self.passes if p.wants_survey]
        if surveyors and self.saved is None:  # a resumed sweep restores the plan instead
            self._survey(surveyors)
        batches = self._capture() if self.calib is not None else []
        first = self._resume(batches)
        stages = self._stages()
        wants_dense = any(p.wants_dense for p in self.passes)
        n = len(self.adapter)
        with progress.phase("compress", total=n, unit="block", completed=first) as sweep:
            for i in range(first, n):
                self._sweep_block(i, n, batches, stages, wants_dense)
                with self._clock("spill"):
                    self._save(i, n, batches)
                sweep.advance()
        if self.keep:  # the caller gets the whole model: the head (left on meta while sweeping: it can
            # be as large as a block, and the last recorder stops the forward before it) and, without
            # calibration, the modules outside the blocks
            self.weights.materialize(self.model, "", self.dtype)
        return self.result

    # -- resume ----------------------------------------------------------------------------
    def _resume(self, batches: list[Batch]) -> int:
        """The first block to sweep: 0, or the one after the last block a killed run finished,
        with the passes, the per-linear records and the calibration activations as they were then
        (the call arguments come from this run's capture: they depend on the inputs only)."""
        if self.saved is None:
            return 0
        for p, carried in zip(self.passes, self.saved["passes"]):
            p.load_sweep_state(carried)
        self.result.linears = self.saved["linears"]
        self.result.forwards_per_block = self.saved["forwards_per_block"]
        if batches:
            for b, h in zip(batches, self.state.hidden(self.saved), strict=True):
                b.hidden = h
        return self.saved["done"] + 1

    def _save(self, i: int, n: int, batches: list[Batch]) -> None:
        if self.state is None:
            return
        hidden = [b.hidden for b in batches] if batches and i < n - 1 else None
        self.state.save_block(i, n, hidden, {"passes": [p.sweep_state() for p in self.passes],
                                             "linears": self.result.linears,
                                             "forwards_per_block": self.result.forwards_per_block})

    def _sweep_block(self, i: int, n: int, batches: list[Batch], stages: list[list], wants_dense: bool) -> None:
        """One block of the sweep: load -> statistics forward -> decide -> apply -> propagate -> spill."""
        block_t0 = time.perf_counter()
        block = self._load(i)
        ctx = BlockContext(block, batches)
        ctx.promises.update({n: dict(self.promised[n]) for n in block.linears if n in self.promised})
        if wants_dense:
            ctx.dense = {name: lin.weight.detach().float().clone() for name, lin in block.linears.items()}
        forwards = 0
        for stage in stages:
            work = [p for p in stage if p.targets(block)]
            if not work:
                continue
            if any(p.observed(block) for p in work):
                if self.calib is None:
                    raise SqueezeError(f"{work[0].name} needs calibration data (--calib)")
                with self._clock("statistics"):
                    self._stats_forward(ctx, work)
                    if distributed.active():  # distributed: every rank's statistics, combined
                        for p in work:
                            p.reduce_statistics(ctx)
                forwards += 1
            with self._clock("solve"):
                for p in work:
                    p.apply(ctx, p.decide(ctx))
                    self._promise(ctx, p)
        if batches and i < n - 1:
            self._propagate(ctx)
            forwards += 1
        self.result.forwards_per_block = max(self.result.forwards_per_block, forwards)
        self._record(ctx)
        if self.spill is not None:
            with self._clock("spill"):
                self.spill(block)
        if not self.keep:
            self.weights.release(block.module)
            self.weights.ckpt.close()  # unmap the shard pages read for this block
        if self.on_block:
            self.on_block(i, n, time.perf_counter() - block_t0)

    def _untied_head(self) -> str | None:
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if get else None
        if head is None or any(f"{n}.weight" in self.weights.tied for n, m in self.model.named_modules() if m is head):
            return None
        return next(n for n, m in self.model.named_modules() if m is head)

    def _stats_forward(self, ctx: BlockContext, stage: list[BlockPass]) -> None:
        wanted: dict[str, list] = {}
        for p in stage:
            for lin in p.observed(ctx.block):
                wanted.setdefault(lin.name, []).append(p)

        def observe(lin, x, out):
            y = out.reshape(-1, out.shape[-1]).float()
            for p in wanted[lin.name]:
                p.observe(ctx, lin, x, y)

        ctx.watch([ctx.block.linears[n] for n in wanted], observe)

    def _promise(self, ctx: BlockContext, p: BlockPass) -> None:
        if p.promise():
            for lin in p.targets(ctx.block):
                # promises add up (a mask, then quantization on it); "pass" names the first promiser
                ctx.promises[lin.name] = {"pass": p.name, **ctx.promises.get(lin.name, {}),
                                          **p.promise_for(ctx.block, lin)}

    def _record(self, ctx: BlockContext) -> None:
        from squeeze.sparsity import fraction_zero, parse_pattern, satisfies_nm

        for name, promise in ctx.promises.items():
            lin = ctx.block.linears[name]
            w = lin.weight
            zeros = round(fraction_zero(w), 6)
            rec = {"role": lin.role, "shape": list(w.shape), "sparsity": zeros, **promise}
            if "sparsity" in promise:  # the promise names the target; keep the zeros really there beside it
                rec["measured_sparsity"] = zeros
            if "pattern" in promise:
                n, m = parse_pattern(promise["pattern"])
                dim = 0 if promise.get("pattern_axis") == "out" else 1  # N:M groups along in (default) or out
                rec["pattern_ok"] = satisfies_nm(w, n, m, dim=dim)
                if w.shape[dim] % m:
                    rec["dense_tail_columns" if dim else "dense_tail_rows"] = w.shape[dim] % m
            self.result.linears[name] = rec
