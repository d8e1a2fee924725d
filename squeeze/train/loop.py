"""The training loop: ``steps`` optimizer steps of a loss that is a function of the step alone.

Everything that makes a run reproducible and resumable lives here, once:

- the loss of step ``s`` comes from the caller's ``loss_at(s)``, which must depend on ``s`` (and
  fixed settings) only, e.g. through :func:`squeeze.train.batches.batch_indices`;
- the learning rate of step ``s`` is :func:`lr_at` (linear warm-up, then constant or cosine);
- zero masks: for the parameters named in ``keep_zero`` the zero pattern is recorded before
  training; each step the gradient of those entries is zeroed *and* the weights are multiplied
  by the mask after the optimizer step. The second is what makes it provable: Adam's update is
  m/(√v+ε), which is exactly zero when m is, but re-applying the mask does not rely on that;
- every ``save_every`` steps the parameters, the optimizer state, the step and the losses go to
  a state folder (:mod:`squeeze.train.state`); ``resume=True`` continues from it and ends with
  tensors equal to an uninterrupted run's;
- progress: the steps are one :mod:`squeeze.progress` phase named ``what`` (with the loss), which
  the CLI shows; ``on_step(step, total, loss)`` is a hook for callers that act on a step (stop
  early, record), called after every step.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from squeeze import progress
from squeeze.errors import SqueezeError
from squeeze.train.state import fingerprint, has_state, load_state, save_state

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Optimisation:
    """How the parameters move. ``optimizer``: ``adam`` or ``adamw``, both without weight decay
    (decay would pull the kept weights toward zero; the callers distil, they do not regularise);
    ``lr``: the peak learning rate; ``schedule`` and ``warmup``: see :func:`lr_at`; ``clip``: the
    largest global gradient norm, ``None`` for no clipping."""

    lr: float
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup: int = 0
    clip: float | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer {self.optimizer!r} / schedule {self.schedule!r}: use one of "
                             f"{', '.join(OPTIMIZERS)} / {', '.join(SCHEDULES)}")


@dataclass
class Trained:
    losses: list[float]  # every step's loss, those before a resume included
    start: int  # the step this call began at: 0, or the resumed state's step
    baseline: dict  # what ``baseline()`` measured before the first step of the run
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # {name: where nonzero values may live}
    seconds: float = 0.0  # spent in this call's steps


def lr_at(step: int, steps: int, lr: float, schedule: str, warmup: int) -> float:
    """Learning rate of optimisation step ``step`` (0-based): linear warm-up from lr/warmup to lr
    over the first ``warmup`` steps, then ``constant`` or ``cosine`` decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    done = (step - warmup) / max(steps - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def zero_masks(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: bool mask of entries allowed to be nonzero} = where the weight is nonzero now."""
    return {n: p.detach() != 0 for n, p in params.items()}


def apply_masks(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], grads: bool) -> None:
    """Zero the pruned entries of the gradients (``grads=True``) or of the weights."""
    with torch.no_grad():
        for n, m in masks.items():
            t = params[n].grad if grads else params[n].data
            if t is not None:
                t.mul_(m)


def train(params: dict[str, nn.Parameter], loss_at: Callable[[int], torch.Tensor], steps: int,
          optimisation: Optimisation, *, keep_zero: Iterable[str] = (), folder: Path | None = None,
          resume: bool = False, identity: dict | None = None, save_every: int = 50,
          on_step: Callable[[int, int, float], None] | None = None,
          baseline: Callable[[], dict] | None = None, what: str = "training") -> Trained:
    """Train ``params`` ({name: parameter}, in a fixed order) for ``steps`` steps of ``loss_at``.

    ``folder``: where resume state goes (``None``: nowhere). With ``resume`` a state there of the
    same run (same ``identity``, the caller's description of model, data and settings, and same
    ``optimisation``) is continued; any other state there is removed. ``baseline()`` runs once,
    before the first step of a fresh run; its result is kept with the state, so a resumed run
    reports the original's. ``what`` names the run in error messages.
    """
    masks = zero_masks({n: params[n] for n in keep_zero})  # before any resumed state is loaded
    for p in params.values():
        p.requires_grad_(True)
    opt = OPTIMIZERS[optimisation.optimizer](list(params.values()), lr=optimisation.lr, weight_decay=0.0)
    settings = {**(identity or {}), "optimisation": asdict(optimisation)}
    if optimisation.schedule == "cosine":
        settings["steps"] = steps  # the decay depends on it; a constant rate lets a resume add steps
    fp = fingerprint(settings)
    start, losses, base = 0, [], None
    if folder is not None:
        if resume and has_state(folder):
            meta = load_state(folder, params, opt, fp, what)
            start, losses, base = meta["step"], meta["losses"], meta["baseline"]
            if start > steps:
                raise SqueezeError(f"the checkpoint in {folder} is at step {start}, past --steps {steps}; "
                                   "raise --steps")
        elif folder.exists():
            shutil.rmtree(folder)  # a stale run: without resume we start over
    if base is None:
        base = baseline() if baseline else {}
    t0 = time.perf_counter()
    try:
        with torch.enable_grad(), progress.phase(what, total=steps, unit="step", completed=start) as shown:
            for step in range(start, steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, optimisation.lr, optimisation.schedule, optimisation.warmup)
                opt.zero_grad(set_to_none=True)
                loss = loss_at(step)
                if not torch.isfinite(loss):
                    raise SqueezeError(f"{what} diverged at step {step + 1} (loss {float(loss.detach())}); lower --lr")
                loss.backward()
                apply_masks(params, masks, grads=True)
                if optimisation.clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), optimisation.clip)
                opt.step()
                apply_masks(params, masks, grads=False)
                losses.append(float(loss.detach()))
                shown.advance(loss=losses[-1])
                if on_step:
                    on_step(step + 1, steps, losses[-1])
                if folder is not None and (step + 1) % save_every == 0 and step + 1 < steps:
                    save_state(folder, step + 1, params, opt, {"fingerprint": fp, "settings": settings,
                                                                "baseline": base, "losses": losses})
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return Trained(losses, start, base, masks, time.perf_counter() - t0)
