"""dReLU (Turbo Sparse): ReLU-fy gated MLPs, then distil toward the original model to recover.

Song et al. (2024), "Turbo Sparse: Achieving LLM SOTA Performance with Minimal Activated
Parameters". SwiGLU ``down(silu(gate x) * up x)`` becomes ``down(relu(gate x) * relu(up x))``
(``variant=drelu``) or ``down(relu(gate x) * up x)`` (``variant=relu``, the plain ReLU-fication
of the gate, for comparison); most intermediate neurons then are exactly zero, which the
input-sparse decode path of :mod:`squeeze.runtime.act_sparse` skips.

Two roles: the conversion is a block pass (``apply`` swaps the activation block by block);
recovery (``recover_steps``) is a model stage, whole-model distillation (KL(original ||
converted) of the next-token distributions on the calibration rows), so ``squeeze.compress``
keeps every block in memory, runs it after the sweep, and exports the trained weights. It trains
the block parameters (embeddings and head frozen) and records sparsity and KL before/after. The
paper's recovery is ~150B tokens of continued pre-training; here a bounded number of steps on
the calibration data.

Resumable (:mod:`squeeze.train`): every ``save_every`` steps the training state is written to the
folder ``resume`` (default: ``~/.cache/squeeze/drelu/<fingerprint>/``, keyed by the source checkpoint,
calibration data and settings); a rerun of the same command continues from it; it is removed
after success.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

import torch

from squeeze import progress
from squeeze.adapters import Adapter, Block, Linear
from squeeze.errors import SqueezeError
from squeeze.passes.base import BlockPass, ModelContext, ModelStage, register
from squeeze.runtime.drelu import VARIANTS, convert_block
from squeeze.train.batches import batch_indices
from squeeze.train.distill import Distiller
from squeeze.train.loop import Optimisation, train
from squeeze.train.state import fingerprint


def _down_zero_fraction(model, adapter: Adapter, rows: list[torch.Tensor]) -> float:
    zeros = total = 0

    def hook(m, args, out):
        nonlocal zeros, total
        zeros += int((args[0] == 0).sum())
        total += args[0].numel()

    hs = [lin.module.register_forward_hook(hook) for i in range(len(adapter))
          for lin in adapter.block(i).by_role("down")]
    try:
        with torch.no_grad():
            for r in rows:
                model(input_ids=r[None])
    finally:
        for h in hs:
            h.remove()
    return zeros / max(total, 1)


_NOT_TRAINING = ("resume", "save_every", "eval_rows", "progress")  # settings that do not change the result


def _recover(model, teacher, samples: list[torch.Tensor], params: dict, s, folder: Path, identity: dict) -> dict:
    """Distil ``model`` toward ``teacher`` (KL of the next-token distributions) for
    ``s.recover_steps`` AdamW steps (gradient norm clipped to 1, linear warm-up over the first
    tenth of the steps, at most 20) on ``samples`` (equal-length token rows), training only
    ``params`` ({name: Parameter}); a state in ``folder`` of the same run (``identity``) is
    continued. Returns the loss summary."""
    data = torch.stack(samples)
    distiller = Distiller(model, teacher)
    steps = s.recover_steps
    optimisation = Optimisation(float(s.lr), "adamw", warmup=max(1, min(20, steps // 10)), clip=1.0)
    # progress: false keeps the recovery quiet even where a sink shows phases (the CLI)
    with contextlib.nullcontext() if s.progress else progress.muted():
        trained = train({n: params[n] for n in sorted(params)},
                        lambda step: distiller.loss(data[batch_indices(step, s.batch, len(data), s.seed, "distinct")]),
                        steps, optimisation, folder=folder, resume=True, identity=identity, save_every=s.save_every,
                        what="drelu recovery")
    losses = trained.losses
    return {"steps": steps, "resumed_from": trained.start, "seconds": round(trained.seconds, 2),
            "loss_first": round(losses[0], 5) if losses else None,
            "loss_last10": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 5) if losses else None}


@register
class DRelu(BlockPass):
    name = "drelu"
    examples = ({"variant": "drelu"}, {"variant": "relu"}, {"variant": "drelu", "recover_steps": 2, "batch": 2, "progress": False})

    @dataclasses.dataclass
    class Settings(BlockPass.Settings):
        variant: str = "drelu"  # drelu: relu(gate)*relu(up) | relu: relu(gate)*up
        recover_steps: int = 0
        lr: float = 1e-4
        batch: int = 4  # sequences per step
        seed: int = 0
        resume: str | None = None  # state folder; default: ~/.cache/squeeze/drelu/<fingerprint>/
        save_every: int = 50
        eval_rows: int = 8  # calibration rows used for the before/after sparsity and KL
        progress: bool = True  # show the recovery steps where phases are shown (squeeze.progress; the CLI)

    def validate(self) -> None:
        s = self.settings
        if s.variant not in VARIANTS:
            raise SqueezeError(f"drelu: variant must be one of {', '.join(VARIANTS)}, not {s.variant!r}")
        if int(s.recover_steps) < 0 or int(s.batch) < 1 or float(s.lr) <= 0 or int(s.save_every) < 1:
            raise SqueezeError("drelu: recover_steps >= 0, batch >= 1, lr > 0 and save_every >= 1 are required")
        s.recover_steps, s.batch = int(s.recover_steps), int(s.batch)

    @property
    def needs_calibration(self):  # rows to distil on (and to measure sparsity / KL)
        return self.settings.recover_steps > 0

    @classmethod
    def unsupported(cls, adapter: Adapter) -> str | None:
        if not adapter.gated_mlp:
            return (f"drelu needs a gated MLP (gate/up projections); {adapter.model_type} has a plain fc1/fc2 "
                    "MLP: use teal or wina for activation sparsity there")
        return None

    def targets(self, block: Block) -> list[Linear]:
        return [lin for lin in super().targets(block) if lin.role in ("gate", "gate_up")]

    def observed(self, block: Block) -> list[Linear]:
        return []

    def decide(self, ctx):
        return self.settings.variant

    def apply(self, ctx, variant) -> None:
        for gate in self.targets(ctx.block):
            try:
                convert_block(ctx.block, gate, variant)
            except ValueError as e:
                raise SqueezeError(f"drelu: {ctx.block.name}: {e}") from None

    def stages(self) -> list[ModelStage]:
        return [DReluRecovery(self)] if self.settings.recover_steps > 0 else []

    def describe(self) -> dict:
        d = super().describe()
        for k in ("resume", "progress"):
            d.pop(k, None)
        d["runtime"] = ("squeeze.runtime.drelu: squeeze.load re-applies the ReLU-fied MLP (the config's activation "
                        "cannot say dReLU); config.json is marked so transformers without squeeze refuses the export")
        return d


class DReluRecovery(ModelStage):
    """The model stage of ``drelu`` with ``recover_steps``: whole-model distillation of the
    ReLU-fied model toward the original (KL of the next-token distributions)."""

    name = "drelu"

    def __init__(self, owner: DRelu):
        self.settings, self.report = owner.settings, {}

    def run(self, ctx: ModelContext) -> None:
        s = self.settings
        if ctx.calibration is None:
            return
        from squeeze.loading import load

        model, adapter = ctx.model, ctx.adapter
        samples = list(ctx.calibration.samples)
        lengths = {int(x.numel()) for x in samples}
        if len(lengths) != 1:
            raise SqueezeError("drelu recovery needs equal-length calibration rows (use --packing concat)")
        teacher = load(ctx.source.path, dtype=ctx.dtype).eval().requires_grad_(False)
        held = samples[: s.eval_rows]
        judge = Distiller(model, teacher)
        rep = {"variant": s.variant, "down_input_zero_before": round(_down_zero_fraction(model, adapter, held), 4),
               "kl_before": round(judge.mean_loss(held, 1), 5)}
        params = {n: p for n, p in model.named_parameters() if n.startswith(adapter.blocks_path + ".")}
        folder, identity = _state(ctx, s)
        rep["train"] = _recover(model, teacher, samples, params, s, folder, identity)
        rep["down_input_zero_after"] = round(_down_zero_fraction(model, adapter, held), 4)
        rep["kl_after"] = round(judge.mean_loss(held, 1), 5)
        rep["measured_on"] = f"first {len(held)} calibration rows"
        shutil.rmtree(folder, ignore_errors=True)
        self.report = {self.name: rep}


def _state(ctx: ModelContext, settings) -> tuple[Path, dict]:
    """(resume folder, what identifies the run): the model, calibration data and the settings that
    change the result. The default folder is keyed by that identity, in ~/.cache/squeeze/drelu/,
    so a rerun of the same command finds and continues it."""
    identity = {"src": str(Path(ctx.source.path).resolve()), "calib": ctx.calibration.digest(),
                "dtype": str(ctx.dtype),
                **{k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_TRAINING}}
    if settings.resume:
        return Path(settings.resume), identity
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "squeeze" / "drelu" / fingerprint(identity), identity
