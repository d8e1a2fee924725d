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
  never count in any term.
- **Training rows** (``rows`` / ``--rows``): ``packed`` (default): ``nsamples`` × ``seqlen``
  token windows as ``squeeze compress`` calibrates (``--packing``). ``sentences``: every text row
  split into sentences, each tokenized on its own with the tokenizer's special tokens (cut to
  ``seqlen``), batches right-padded with an attention mask; ``nsamples`` (optional) keeps a
  seeded subset. Sentence-embedding models are used on single sentences, and packed 128-token
  windows of running text are a different input distribution (other lengths and positions, no
  ``[SEP]`` per sentence): for all-MiniLM-L6-v2 this is the biggest single gain measured
  (``bench/README_quality.md``).
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
- **Masks stay.** For every linear in the blocks the zero pattern is recorded before training;
  each step the gradient of those entries is zeroed *and* the weights are multiplied by the mask
  after the optimizer step. The second is what makes it provable: Adam's update is
  m/(√v+ε), which is exactly zero when m is, but re-applying the mask does not rely on that.
  Nonzero weights may become tiny but never exactly zero by this procedure; zeros stay zeros,
  so N:M patterns and sparsity promised in ``squeeze.json`` still hold.
- **Deterministic and resumable.** The model runs in eval mode (no dropout); the batch order of
  step ``s`` is a function of ``seed`` and ``s`` alone. Every ``checkpoint_every`` steps the
  trainable tensors and Adam's moments are written (safetensors + JSON, no pickle) to the work
  folder ``<out parent>/.<out name>.recover-work/``; ``resume=True`` continues from there and
  gives the same result as an uninterrupted run. The folder is removed after a successful export.
- **Export** goes through the same atomic machinery as ``squeeze compress`` (staging folder,
  rename), keeps the pruned checkpoint's sharding, dtypes, tokenizer and sidecar, and appends a
  ``recover`` entry (steps, lr, loss before/after) to ``squeeze.json``'s passes.

The two models and the optimizer state are held in memory in float32 (unlike the block-streaming
compress sweep), so this is meant for models that fit in RAM a few times over.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from squeeze.checkpoint import Checkpoint
from squeeze.errors import SqueezeError
from squeeze.report import write_json
from squeeze.versions import without_versions

