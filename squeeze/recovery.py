"""``squeeze.recover``: a short, mask-preserving fine-tune of a pruned model toward its dense model.

One-shot pruning (Wanda, SparseGPT, ...) fixes each layer in isolation; a few hundred steps of
distillation on calibration data let the kept weights compensate for each other across layers.
This is the "sparse fine-tuning" / knowledge-distillation recovery that llm-compressor users ask
for (vllm-project/llm-compressor#1028), kept deliberately small:

- **Loss.** Causal LMs: KL(dense || pruned) of the next-token distributions, averaged over all
  calibration tokens (the same quantity ``squeeze eval --reference`` reports). Encoders (no LM
  head): relative MSE of the last hidden state, ``‖h_pruned − h_dense‖² / ‖h_dense‖²`` summed over
  tokens, which pins down both direction and scale of every token embedding (the sentence
  embedding is their mean, so its cosine to the dense one follows).
- **Encoder loss terms** (``encoder_loss`` / ``--encoder-loss``, a comma-separated list of
  ``NAME[:WEIGHT]``, summed; default ``last``, the loss above): ``last``; ``layers``, the mean
  over blocks of the relative MSE of every block's output hidden state (intermediate-layer
  distillation as in TinyBERT, Jiao et al. 2020); ``pooled``, 1 − cosine of the
  attention-mask-aware mean-pooled sentence embeddings (the metric ``squeeze evaluate`` reports
  for encoders; a cosine variant of distilling sentence embeddings directly, which Reimers &
  Gurevych 2020 do with an MSE). Causal LMs always use the KL above and refuse other terms. Padding positions
  never count in any term. The losses live in :mod:`squeeze.train.losses`.
- **Training rows** (``rows`` / ``--rows``): ``packed`` (default): ``nsamples`` × ``seqlen``
  token windows as ``squeeze compress`` calibrates (``--packing``). ``sentences``: every text row
  split into sentences, each tokenized on its own with the tokenizer's special tokens (cut to
  ``seqlen``), batches right-padded with an attention mask; ``nsamples`` (optional) keeps a
  seeded subset. Sentence-embedding models are used on single sentences, and packed 128-token
  windows of running text are a different input distribution (other lengths and positions, no
  ``[SEP]`` per sentence): for all-MiniLM-L6-v2 this is the biggest single gain measured
  (``bench/README.md``, section 3).
- **Augmentation** (``augment`` / ``--augment``, comma-separated): ``pairs`` (with ``--rows
  sentences``) adds every two consecutive sentences of a row as one more row; ``drop:P`` removes
  each token but the first and last with probability P each time a row is drawn (token dropout;
  the same rows give new, nearby inputs, against over-fitting a small corpus); ``replace:P``
  replaces each such token with probability P by a random token of the vocabulary (not a special
  token): the teacher labels any input, so the student also meets the many token embeddings a
  small corpus never uses (the word-replacement augmentation of TinyBERT's data augmentation,
  simplified to uniform draws). Both are seeded by ``seed`` and the step, so a resumed run sees
  the same inputs.
- **Schedule** (``lr_schedule`` / ``--lr-schedule``, ``warmup`` / ``--warmup``): ``constant``
  (default) or ``cosine`` decay to 0 at the last step, after ``warmup`` steps of linear warm-up.
- **What trains.** Every parameter inside the transformer blocks (linears, their biases, norms);
  embeddings and the LM head stay frozen (they are not pruned, and are often tied).
- **Masks stay.** For every linear in the blocks the zero pattern is recorded before training
  and re-applied to gradients and weights every step (:mod:`squeeze.train.loop`): zeros stay
  zeros, so N:M patterns and sparsity promised in ``squeeze.json`` still hold.
- **Deterministic and resumable.** The model runs in eval mode (no dropout); the batch order of
  step ``s`` is a function of ``seed`` and ``s`` alone. Every ``checkpoint_every`` steps the
  training state is written (:mod:`squeeze.train.state`: safetensors + JSON, no pickle) to the
  work folder ``<out parent>/.<out name>.recover-work/``; ``resume=True`` continues from there and
  gives the same result as an uninterrupted run. The folder is removed after a successful export.
- **Export** goes through the same atomic machinery as ``squeeze compress`` (staging folder,
  rename), keeps the pruned checkpoint's sharding, dtypes, format (a packed export is written
  packed again), tokenizer and sidecar, and appends a ``recover`` entry (steps, lr, loss
  before/after) to ``squeeze.json``'s passes. A quantized export is refused: recover before
  quantizing.

The two models and the optimizer state are held in memory in float32 (unlike the block-streaming
compress sweep), so this is meant for models that fit in RAM a few times over.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from squeeze import progress
from squeeze.checkpoint import Checkpoint
from squeeze.errors import SqueezeError
from squeeze.report import write_json
from squeeze.versions import without_versions

@dataclass
class RecoverResult:
    out: Path
    report: dict
    model: nn.Module | None = None  # the recovered model (float32, in memory)


def work_dir(out: str | Path) -> Path:
    """Where checkpoints for ``--resume`` live: a hidden sibling of the output folder."""
    out = Path(out)
    return out.parent / f".{out.name}.recover-work"


# -- pure pieces ---------------------------------------------------------------------------------
ENCODER_LOSS_TERMS = ("last", "layers", "pooled")


def parse_encoder_loss(spec: str) -> dict[str, float]:
    """``"last"``, ``"layers,pooled:2"``, ... -> {term: weight}. Terms: ``last`` (relative MSE of
    the last hidden state), ``layers`` (mean relative MSE of every block's output), ``pooled``
    (1 − cosine of the mean-pooled embeddings); an optional ``:WEIGHT`` (default 1) scales a term."""
    if not isinstance(spec, str) or not spec.strip():
        raise SqueezeError(f"--encoder-loss must name one or more of {', '.join(ENCODER_LOSS_TERMS)} "
                           f"(got {spec!r})")
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name not in ENCODER_LOSS_TERMS:
            raise SqueezeError(f"--encoder-loss: unknown term {name!r} in {spec!r}; use a comma-separated list of "
                               f"{', '.join(ENCODER_LOSS_TERMS)}, each optionally NAME:WEIGHT")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = float("nan")
        if not (weight > 0 and math.isfinite(weight)):
            raise SqueezeError(f"--encoder-loss: the weight of {name!r} must be a positive number (got {w!r})")
        if name in out:
            raise SqueezeError(f"--encoder-loss: {name!r} is given twice in {spec!r}")
        out[name] = weight
    return out




def drop_tokens(row: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``row`` with each token except the first and the last removed with probability ``p``
    (token dropout: a new, nearby input each time a row is drawn; the first/last tokens are the
    special tokens for a tokenizer that adds them)."""
    if p <= 0 or len(row) <= 2:
        return row
    keep = torch.rand(len(row), generator=generator) >= p
    keep[0] = keep[-1] = True
    return row[keep]


def replace_tokens(row: torch.Tensor, p: float, generator: torch.Generator, vocab: torch.Tensor) -> torch.Tensor:
    """``row`` with each token except the first and the last replaced, with probability ``p``, by
    a token drawn uniformly from ``vocab`` (1-D ids): the teacher labels any input, so this shows
    the student token embeddings the small corpus never uses."""
    if p <= 0 or len(row) <= 2:
        return row
    hit = torch.rand(len(row), generator=generator) < p
    hit[0] = hit[-1] = False
    out = row.clone()
    out[hit] = vocab[torch.randint(len(vocab), (int(hit.sum()),), generator=generator)]
    return out


def parse_augment(spec: str | None) -> dict[str, float]:
    """``None``/``""`` -> {}; ``"pairs,drop:0.1,replace:0.1"`` -> {"pairs": 1.0, "drop": 0.1, "replace": 0.1}."""
    if spec is None or not str(spec).strip():
        return {}
    out: dict[str, float] = {}
    for part in str(spec).split(","):
        name, _, v = part.strip().partition(":")
        if name == "pairs" and not v:
            out["pairs"] = 1.0
        elif name in ("drop", "replace"):
            try:
                p = float(v)
            except ValueError:
                p = float("nan")
            if not 0 < p < 1:
                raise SqueezeError(f"--augment {name}:P needs a probability 0 < P < 1 (got {part.strip()!r})")
            out[name] = p
        else:
            raise SqueezeError(f"--augment: unknown item {part.strip()!r}; use a comma-separated list of "
                               "'pairs' (with --rows sentences), 'drop:P' (token dropout) and 'replace:P' "
                               "(random-token replacement), 0 < P < 1")
    return out


# -- loading -------------------------------------------------------------------------------------
def _check_args(steps, lr, batch_size, checkpoint_every, rows="packed", schedule="constant", warmup=0) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise SqueezeError(f"--steps must be a whole number >= 1 (got {steps!r})")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise SqueezeError(f"--lr must be a positive number (got {lr!r})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SqueezeError(f"--batch-size must be >= 1 (got {batch_size!r})")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise SqueezeError(f"--checkpoint-every must be >= 1 (got {checkpoint_every!r})")
    if rows not in ("packed", "sentences"):
        raise SqueezeError(f"--rows must be 'packed' or 'sentences' (got {rows!r})")
    if schedule not in ("constant", "cosine"):
        raise SqueezeError(f"--lr-schedule must be 'constant' or 'cosine' (got {schedule!r})")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup < steps:
        raise SqueezeError(f"--warmup must be a whole number of steps, 0 <= warmup < --steps {steps} (got {warmup!r})")


# -- the API -------------------------------------------------------------------------------------
def recover(pruned: str | Path, out: str | Path | None = None, *, reference: str | Path | None = None,
            calib: str = "builtin", steps: int = 100, lr: float = 1e-4, nsamples: int | None = None,
            seqlen: int | None = None, seed: int = 0, batch_size: int = 8, checkpoint_every: int = 50,
            packing: str = "auto", resume: bool = False, overwrite: bool = False,
            json_path: str | Path | None = None, trust_remote_code: bool = False, keep_model: bool = False,
            on_step=None, encoder_loss: str = "last", rows: str = "packed", augment: str | None = None,
            lr_schedule: str = "constant", warmup: int = 0, eval_data: str | None = None,
            eval_rows: int | None = None) -> RecoverResult:
    """Fine-tune the pruned checkpoint ``pruned`` toward ``reference`` (its dense model) for
    ``steps`` Adam steps on ``calib`` data, keeping every zero weight zero, and export to ``out``.

    ``on_step(step, total, loss)`` is called after every step. Returns the report (also written
    to ``json_path``); the recovered model too when ``keep_model``. ``encoder_loss``, ``rows``,
    ``augment``, ``lr_schedule`` and ``warmup``: see the module docstring.

    ``eval_data`` (as :func:`squeeze.compress`: a data source, ``auto`` or None = skip): quality
    against ``reference`` on held-out rows before (``pruned``) and after (``out``) recovery, in
    ``report["quality_before"]`` / ``["quality_after"]``. The training loss is measured on the
    training rows; this is what recovery did on rows it never saw.
    """
    t_start = time.perf_counter()
    from squeeze.calib.build import build_calibration, load_tokenizer
    from squeeze.report import peak_rss_mb
    from squeeze.evaluation import model_kind
    from squeeze.export import TensorSource, check_output_dir, commit, size_report, staging_dir, write_checkpoint
    from squeeze.loading import read_record
    from squeeze.formats import open_dense
    from squeeze.modeling import WeightMap, load_config

    _check_args(steps, lr, batch_size, checkpoint_every, rows, lr_schedule, warmup)
    terms = parse_encoder_loss(encoder_loss)
    aug = parse_augment(augment)
    if "pairs" in aug and rows != "sentences":
        raise SqueezeError("--augment pairs needs --rows sentences (it joins consecutive sentences)")
    if reference is None:
        raise SqueezeError("no dense model to distil from: give --reference DENSE_DIR")
    if out is None:
        raise SqueezeError("no output folder: give --out DIR")
    ckpt, ref_ckpt, out = open_dense(pruned), Checkpoint(reference), Path(out)
    check_output_dir(out, ckpt.path, overwrite)
    check_output_dir(out, ref_ckpt.path, True)  # only the overlap check; `out` was checked above
    quantized = [e.get("quant") for e in read_record(ckpt.path).get("passes") or [] if e.get("pass") == "quantize"]
    if quantized:
        raise SqueezeError(f"{ckpt.path} is quantized ({quantized[0]}), and training would move its weights off the "
                           "quantization grid: recover the pruned export before quantizing, then quantize the "
                           "recovered one (squeeze compress RECOVERED --out OUT --quantize ...)")
    from squeeze.evaluation import check_eval_data, resolve_eval_data

    check_eval_data(resolve_eval_data(eval_data, ref_ckpt.path)[0], ref_ckpt.path)
    config, ref_config = load_config(ckpt, trust_remote_code), load_config(ref_ckpt, trust_remote_code)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = getattr(config, key, None), getattr(ref_config, key, None)
        if a != b:
            raise SqueezeError(f"--reference {ref_ckpt.path} is not the dense version of {ckpt.path}: "
                               f"{key} {b!r} vs {a!r}")
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if rows != "sentences":  # sentence rows: every sentence unless --nsamples is given
        nsamples = nsamples or 128
    calibration = build_calibration(ckpt, config, calib, nsamples, seqlen, seed, packing, rows, "pairs" in aug,
                                    trust_remote_code)
    pad_id = getattr(text_cfg, "pad_token_id", None) or 0
    vocab_ids = None
    if "replace" in aug:  # every id of the embedding table but the tokenizer's special tokens
        tok = load_tokenizer(ckpt.path, trust_remote_code)
        special = set(getattr(tok, "all_special_ids", None) or []) | {pad_id}
        vocab_ids = torch.tensor([i for i in range(text_cfg.vocab_size) if i not in special], dtype=torch.long)

    from squeeze.loading import load, load_dense

    with progress.phase(f"loading {ckpt.path.name}"):
        student = load_dense(ckpt, config, torch.float32, trust_remote_code=trust_remote_code).eval()

    teacher = load(ref_ckpt.path, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    teacher.requires_grad_(False)
    kind = model_kind(student)
    if model_kind(teacher) != kind:
        raise SqueezeError(f"--reference is a {model_kind(teacher)} model, {ckpt.path} is a {kind} model")
    if kind == "causal" and terms != {"last": 1.0}:
        raise SqueezeError(f"--encoder-loss {encoder_loss!r} applies to encoders only; {ckpt.path} is a causal LM, "
                           "distilled by KL of its next-token distributions")
    loss_name = "kl" if kind == "causal" else "rel_mse" if terms == {"last": 1.0} else \
        ",".join(n if w == 1.0 else f"{n}:{w:g}" for n, w in terms.items())

    from squeeze.adapters import Adapter
    from squeeze.train.batches import batch_indices, collate
    from squeeze.train.distill import Distiller
    from squeeze.train.loop import Optimisation, train

    adapter = Adapter(student)
    student.requires_grad_(False)
    prefix = adapter.blocks_path + "."
    params = {n: p for n, p in student.named_parameters() if n.startswith(prefix)}
    linear_weights = {f"{name}.weight" for i in range(len(adapter)) for name in adapter.block(i).linears}
    distiller = Distiller(student, teacher, kind, terms)
    samples = calibration.samples

    def loss_at(step: int) -> torch.Tensor:
        batch = [samples[i] for i in batch_indices(step, batch_size, len(samples), seed)]
        if "drop" in aug or "replace" in aug:  # a function of seed and step, like the batch order (resume-safe)
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
            batch = [replace_tokens(drop_tokens(r, aug.get("drop", 0.0), g), aug.get("replace", 0.0), g, vocab_ids)
                     for r in batch]
        return distiller.loss(*collate(batch, pad_id))  # (B, T) ids, mask None when all rows have one length

    identity = {"pruned": str(ckpt.path.resolve()), "reference": str(ref_ckpt.path.resolve()),
                "calibration": calibration.digest(), "batch_size": batch_size, "seed": seed, "loss": loss_name,
                "augment": aug}
    trained = train(params, loss_at, steps, Optimisation(lr, "adam", lr_schedule, warmup),
                    keep_zero=[n for n in params if n in linear_weights], folder=work_dir(out), resume=resume,
                    identity=identity, save_every=checkpoint_every, on_step=on_step, what="recovery",
                    baseline=lambda: {"loss_before": distiller.mean_loss(samples, batch_size, pad_id)})
    loss_before, masks = trained.baseline["loss_before"], trained.masks
    zeros_before = int(sum((~m).sum() for m in masks.values()))
    loss_after = distiller.mean_loss(samples, batch_size, pad_id)
    zeros_after = int(sum((p.detach()[~masks[n]] == 0).sum() for n, p in params.items() if n in masks))
    if zeros_after != zeros_before:  # cannot happen (masks re-applied every step); never export if it did
        raise SqueezeError(f"internal error: {zeros_before - zeros_after} pruned weights became nonzero")
    del teacher
    gc.collect()

    entry = {"pass": "recover", "reference": str(ref_ckpt.path), "loss": loss_name,
             "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
             "calibration": calibration.describe(), "trained": "block parameters (embeddings, head frozen)",
             "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6),
             "pruned_weights_kept_zero": zeros_before}
    if lr_schedule != "constant" or warmup:
        entry.update(lr_schedule=lr_schedule, warmup=warmup)
    if aug:
        entry["augment"] = aug
    old = read_record(ckpt.path)
    record = without_versions(old)
    record["passes"] = list(record.get("passes") or []) + [entry]
    record.setdefault("source", {"path": str(ckpt.path), "model_type": config.model_type})

    weight_map = WeightMap(student, ckpt)
    tensors = {weight_map.to_ckpt[n]: p.detach() for n, p in params.items() if n in weight_map.to_ckpt}
    sidecar = {}
    from squeeze.export import SIDECAR

    if (ckpt.path / SIDECAR).is_file():
        from safetensors.torch import load_file

        sidecar = load_file(str(ckpt.path / SIDECAR))
    source = TensorSource(ckpt, tensors)
    with staging_dir(out) as tmp:
        sizes = write_checkpoint(ckpt, tmp, source, {}, record, sidecar)
        commit(tmp, out)
    shutil.rmtree(work_dir(out), ignore_errors=True)

    report = {"pruned": str(ckpt.path), "reference": str(ref_ckpt.path), "out": str(out.resolve()),
              "kind": kind, **{k: entry[k] for k in ("loss", "steps", "lr", "batch_size", "seed", "calibration",
                                                     "loss_before", "loss_after")},
              "lr_schedule": lr_schedule, "warmup": warmup, "augment": aug,
              "resumed_from": trained.start or None, "losses": [round(v, 6) for v in trained.losses],
              "trainable_params": sum(p.numel() for p in params.values()),
              "pruned_weights_kept_zero": zeros_before, "files": sizes,
              **size_report(ref_ckpt, sizes, record),  # bytes beside the dense model's
              "train_seconds": round(trained.seconds, 3)}
    if source.packed:  # the input's packed layout, written again (the size line says which)
        from squeeze.formats import kind_of

        report["format"] = {"kind": kind_of(source.packed), "packed_linears": len(source.packed)}
    report.update(_quality_around(ckpt.path, out, ref_ckpt.path, eval_data, eval_rows))
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if json_path:
        write_json(json_path, report)
    return RecoverResult(out, report, student if keep_model else None)


def _quality_around(pruned: Path, out: Path, reference: Path, eval_data, eval_rows) -> dict:
    """quality_before / quality_after: the pruned input and the recovered export against the dense
    reference on the same held-out rows (squeeze.evaluation.quality)."""
    from squeeze.evaluation import quality, resolve_eval_data

    data, why = resolve_eval_data(eval_data, reference)
    if data is None:
        return {"quality_before": {"measured": False, "reason": why}, "quality_after": {"measured": False,
                                                                                        "reason": why}}
    t0 = time.perf_counter()
    before = quality(pruned, reference, data, eval_rows)
    after = quality(out, reference, data, eval_rows)
    return {"quality_before": before, "quality_after": after, "quality_seconds": round(time.perf_counter() - t0, 3)}
