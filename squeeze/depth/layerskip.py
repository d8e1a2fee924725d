"""The LayerSkip training recipe (Elhoushi et al. 2024, arXiv:2404.16710; reference:
facebookresearch/LayerSkip and torchtune's layer_dropout.py / early_exit_loss.py).

Continued training that makes early layers good at predicting the next token on their own, so
early exit and self-speculative decoding (:mod:`squeeze.runtime.speculative`) accept more drafts:

- **layer dropout**: block ``l`` is skipped with probability
  ``p_l = p_max * (exp(l * ln2 / (L-1)) - 1)`` (0 for the first block, ``p_max`` for the last),
  independently for every sample of the batch, with no rescaling of the kept outputs;
- **early-exit loss**: the hidden state after every enabled block goes through the *shared* final
  norm and LM head, and the per-layer cross-entropies are mixed with normalised scales
  (``sum_l``: cumulative sum of ``l+1`` over the enabled layers, the default; ``linear_l``:
  ``l+1``); non-final layers are multiplied by ``e_scale`` before normalising;
- **curriculum** of enabled exits: ``none`` (all), ``gradual`` (layer ``l`` joins once the
  trained fraction reaches ``0.5 * (L-l)/L``, so the last layers come first) or ``rotational``
  (every ``R``-th layer, shifted by one each step); the last layer is always trained;
- optional **distillation**: each exit also matches the original model's next-token
  distribution, KL(teacher || exit).

Training runs on the shared loop (:mod:`squeeze.train`): bounded (``steps``), seeded (batches and
dropout masks come from per-step seeds, so a resumed run sees the same data), AdamW with a short
warm-up and gradient clipping, checkpointed every ``save_every`` steps next to the output
(``.<out name>.layerskip-state/``) and resumable; the result is exported atomically as a plain
checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.runtime.stack import block_output, exit_logits
from squeeze.train.losses import kl_per_token


# -- pure schedule / loss math ---------------------------------------------------------------
def dropout_rates(num_layers: int, p_max: float) -> list[float]:
    """Per-layer skip probability, rising exponentially from 0 to ``p_max``."""
    if num_layers == 1:
        return [0.0]
    return [p_max * (math.exp(l * math.log(2) / (num_layers - 1)) - 1) for l in range(num_layers)]


def loss_scales(layer_ids: list[int], num_layers: int, scale: str = "sum_l", e_scale: float = 1.0) -> torch.Tensor:
    """Normalised weights of the enabled exits ``layer_ids`` (sorted, 0-based)."""
    ids = torch.tensor(sorted(layer_ids), dtype=torch.float64)
    if scale == "sum_l":
        w = torch.cumsum(ids + 1, 0)
    elif scale == "linear_l":
        w = ids + 1
    else:
        raise SqueezeError(f"unknown --scale {scale!r}: use sum_l or linear_l")
    w = w * torch.where(ids < num_layers - 1, torch.tensor(float(e_scale), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return w / w.sum()


def enabled_exits(num_layers: int, step: int, steps: int, curriculum: str = "none", rotation: int = 2) -> list[int]:
    """Layers whose exit loss is trained at ``step`` (0-based) of ``steps``; the last always is."""
    L = num_layers
    if curriculum == "none":
        on = list(range(L))
    elif curriculum == "gradual":
        frac = step / max(steps, 1)
        on = [l for l in range(L) if frac >= 0.5 * (L - l) / L]
    elif curriculum == "rotational":
        on = [l for l in range(L) if (l - step) % rotation == 0]
    else:
        raise SqueezeError(f"unknown --curriculum {curriculum!r}: use none, gradual or rotational")
    return sorted(set(on) | {L - 1})


def early_exit_loss(model: nn.Module, hiddens: list[torch.Tensor], labels: torch.Tensor, layer_ids: list[int],
                    scale: str = "sum_l", e_scale: float = 1.0, teacher_logits: torch.Tensor | None = None,
                    distill_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """sum_l s_l * CE(head(norm(h_l)), labels) over the enabled layers; ``labels`` are already
    shifted (token t+1 for position t; -100 ignored). Returns the loss and per-layer CEs."""
    L = len(hiddens)
    scales = loss_scales(layer_ids, L, scale, e_scale)
    total, per_layer = 0.0, []
    for s, l in zip(scales, sorted(layer_ids)):
        logits = exit_logits(model, hiddens[l]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss_l = ce
        if teacher_logits is not None and distill_weight:
            loss_l = loss_l + distill_weight * kl_per_token(teacher_logits, logits).mean()
        total = total + float(s) * loss_l
        per_layer.append(float(ce.detach()))
    return total, per_layer


# -- layer dropout on a live model -----------------------------------------------------------
class LayerDropout:
    """Forward hooks that skip each block per sample with its rate (training only)."""

    def __init__(self, blocks: nn.ModuleList, rates: list[float]):
        self.rates, self.generator, self.handles = rates, torch.Generator(), []
        for i, b in enumerate(blocks):
            if rates[i] > 0:
                self.handles.append(b.register_forward_hook(self._hook(i), with_kwargs=True))

    def seed(self, s: int):
        self.generator.manual_seed(s)

    def _hook(self, i):
        def hook(module, args, kwargs, out):
            if not module.training:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = block_output(out)
            skip = torch.rand(x.shape[0], generator=self.generator) < self.rates[i]
            y = torch.where(skip.to(x.device)[:, None, None], x, y)
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# -- the recipe ------------------------------------------------------------------------------
@dataclass
class LayerSkipConfig:
    steps: int = 100
    p_max: float = 0.2
    e_scale: float = 1.0
    scale: str = "sum_l"
    curriculum: str = "none"
    rotation: int = 2
    lr: float = 3e-4
    batch_size: int = 8
    seqlen: int = 256
    nsamples: int = 256
    distill_weight: float = 1.0
    save_every: int = 50
    seed: int = 0

    def validate(self):
        if self.steps < 1:
            raise SqueezeError(f"--steps must be >= 1; got {self.steps}")
        if not 0 <= self.p_max < 1:
            raise SqueezeError(f"--p-max must be in [0, 1); got {self.p_max}")
        if self.e_scale < 0:
            raise SqueezeError(f"--e-scale must be >= 0; got {self.e_scale}")
        if self.scale not in ("sum_l", "linear_l"):
            raise SqueezeError(f"unknown --scale {self.scale!r}: use sum_l or linear_l")
        if self.curriculum not in ("none", "gradual", "rotational"):
            raise SqueezeError(f"unknown --curriculum {self.curriculum!r}: use none, gradual or rotational")
        if self.batch_size < 1 or self.save_every < 1 or self.rotation < 1:
            raise SqueezeError("--batch-size, --save-every and rotation must be >= 1")


def state_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.layerskip-state"


def finetune(model_dir, out, calib: str = "builtin", distill_from=None, resume: bool = False,
             overwrite: bool = False, progress=None, **settings) -> dict:
    """Run the LayerSkip recipe on ``model_dir`` and export to ``out``. ``progress(step, steps,
    loss)`` is called after every step. Returns a report (losses, timings)."""
    import time

    t_start = time.perf_counter()
    from squeeze.formats import open_dense
    from squeeze.export import TensorSource, check_output_dir, commit, size_report, staging_dir, write_checkpoint
    from squeeze.loading import load
    from squeeze.modeling import WeightMap
    from squeeze.train.batches import batch_indices
    from squeeze.train.loop import Optimisation, train
    from squeeze.train.state import has_state

    cfg = LayerSkipConfig(**settings)
    cfg.validate()
    ckpt = open_dense(model_dir)
    check_output_dir(Path(out), ckpt.path, overwrite)
    torch.manual_seed(cfg.seed)
    model = load(ckpt.path, dtype=torch.float32)
    from squeeze.evaluation import model_kind

    if model_kind(model) != "causal":
        raise SqueezeError(f"{ckpt.path}: the LayerSkip recipe needs a causal LM")
    from squeeze.adapters import Adapter
    from squeeze.calib.build import build_calibration

    blocks = Adapter(model).blocks
    L = len(blocks)
    cal = build_calibration(ckpt, model.config, calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    samples, calib_info = cal.samples, cal.describe()
    data = torch.stack(samples)
    teacher = None
    if distill_from is not None:
        teacher = load(distill_from, dtype=torch.float32).eval().requires_grad_(False)
    model.train()
    rates = dropout_rates(L, cfg.p_max)
    dropper = LayerDropout(blocks, rates)
    sdir = state_dir(Path(out))
    if resume and not has_state(sdir):
        raise SqueezeError(f"--resume: no saved state at {sdir}")

    def loss_at(step: int) -> torch.Tensor:
        batch = data[batch_indices(step, cfg.batch_size, data.shape[0], cfg.seed, "any")]
        dropper.seed(cfg.seed * 1_000_003 + step + 7)
        hiddens, _ = _forward_hiddens(model, batch[:, :-1])
        tl = None
        if teacher is not None:
            with torch.no_grad():
                tl = teacher(input_ids=batch[:, :-1], use_cache=False).logits
        ids = enabled_exits(L, step, cfg.steps, cfg.curriculum, cfg.rotation)
        return early_exit_loss(model, hiddens, batch[:, 1:], ids, cfg.scale, cfg.e_scale, tl,
                               cfg.distill_weight if teacher is not None else 0.0)[0]

    identity = {"model": str(ckpt.path.resolve()), "calibration": calib_info, "distill_from": str(distill_from),
                **{k: v for k, v in asdict(cfg).items() if k != "save_every"}}
    try:
        trained = train(dict(model.named_parameters()), loss_at, cfg.steps,
                        Optimisation(cfg.lr, "adamw", warmup=max(1, cfg.steps // 20), clip=1.0), folder=sdir,
                        resume=resume, identity=identity, save_every=cfg.save_every, on_step=progress,
                        what="layerskip")
    finally:
        dropper.remove()
    model.eval()
    history = trained.losses
    entry = {"pass": "layerskip", **asdict(cfg), "dropout_rates": rates,
             "distill_from": str(distill_from) if distill_from else None}
    prior = list((getattr(model, "squeeze_record", {}) or {}).get("passes", []))
    record = {"source": str(ckpt.path), "passes": prior + [entry], "calibration": calib_info,
              "training": {"steps": cfg.steps, "first_loss": history[0] if history else None,
                           "final_loss": history[-1] if history else None, "seconds": trained.seconds}}
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    tensors = {key: params[name].detach() for name, key in WeightMap(model, ckpt).to_ckpt.items()}
    with staging_dir(Path(out)) as tmp:
        sizes = write_checkpoint(ckpt, tmp, TensorSource(ckpt, tensors), {}, record)
        commit(tmp, Path(out))
    import shutil

    shutil.rmtree(sdir, ignore_errors=True)
    from squeeze.report import peak_rss_mb

    return {"out": str(out), "steps": cfg.steps, "resumed_from": trained.start, "losses": history,
            "dropout_rates": rates, **record["training"], **size_report(ckpt, sizes, record),
            "train_seconds": round(trained.seconds, 3), "seconds": round(time.perf_counter() - t_start, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _forward_hiddens(model, ids):
    from squeeze.runtime.stack import layer_outputs

    return layer_outputs(model, ids)
