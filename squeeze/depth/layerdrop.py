"""Remove whole decoder layers: importance-scored (ShortGPT's block influence, Men et al. 2024,
arXiv:2403.03853, or the KL of the output when the block is skipped) or evenly spaced
(LayerDrop's inference-time pruning, Fan et al. 2019, arXiv:1909.11556: keep evenly spaced layers).

The export is a smaller plain checkpoint: the removed blocks' tensors are left out, the remaining
blocks are renumbered in the tensor names, ``num_hidden_layers`` (or ``n_layer``) and per-layer
config lists such as ``layer_types`` shrink with them, so ``from_pretrained`` loads it with no
squeeze code. ``squeeze.json`` records which layers were removed and their scores.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from squeeze import progress
from squeeze.errors import SqueezeError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


# -- scoring ---------------------------------------------------------------------------------
def block_influence(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between a block's input and output hidden states (per token)."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    return 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()


@torch.no_grad()
def score_layers(model: nn.Module, samples: list[torch.Tensor], method: str = "cosine") -> list[float]:
    """Importance of every block on calibration samples (higher = more important).

    ``cosine``: block influence, one forward. ``kl``: KL(full || model without the block) in
    nats/token, one forward per block."""
    from squeeze.adapters import Adapter
    from squeeze.runtime.stack import block_output

    blocks = Adapter(model).blocks
    if method == "cosine":
        sums = [0.0] * len(blocks)
        with progress.phase("importance scoring (cosine)", total=len(samples), unit="sample") as shown:
            for ids in samples:
                io = {}

                def hook(i, io=io):
                    return lambda m, a, kw, o: io.__setitem__(i, (a[0] if a else kw["hidden_states"], block_output(o)))

                hs = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
                try:
                    model(input_ids=ids[None], use_cache=False)
                finally:
                    for h in hs:
                        h.remove()
                for i, (x, y) in io.items():
                    sums[i] += float(block_influence(x, y))
                shown.advance()
        return [s / len(samples) for s in sums]
    if method == "kl":
        # one forward of the full model, then one per skipped block, for every sample
        with progress.phase("importance scoring (kl)", total=(len(blocks) + 1) * len(samples), unit="forward") as shown:
            refs = []
            for s in samples:
                refs.append(torch.log_softmax(model(input_ids=s[None], use_cache=False).logits[0].double(), -1))
                shown.advance()
            scores = []
            for i, b in enumerate(blocks):
                h = b.register_forward_hook(_skip_hook, with_kwargs=True)
                try:
                    kl = 0.0
                    for s, ref in zip(samples, refs):
                        lp = torch.log_softmax(model(input_ids=s[None], use_cache=False).logits[0].double(), -1)
                        kl += float((ref.exp() * (ref - lp)).sum(-1).mean())
                        shown.advance()
                finally:
                    h.remove()
                scores.append(kl / len(samples))
        return scores
    raise SqueezeError(f"unknown layer score {method!r}: use cosine or kl")


def _skip_hook(module, args, kwargs, out):
    x = args[0] if args else kwargs["hidden_states"]
    return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x


def choose_layers(num_layers: int, remove: int, by: str = "importance", scores: list[float] | None = None) -> list[int]:
    """Indices of the layers to remove (sorted)."""
    if not 1 <= remove < num_layers:
        raise SqueezeError(f"--remove must be in [1, {num_layers - 1}] for a {num_layers}-layer model; got {remove}")
    if by == "even":
        keep = torch.linspace(0, num_layers - 1, num_layers - remove).round().long().tolist()
        return sorted(set(range(num_layers)) - set(keep))
    if by == "importance":
        if scores is None or len(scores) != num_layers:
            raise SqueezeError("importance-based removal needs one score per layer")
        return sorted(sorted(range(num_layers), key=lambda i: (scores[i], i))[:remove])
    raise SqueezeError(f"unknown --by {by!r}: use importance or even")


# -- in-memory removal -----------------------------------------------------------------------
def remove_layers(model: nn.Module, removed: list[int]) -> nn.Module:
    """Drop blocks in place, renumber the attention ``layer_idx`` (the KV-cache slot) and update
    the config; returns the model."""
    from squeeze.adapters import Adapter

    ad = Adapter(model)
    L = len(ad.blocks)
    keep = [i for i in range(L) if i not in set(removed)]
    kept = [ad.blocks[i] for i in keep]
    parent_name, _, attr = ad.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(kept))
    for new, block in enumerate(kept):
        for m in block.modules():
            if hasattr(m, "layer_idx") and isinstance(m.layer_idx, int):
                m.layer_idx = new
    _update_config_obj(model.config, keep, L)
    return model


def _update_config_obj(config, keep, L):
    config.num_hidden_layers = len(keep)
    for name in list(vars(config)):
        value = getattr(config, name)
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == L:
            setattr(config, name, type(value)(value[i] for i in keep))


def config_updates(config_dict: dict, keep: list[int], L: int) -> dict:
    out = {}
    for key in LAYER_COUNT_KEYS:
        if config_dict.get(key) == L:
            out[key] = len(keep)
    if not out:
        raise SqueezeError("cannot find the layer count in config.json (num_hidden_layers / n_layer)")
    for key, value in config_dict.items():
        if "layer" in key and isinstance(value, list) and len(value) == L:
            out[key] = [value[i] for i in keep]
    return out


# -- export ----------------------------------------------------------------------------------
def block_key_prefix(model: nn.Module, ckpt) -> str:
    """Checkpoint key prefix of the blocks, e.g. ``model.layers.`` (ends with a dot)."""
    from squeeze.adapters import Adapter
    from squeeze.modeling import WeightMap

    path = Adapter(model).blocks_path
    wm = WeightMap(model, ckpt)
    for name, key in wm.to_ckpt.items():
        if name.startswith(path + ".0."):
            suffix = name[len(path) + 1:]
            return key[: len(key) - len(suffix)]
    raise SqueezeError(f"{ckpt.path}: cannot find block 0's tensors in the checkpoint")


def renumbered_keys(keys, prefix: str, keep: list[int]) -> dict[str, str | None]:
    """{checkpoint key: its name once only the blocks ``keep`` remain, or None for a removed block's
    tensor} for every key under ``prefix`` (e.g. ``model.layers.``); other keys keep their names."""
    renum = {old: new for new, old in enumerate(keep)}
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    out = {}
    for k in keys:
        m = pat.fullmatch(k)
        if m:
            i = int(m.group(1))
            out[k] = f"{prefix}{renum[i]}.{m.group(2)}" if i in renum else None
    return out


def drop_layers(model_dir, out, remove: int, by: str = "importance", calib: str = "builtin", nsamples: int = 32,
                seqlen: int = 256, seed: int = 0, score: str = "kl", overwrite: bool = False,
                eval_data: str | None = None, eval_rows: int | None = None) -> dict:
    """Score, choose and remove ``remove`` layers of the checkpoint at ``model_dir``; export to ``out``.
    The report lists the removed and kept layers with their importance scores, sizes, time and memory."""
    import time

    from squeeze.report import peak_rss_mb

    t0 = time.perf_counter()
    from squeeze.calib.build import build_calibration
    from squeeze.formats import open_dense
    from squeeze.export import check_output_dir, commit, size_report, staging_dir, write_checkpoint
    from squeeze.loading import load

    from squeeze.evaluation import check_eval_data, quality, resolve_eval_data

    ckpt = open_dense(model_dir)
    check_output_dir(Path(out), ckpt.path, overwrite)
    data, why = resolve_eval_data(eval_data, ckpt.path)
    check_eval_data(data, ckpt.path)
    model = load(ckpt.path, dtype=torch.float32)
    from squeeze.adapters import Adapter

    L = len(Adapter(model).blocks)
    if not 1 <= remove < L:
        raise SqueezeError(f"--remove must be in [1, {L - 1}] for a {L}-layer model; got {remove}")
    scores, calib_info = None, None
    if by == "importance":
        cal = build_calibration(ckpt, model.config, calib, nsamples, seqlen, seed)
        scores, calib_info = score_layers(model, cal.samples, score), cal.describe()
    removed = choose_layers(L, remove, by, scores)
    prefix = block_key_prefix(model, ckpt)
    prior = [e for e in (getattr(model, "squeeze_record", {}) or {}).get("passes", [])]
    entry = {"pass": "layerdrop", "removed": removed, "by": by, "num_layers_before": L,
             "num_layers_after": L - len(removed)}
    if scores is not None:
        entry.update(score=score, scores=scores)
    record = {"source": str(ckpt.path), "passes": prior + [entry]}
    if calib_info:
        record["calibration"] = calib_info
    keep = [i for i in range(L) if i not in set(removed)]
    with staging_dir(Path(out)) as tmp:
        sizes = write_checkpoint(ckpt, tmp, None, config_updates(ckpt.config_dict, keep, L), record,
                                 keys=renumbered_keys(ckpt.key_to_shard, prefix, keep))
        commit(tmp, Path(out))
    del model  # scoring loads the export and the source afresh
    q = quality(Path(out), ckpt.path, data, eval_rows, skipped=why)
    return {"removed": removed, "kept": keep, "quality": q, "scores": scores, "score": score if scores is not None else None,
            "by": by, "out": str(out), "num_layers": L - len(removed), **size_report(ckpt, sizes, record),
            "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}

