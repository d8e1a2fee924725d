"""dReLU (Turbo Sparse): ReLU-fy gated MLPs, then distil toward the original model to recover.

Song et al. (2024), "Turbo Sparse: Achieving LLM SOTA Performance with Minimal Activated
Parameters". SwiGLU ``down(silu(gate x) * up x)`` becomes ``down(relu(gate x) * relu(up x))``
(``variant=drelu``) or ``down(relu(gate x) * up x)`` (``variant=relu``, the plain ReLU-fication
of the gate, for comparison); most intermediate neurons then are exactly zero, which the
input-sparse decode path of :mod:`squeeze.runtime.act_sparse` skips.

Why a pass whose ``finish`` trains: the conversion itself is per block (``apply`` swaps the
activation), but recovery is whole-model distillation (KL(original || converted) of the
next-token distributions on the calibration rows), which needs every block in memory at once.
The runner keeps the model when it fits (``run.keep``); ``finish`` then trains the block
parameters (embeddings and head frozen), re-hands every block to the export spill so the
trained weights are what is written, and records sparsity and KL before/after. It refuses
(clear error) when the runner streams blocks. The paper's recovery is ~150B tokens of
continued pre-training; here a bounded number of steps on the calibration data.

Resumable: every ``save_every`` steps the trainable tensors, Adam state and step are written to
``resume`` (default: a file in ``~/.cache/squeeze/drelu/`` keyed by the source checkpoint and
settings); a rerun of the same command continues from it; it is removed after success.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from squeeze.adapters import Adapter, Block, Linear
from squeeze.errors import SqueezeError
from squeeze.passes.base import BlockPass, ModelContext, ModelStage, register
from squeeze.runtime.drelu import VARIANTS, convert_block


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over tokens of [..., vocab] logits (nats/token)."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


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


@torch.no_grad()
def _mean_kl(student, teacher, rows) -> float:
    return sum(float(kl_per_token(teacher(input_ids=r[None]).logits, student(input_ids=r[None]).logits))
               for r in rows) / max(len(rows), 1)


def recover(student, teacher, samples: list[torch.Tensor], params: dict, steps: int, lr: float, batch: int,
            seed: int = 0, resume: Path | None = None, save_every: int = 50, progress: bool = True) -> dict:
    """Distil ``student`` toward ``teacher`` for ``steps`` AdamW steps on ``samples`` (equal-length
    token rows), training only ``params`` ({name: Parameter}). Returns the loss trace summary."""
    names = sorted(params)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=0.0)
    start, losses = 0, []
    if resume is not None and resume.is_file():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n in names:
                params[n].copy_(state["params"][n])
        opt.load_state_dict(state["optim"])
        start, losses = int(state["step"]), list(state["losses"])
    data = torch.stack(samples)
    warmup = max(1, min(20, steps // 10))
    sched = lambda s: min(1.0, (s + 1) / warmup)
    bar = _progress(progress)
    task = bar.add_task("dReLU recovery", total=steps, completed=start) if bar else None
    t0 = time.perf_counter()
    try:
        if bar:
            bar.start()
        for step in range(start, steps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # batch of step s depends on s only
            idx = torch.randperm(len(data), generator=g)[:batch]
            ids = data[idx]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            with torch.enable_grad():
                loss = kl_per_token(t_logits, student(input_ids=ids).logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], 1.0)
            for group in opt.param_groups:
                group["lr"] = lr * sched(step)
            opt.step()
            losses.append(float(loss))
            if bar:
                bar.update(task, advance=1, description=f"dReLU recovery  KL {losses[-1]:.4f}")
            if resume is not None and ((step + 1) % save_every == 0) and step + 1 < steps:
                tmp = resume.with_suffix(".tmp")
                torch.save({"step": step + 1, "losses": losses, "optim": opt.state_dict(),
                            "params": {n: params[n].detach() for n in names}}, tmp)
                os.replace(tmp, resume)
    finally:
        if bar:
            bar.stop()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return {"steps": steps, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 2),
            "loss_first": round(losses[0], 5) if losses else None,
            "loss_last10": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 5) if losses else None}


def _progress(enabled: bool):
    if not enabled:
        return None
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # pragma: no cover
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=False)


@register
class DRelu(BlockPass):
    name = "drelu"
    examples = ({"variant": "drelu"}, {"variant": "relu"}, {"variant": "drelu", "recover_steps": 2, "batch": 2})

    @dataclasses.dataclass
    class Settings(BlockPass.Settings):
        variant: str = "drelu"  # drelu: relu(gate)*relu(up) | relu: relu(gate)*up
        recover_steps: int = 0
        lr: float = 1e-4
        batch: int = 4  # sequences per step
        seed: int = 0
        resume: str | None = None  # checkpoint file; default: ~/.cache/squeeze/drelu/<hash>.pt
        save_every: int = 50
        eval_rows: int = 8  # calibration rows used for the before/after sparsity and KL
        progress: bool = True

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
        d["runtime"] = ("squeeze.runtime.drelu: squeeze.load re-applies the ReLU-fied MLP; plain from_pretrained "
                        "runs the original activation on these weights and is WRONG")
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
        rep = {"variant": s.variant, "down_input_zero_before": round(_down_zero_fraction(model, adapter, held), 4),
               "kl_before": round(_mean_kl(model, teacher, held), 5)}
        params = {n: p for n, p in model.named_parameters() if n.startswith(adapter.blocks_path + ".")}
        resume = Path(s.resume) if s.resume else _default_resume(ctx, s)
        resume.parent.mkdir(parents=True, exist_ok=True)
        rep["train"] = recover(model, teacher, samples, params, s.recover_steps, float(s.lr), s.batch, s.seed,
                               resume, s.save_every, s.progress)
        rep["down_input_zero_after"] = round(_down_zero_fraction(model, adapter, held), 4)
        rep["kl_after"] = round(_mean_kl(model, teacher, held), 5)
        rep["measured_on"] = f"first {len(held)} calibration rows"
        if resume.is_file():
            resume.unlink()
        self.report = {self.name: rep}


def _default_resume(ctx: ModelContext, settings) -> Path:
    samples = ctx.calibration.samples
    key = {"src": str(Path(ctx.source.path).resolve()), **dataclasses.asdict(settings),
           "calib": [int(x.numel()) for x in samples][:4], "n": len(samples)}
    key.pop("progress", None)
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "squeeze" / "drelu"
    return base / f"{h}.pt"
