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

Resumable (:mod:`squeeze.train`): every ``save_every`` steps the training state is written to the
folder ``resume`` (default: ``~/.cache/squeeze/drelu/<hash>/``, keyed by the source checkpoint,
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

from squeeze.adapters import Adapter, Block, Linear
from squeeze.errors import SqueezeError
from squeeze.passes.base import Pass, register
from squeeze.runtime.act_sparse import ActSparsifier, block_sites, install
from squeeze.runtime.drelu import VARIANTS, convert_mlp, mlp_of
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
    with _progress(s.progress, steps) as on_step:
        trained = train({n: params[n] for n in sorted(params)},
                        lambda step: distiller.loss(data[batch_indices(step, s.batch, len(data), s.seed, "distinct")]),
                        steps, optimisation, folder=folder, resume=True, identity=identity, save_every=s.save_every,
                        on_step=on_step, what="drelu recovery")
    losses = trained.losses
    return {"steps": steps, "resumed_from": trained.start, "seconds": round(trained.seconds, 2),
            "loss_first": round(losses[0], 5) if losses else None,
            "loss_last10": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 5) if losses else None}


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """A rich progress bar as the loop's ``on_step`` callback (``None`` when disabled)."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as bar:
        task = bar.add_task("dReLU recovery", total=total)
        yield lambda step, steps, loss: bar.update(task, completed=step, description=f"dReLU recovery  KL {loss:.4f}")


@register
class DRelu(Pass):
    name = "drelu"
    needs_whole_model = True  # recovery distils the whole model in finish()

    @dataclasses.dataclass
    class Settings(Pass.Settings):
        variant: str = "drelu"  # drelu: relu(gate)*relu(up) | relu: relu(gate)*up
        recover_steps: int = 0
        lr: float = 1e-4
        batch: int = 4  # sequences per step
        seed: int = 0
        resume: str | None = None  # state folder; default: ~/.cache/squeeze/drelu/<hash>/
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

    def setup(self, run) -> None:
        super().setup(run)
        if not run.adapter.gated_mlp:
            raise SqueezeError(f"drelu needs a gated MLP (gate/up projections); {run.adapter.model_type} has a "
                               "plain fc1/fc2 MLP: use teal or wina for activation sparsity there")
        if self.settings.recover_steps > 0 and not run.keep:
            raise SqueezeError("drelu recovery trains the whole model and needs it in memory; this model was "
                               "judged too large (keep_in_memory=False): use --recover-steps 0")
        self.report = {}

    def targets(self, block: Block) -> list[Linear]:
        return [lin for lin in super().targets(block) if lin.role in ("gate", "gate_up")]

    def observed(self, block: Block) -> list[Linear]:
        return []

    def decide(self, block: Block, linear: Linear):
        return self.settings.variant

    def apply(self, block: Block, linear: Linear, variant) -> None:
        _convert_block(block, linear, variant)

    def finish(self, run) -> None:
        s = self.settings
        if s.recover_steps <= 0 or run.calib is None:
            return
        from squeeze.loading import load

        model, adapter = run.model, run.adapter
        samples = list(run.calib.samples)
        lengths = {int(x.numel()) for x in samples}
        if len(lengths) != 1:
            raise SqueezeError("drelu recovery needs equal-length calibration rows (use --packing concat)")
        teacher = load(run.weights.ckpt.path, dtype=run.dtype).eval().requires_grad_(False)
        held = samples[: s.eval_rows]
        judge = Distiller(model, teacher)
        rep = {"variant": s.variant, "down_input_zero_before": round(_down_zero_fraction(model, adapter, held), 4),
               "kl_before": round(judge.mean_loss(held, 1), 5)}
        params = {n: p for n, p in model.named_parameters() if n.startswith(adapter.blocks_path + ".")}
        folder, identity = _state(run, s)
        rep["train"] = _recover(model, teacher, samples, params, s, folder, identity)
        rep["down_input_zero_after"] = round(_down_zero_fraction(model, adapter, held), 4)
        rep["kl_after"] = round(judge.mean_loss(held, 1), 5)
        rep["measured_on"] = f"first {len(held)} calibration rows"
        if run.spill is not None:  # the sweep spilled the untrained blocks: hand the trained ones over
            for i in range(len(adapter)):
                run.spill(adapter.block(i))
        shutil.rmtree(folder, ignore_errors=True)
        self.report = {self.name: rep}

    def describe(self) -> dict:
        d = super().describe()
        for k in ("resume", "progress"):
            d.pop(k, None)
        d["runtime"] = ("squeeze.runtime.drelu: squeeze.load re-applies the ReLU-fied MLP; plain from_pretrained "
                        "runs the original activation on these weights and is WRONG")
        return d

    @classmethod
    def on_load(cls, model, entry: dict, path, record: dict) -> None:
        import re

        adapter = Adapter(model)
        t, ig = entry.get("targets"), entry.get("ignore")
        for i in range(len(adapter)):
            block = adapter.block(i)
            for lin in block.linears.values():
                if lin.role in ("gate", "gate_up") and (not t or re.search(t, lin.name)) \
                        and not (ig and re.search(ig, lin.name)):
                    _convert_block(block, lin, entry.get("variant", "drelu"))


def _convert_block(block: Block, gate: Linear, variant: str) -> None:
    inner = gate.name[len(block.name) + 1:]
    mlp = mlp_of(block.module, inner)
    prefix = inner.rpartition(".")[0]
    mine = [lin for lin in block.linears.values()
            if lin.role in ("gate", "up", "gate_up") and lin.name[len(block.name) + 1:].rpartition(".")[0] == prefix]
    try:
        convert_mlp(mlp, mine, variant)
    except ValueError as e:
        raise SqueezeError(f"drelu: {block.name}: {e}") from None
    # Mark the (now naturally sparse) MLP intermediate so decode skips its zeros.
    sites = block_sites({n: lin for n, lin in block.linears.items() if lin.name[len(block.name) + 1:]
                         .rpartition(".")[0] == prefix}, ("mlp_mid",))
    for host, consumers in sites.values():
        if "act_sparse" not in host.module._modules:
            install(host, consumers, ActSparsifier(host.in_features, mode="zero").to(host.module.weight.device))


def _state(run, settings) -> tuple[Path, dict]:
    """(resume folder, what identifies the run): the model, calibration data and the settings that
    change the result. The default folder is keyed by that identity, in ~/.cache/squeeze/drelu/,
    so a rerun of the same command finds and continues it."""
    identity = {"src": str(Path(run.weights.ckpt.path).resolve()), "calib": run.calib.digest(),
                "dtype": str(run.dtype),
                **{k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_TRAINING}}
    if settings.resume:
        return Path(settings.resume), identity
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "squeeze" / "drelu" / fingerprint(identity), identity