STATE_JSON = "state.json"


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
def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats, per position. logits: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(teacher_logits.float(), -1)
    logq = torch.log_softmax(student_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def relative_mse(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖h_s − h_t‖² / ‖h_t‖² over the whole batch (a scalar); with ``mask`` (B, T) only the
    positions where it is nonzero count (padding is ignored)."""
    t, s = teacher_hidden.float(), student_hidden.float()
    if mask is not None:
        m = (mask != 0).to(t.dtype)[..., None]
        t, s = t * m, s * m
    return ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)


def layerwise_relative_mse(teacher_states, student_states, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of :func:`relative_mse` of each block's output hidden state (the
    intermediate-layer distillation of TinyBERT, Jiao et al. 2020, "TinyBERT: Distilling BERT for
    Natural Language Understanding", with a relative instead of a plain MSE so every block
    counts equally whatever its scale). ``*_states``: the per-block outputs, same count."""
    if len(teacher_states) != len(student_states) or not teacher_states:
        raise ValueError(f"{len(teacher_states)} teacher vs {len(student_states)} student hidden states")
    return sum(relative_mse(t, s, mask) for t, s in zip(teacher_states, student_states)) / len(teacher_states)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention-mask-aware mean over tokens (the sentence-transformers pooling): (B, T, H) -> (B, H)."""
    if mask is None:
        return hidden.float().mean(1)
    m = (mask != 0).to(torch.float32)[..., None]
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_cosine_loss(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of 1 − cos(mean-pooled student, mean-pooled teacher): the quantity
    ``squeeze evaluate`` scores encoders by (its ``cosine_mean`` is 1 minus this on its data)."""
    t, s = mean_pool(teacher_hidden, mask), mean_pool(student_hidden, mask)
    return (1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()


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


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices of optimisation step ``step``: consecutive slices of a seeded permutation per
    epoch (a function of seed and step only, so a resumed run sees the same batches)."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def collate(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad ``rows`` (1-D token ids) to one (B, T) batch; the attention mask is ``None`` when
    every row has the same length (nothing to mask), else 1 on real tokens and 0 on padding."""
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows), None
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


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
def _load_plain(ckpt: Checkpoint, config, trust_remote_code: bool) -> nn.Module:
    """The checkpoint's weights as a plain transformers model (no run-time module swaps: we train
    and write back exactly the stored tensors)."""
    from squeeze.modeling import model_class

    cls = model_class(config, trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if cls is None:
                from transformers import AutoModelForCausalLM

                return AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32,
                                                            trust_remote_code=True, use_safetensors=True)
            return cls.from_pretrained(str(ckpt.path), dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise SqueezeError(f"{ckpt.path}: cannot load model ({str(e).splitlines()[0][:160]})") from None


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


class _Distiller:
    def __init__(self, student: nn.Module, teacher: nn.Module, kind: str, terms: dict[str, float] | None = None):
        self.student, self.teacher, self.kind = student, teacher, kind
        self.terms = terms or {"last": 1.0}

    def _outputs(self, model, ids, mask):
        extra = {} if mask is None else {"attention_mask": mask}
        if self.kind == "causal":
            return model(input_ids=ids, use_cache=False, **extra).logits
        out = model(input_ids=ids, output_hidden_states=True, **extra)
        last = getattr(out, "last_hidden_state", None)
        return out.hidden_states, out.hidden_states[-1] if last is None else last

    def loss(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of the batch ``ids`` (B, T) (``mask``: attention mask, padding ignored);
        differentiable w.r.t. the student."""
        with torch.no_grad():
            t = self._outputs(self.teacher, ids, mask)
        s = self._outputs(self.student, ids, mask)
        if self.kind == "causal":
            kl = kl_per_token(t, s)
            if mask is None:
                return kl.mean()
            m = (mask != 0).to(kl.dtype)
            return (kl * m).sum() / m.sum().clamp_min(1.0)
        (t_states, t_last), (s_states, s_last) = t, s
        total = 0.0
        for term, w in self.terms.items():
            if term == "last":
                value = relative_mse(t_states[-1], s_states[-1], mask)
            elif term == "layers":  # hidden_states[0] is the (frozen) embedding output: blocks only
                value = layerwise_relative_mse(t_states[1:], s_states[1:], mask)
            else:
                value = pooled_cosine_loss(t_last, s_last, mask)
            total = total + w * value
        return total

    @torch.no_grad()
    def mean_loss(self, samples: list[torch.Tensor], batch_size: int, pad_id: int = 0) -> float:
        """Token-weighted mean loss over every calibration sample."""
        total, count = 0.0, 0
        for i in range(0, len(samples), batch_size):
            ids, mask = collate(samples[i:i + batch_size], pad_id)
            n = ids.numel() if mask is None else int(mask.sum())
            total += float(self.loss(ids, mask)) * n
            count += n
        return total / max(count, 1)


# -- checkpoints for --resume --------------------------------------------------------------------
def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_state(folder: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Adam,
                meta: dict) -> None:
    """Tensors first (a new file per step), then the JSON that points at them, each renamed into
    place, so a crash at any moment leaves the previous checkpoint usable."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, p in params.items():
        tensors[f"param/{n}"] = p.detach().contiguous()
        st = opt.state.get(p, {})
        if st:
            tensors[f"exp_avg/{n}"] = st["exp_avg"].contiguous()
            tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].contiguous()
    name = f"state-{step:08d}.safetensors"
    save_file(tensors, str(folder / (name + ".tmp")))
    os.replace(folder / (name + ".tmp"), folder / name)
    (folder / (STATE_JSON + ".tmp")).write_text(json.dumps({**meta, "step": step, "tensors": name}, indent=2))
    os.replace(folder / (STATE_JSON + ".tmp"), folder / STATE_JSON)
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def _load_state(folder: Path, params: dict[str, nn.Parameter], opt: torch.optim.Adam, fingerprint: str) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((folder / STATE_JSON).read_text())
    if meta.get("fingerprint") != fingerprint:
        raise SqueezeError(f"{folder} holds a checkpoint of a different recovery run (other model, data or "
                           "settings); drop --resume to start over")
    tensors = load_file(str(folder / meta["tensors"]))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    state = {}
    for i, (n, _) in enumerate(params.items()):
        if f"exp_avg/{n}" in tensors:
            state[i] = {"step": torch.tensor(float(meta["step"])), "exp_avg": tensors[f"exp_avg/{n}"],
                        "exp_avg_sq": tensors[f"exp_avg_sq/{n}"]}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return meta


# -- the API -------------------------------------------------------------------------------------
def recover(pruned: str | Path, out: str | Path | None = None, *, reference: str | Path | None = None,
            calib: str = "builtin", steps: int = 100, lr: float = 1e-4, nsamples: int | None = None,
            seqlen: int | None = None, seed: int = 0, batch_size: int = 8, checkpoint_every: int = 50,
            packing: str = "auto", resume: bool = False, overwrite: bool = False,
            json_path: str | Path | None = None, trust_remote_code: bool = False, keep_model: bool = False,
            on_step=None, encoder_loss: str = "last", rows: str = "packed", augment: str | None = None,
            lr_schedule: str = "constant", warmup: int = 0) -> RecoverResult:
    """Fine-tune the pruned checkpoint ``pruned`` toward ``reference`` (its dense model) for
    ``steps`` Adam steps on ``calib`` data, keeping every zero weight zero, and export to ``out``.

    ``on_step(step, total, loss)`` is called after every step. Returns the report (also written
    to ``json_path``); the recovered model too when ``keep_model``. ``encoder_loss``, ``rows``,
    ``augment``, ``lr_schedule`` and ``warmup``: see the module docstring.
    """
    t_start = time.perf_counter()
    from squeeze.calib.build import build_calibration, load_tokenizer
    from squeeze.compressor import peak_rss_mb
    from squeeze.evaluation import model_kind
    from squeeze.export import TensorSource, check_output_dir, commit, staging_dir, write_checkpoint
    from squeeze.loading import read_record
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
    ckpt, ref_ckpt, out = Checkpoint(pruned), Checkpoint(reference), Path(out)
    check_output_dir(out, ckpt.path, overwrite)
    check_output_dir(out, ref_ckpt.path, True)  # only the overlap check; `out` was checked above
    if (read_record(ckpt.path).get("format") or {}).get("linears"):
        raise SqueezeError(f"{ckpt.path} is stored in the compressed 2:4 format; recover a dense-format export "
                           "(compress without --format compressed)")
    config, ref_config = load_config(ckpt, trust_remote_code), load_config(ref_ckpt, trust_remote_code)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = getattr(config, key, None), getattr(ref_config, key, None)
        if a != b:
            raise SqueezeError(f"--reference {ref_ckpt.path} is not the dense version of {ckpt.path}: "
                               f"{key} {b!r} vs {a!r}")
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_pos = getattr(text_cfg, "max_position_embeddings", None) or 2048
    seqlen = seqlen or min(512, max_pos)
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

    student = _load_plain(ckpt, config, trust_remote_code).eval()
    from squeeze.loading import load

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

    adapter = Adapter(student)
    student.requires_grad_(False)
    prefix = adapter.blocks_path + "."
    params = {n: p for n, p in student.named_parameters() if n.startswith(prefix)}
    for p in params.values():
        p.requires_grad_(True)
    linear_weights = {f"{name}.weight" for i in range(len(adapter)) for name in adapter.block(i).linears}
    masks = zero_masks({n: p for n, p in params.items() if n in linear_weights})
    zeros_before = int(sum((~m).sum() for m in masks.values()))
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    distiller = _Distiller(student, teacher, kind, terms)
    samples = calibration.samples

    run_settings = {"pruned": str(ckpt.path.resolve()), "reference": str(ref_ckpt.path.resolve()),
                    "calibration": calibration.digest(), "lr": lr, "batch_size": batch_size, "seed": seed}
    schedule = {"loss": loss_name, "augment": aug, "lr_schedule": lr_schedule, "warmup": warmup}
    if schedule != {"loss": loss_name, "augment": {}, "lr_schedule": "constant", "warmup": 0}:
        run_settings.update(schedule, steps=steps)  # the cosine decay depends on --steps
    fingerprint = _fingerprint(run_settings)
    work = work_dir(out)
    start, resumed_from, loss_before, losses = 0, None, None, []
    if resume and (work / STATE_JSON).is_file():
        meta = _load_state(work, params, opt, fingerprint)
        start = resumed_from = meta["step"]
        loss_before, losses = meta["loss_before"], meta["losses"]
        if start > steps:
            raise SqueezeError(f"the checkpoint in {work} is at step {start}, past --steps {steps}; raise --steps")
    elif work.exists():
        shutil.rmtree(work)  # a stale run: without --resume we start over
    if loss_before is None:
        loss_before = distiller.mean_loss(samples, batch_size, pad_id)

    t_train = time.perf_counter()
    for step in range(start, steps):
        batch = [samples[i] for i in batch_indices(step, batch_size, len(samples), seed)]
        if "drop" in aug or "replace" in aug:  # a function of seed and step, like the batch order (resume-safe)
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
            batch = [replace_tokens(drop_tokens(r, aug.get("drop", 0.0), g), aug.get("replace", 0.0), g, vocab_ids)
                     for r in batch]
        ids, mask = collate(batch, pad_id)  # (B, T), mask None when all rows have one length
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, lr_schedule, warmup)
        opt.zero_grad(set_to_none=True)
        loss = distiller.loss(ids, mask)
        if not torch.isfinite(loss):
            raise SqueezeError(f"recovery diverged at step {step + 1} (loss {float(loss)}); lower --lr")
        loss.backward()
        apply_masks(params, masks, grads=True)
        opt.step()
        apply_masks(params, masks, grads=False)
        value = float(loss.detach())
        losses.append(round(value, 6))
        if on_step:
            on_step(step + 1, steps, value)
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_state(work, step + 1, params, opt, {"fingerprint": fingerprint, "settings": run_settings,
                                                      "loss_before": loss_before, "losses": losses})
    train_seconds = time.perf_counter() - t_train
    student.requires_grad_(False)
    loss_after = distiller.mean_loss(samples, batch_size, pad_id)
    zeros_after = int(sum((p.detach()[~masks[n]] == 0).sum() for n, p in params.items() if n in masks))
    if zeros_after != zeros_before:  # cannot happen (masks re-applied every step); never export if it did
        raise SqueezeError(f"internal error: {zeros_before - zeros_after} pruned weights became nonzero")
    del teacher, opt
    gc.collect()

    entry = {"pass": "recover", "reference": str(ref_ckpt.path), "loss": loss_name,
             "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
             "calibration": calibration.describe(), "trained": "block parameters (embeddings, head frozen)",
             "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6),
             "pruned_weights_kept_zero": zeros_before}
    if schedule["lr_schedule"] != "constant" or warmup:
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
    with staging_dir(out) as tmp:
        sizes = write_checkpoint(ckpt, tmp, TensorSource(ckpt, tensors), {}, record, sidecar)
        commit(tmp, out)
    shutil.rmtree(work, ignore_errors=True)

    report = {"pruned": str(ckpt.path), "reference": str(ref_ckpt.path), "out": str(out.resolve()),
              "kind": kind, **{k: entry[k] for k in ("loss", "steps", "lr", "batch_size", "seed", "calibration",
                                                     "loss_before", "loss_after")},
              "lr_schedule": lr_schedule, "warmup": warmup, "augment": aug,
              "resumed_from": resumed_from, "losses": losses, "trainable_params": sum(p.numel() for p in
                                                                                       params.values()),
              "pruned_weights_kept_zero": zeros_before, "files": sizes,
              "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - t_start, 3),
              "peak_rss_mb": round(peak_rss_mb(), 1)}
    if json_path:
        write_json(json_path, report)
    return RecoverResult(out, report, student if keep_model else None)
