"""Depth methods (issue 6): early-exit quality before / after LayerSkip training, self-speculative
decoding vs plain decoding (same layer runner and cache, timed back to back per row: the speed-up
is the ratio), LayerDrop KL vs layers removed.

LayerSkip training, exit quality and layer dropping have no public API yet: this module is the one
place in bench/ that imports them from squeeze.depth and squeeze.runtime.

Trained models are kept under ``bench/out/depth/`` (git-ignored) so the speed cases reuse the
model the exit case trained; delete the folder to retrain.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.cases.prune import CALIB, EVAL, STORIES
from bench.harness import ROOT, Case, Skip, latest, md_table

WORK = ROOT / "bench" / "out" / "depth"
TRAINED = WORK / "stories-layerskip"


def rows(path, n=None, length=None):
    import torch

    with open(path) as f:
        out = [torch.tensor(json.loads(line)["input_ids"][:length]) for line in f]
    return out[:n] if n else out


def train(src, out: Path, steps, **kw) -> dict:
    if out.exists():  # trained by an earlier case or run: reuse it
        return json.loads((out / "squeeze.json").read_text())["training"]
    from squeeze.depth.layerskip import finetune

    WORK.mkdir(parents=True, exist_ok=True)
    return finetune(src, out, calib=str(CALIB), steps=steps, **kw)


def exits(steps: int, nrows: int) -> list[dict]:
    import squeeze
    from squeeze.runtime.early_exit import exit_quality

    t0 = time.perf_counter()
    rep = train(STORIES, TRAINED, steps, batch_size=8, seqlen=256, nsamples=256, lr=1e-3, p_max=0.2,
                distill_from=STORIES, distill_weight=1.0)
    train_s = round(time.perf_counter() - t0, 1)
    ev = rows(EVAL, nrows)
    before, after = exit_quality(squeeze.load(STORIES), ev), exit_quality(squeeze.load(TRAINED), ev)
    out = [{"row": f"exit {b['layer']}", "params": {"layer": b["layer"]},
            "metrics": {"acc_before": b["accuracy"], "acc_after": a["accuracy"], "kl_before": b["kl_to_final"],
                        "kl_after": a["kl_to_final"]}} for b, a in zip(before, after)]
    final = squeeze.evaluate(str(TRAINED), str(EVAL), reference=str(STORIES), max_rows=nrows)
    out.append({"row": "trained vs original", "metrics": {"kl": final["kl"], "ppl": final.get("ppl"),
                                                          "first_loss": rep.get("first_loss"),
                                                          "final_loss": rep.get("final_loss"), "train_s": train_s}})
    return out


def _sweep(model, prompts, new_tokens, exit_layers, ks, repeats, mode) -> list[dict]:
    from squeeze.depth.tune import sweep

    rows = sweep(model, prompts, new_tokens, exit_layers, ks, repeats, sample=mode == "sampling")
    names = {"acceptance_rate": "acceptance", "tokens_per_forward": "tokens_per_full_forward"}
    return [{"row": f"{mode} E{r['exit_layer']} k{r['num_speculations']}",
             "params": {"mode": mode, "exit_layer": r["exit_layer"], "k": r["num_speculations"]},
             "metrics": {names.get(k, k): v for k, v in r.items() if k not in ("exit_layer", "num_speculations")}}
            for r in rows]


def speed(model: str, modes: list, exit_layers: list, ks: list, nprompts: int, new_tokens: int,
          repeats: int = 3) -> list[dict]:
    import squeeze

    path = STORIES if model == "original" else TRAINED
    if not path.exists():
        raise Skip(f"{path} not trained yet: run depth/exit first")
    m = squeeze.load(path)
    prompts = [r[:16] for r in rows(EVAL, nprompts)]
    return [row for mode in modes for row in _sweep(m, prompts, new_tokens, exit_layers, ks, repeats, mode)]


def big(hidden: int, layers: int, steps: int, nprompts: int, new_tokens: int) -> list[dict]:
    """A larger random-init Llama trained briefly with the recipe (its exits all agree: the
    friendly case for early exit), then the same sweep."""
    import torch
    import transformers

    import squeeze
    from squeeze.runtime.early_exit import exit_quality

    src, trained = WORK / f"llama-{hidden}x{layers}-init", WORK / f"llama-{hidden}x{layers}-layerskip"
    if not src.exists():
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                       num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    rep = train(src, trained, steps, batch_size=8, seqlen=128, nsamples=256, lr=1e-3, p_max=0.2, e_scale=1.0)
    model = squeeze.load(trained)
    q = exit_quality(model, rows(EVAL, 16))
    prompts = [r[:32] for r in rows(EVAL, nprompts)]
    exits = sorted({max(1, layers // 4), max(1, layers // 2), max(1, 3 * layers // 4)})
    out = [{"row": "model", "metrics": {"params": sum(p.numel() for p in model.parameters()),
                                        "first_loss": rep.get("first_loss"), "final_loss": rep.get("final_loss"),
                                        "exit_accuracy": [r["accuracy"] for r in q]}}]
    for mode in ("greedy", "sampling"):
        out += _sweep(model, prompts, new_tokens, exits, [2, 4, 6, 8], 2, mode)
    return out


def layerdrop(removes: list, nrows: int) -> list[dict]:
    import squeeze
    from squeeze.depth.layerdrop import drop_layers

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for remove in removes:
            for by, score in (("importance", "cosine"), ("importance", "kl"), ("even", "cosine")):
                d = Path(tmp) / f"drop-{remove}-{by}-{score}"
                rep = drop_layers(STORIES, d, remove, by=by, calib=str(CALIB), nsamples=32, seqlen=256, score=score)
                kl = squeeze.evaluate(str(d), str(EVAL), reference=str(STORIES), max_rows=nrows)["kl"]
                name = "even" if by == "even" else f"importance ({score})"
                out.append({"row": f"{remove} {name}", "params": {"remove": remove, "by": name},
                            "metrics": {"removed": rep["removed"], "kl": kl}})
    return out


CASES = [
    Case("depth", "layerdrop", "bench.cases.depth:layerdrop", {"removes": [1, 2, 3, 4], "nrows": 64},
         quick={"removes": [1]}),
    Case("depth", "exit", "bench.cases.depth:exits", {"steps": 300, "nrows": 64}),
    Case("depth", "speed-original", "bench.cases.depth:speed",
         {"model": "original", "modes": ["greedy", "sampling"], "exit_layers": [1, 2, 3, 4], "ks": [2, 4, 6],
          "nprompts": 4, "new_tokens": 64},
         quick={"modes": ["greedy"], "exit_layers": [1], "ks": [6], "nprompts": 2, "new_tokens": 32, "repeats": 1}),
    Case("depth", "speed-layerskip", "bench.cases.depth:speed",
         {"model": "layerskip", "modes": ["greedy", "sampling"], "exit_layers": [1, 2, 3, 4], "ks": [2, 4, 6],
          "nprompts": 4, "new_tokens": 64}),
    Case("depth", "big", "bench.cases.depth:big", {"hidden": 256, "layers": 8, "steps": 150, "nprompts": 4,
                                                   "new_tokens": 64}),
]


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table_exit(records) -> str:
    recs = [r for r in latest(records, "depth", "exit") if "layer" in r["params"]]
    rows = [[f"{r['params']['layer']}{' (final)' if r is recs[-1] else ''}",
             *(_fmt(r["metrics"][k]) for k in ("acc_before", "acc_after", "kl_before", "kl_after"))] for r in recs]
    return md_table(["exit after layer", "acc before", "acc after", "KL to own final before",
                     "KL to own final after"], rows)


def _speed_table(case, mode):
    def table(records) -> str:
        keys = ["acceptance", "tokens_per_full_forward", "plain_tok_s", "spec_tok_s", "speedup"]
        heads = ["E", "k", "acceptance", "tokens/full fwd", "plain tok/s", "spec tok/s", "speed-up"]
        greedy = mode == "greedy"
        rows = [[r["params"]["exit_layer"], r["params"]["k"], *(_fmt(r["metrics"][k]) for k in keys)]
                + ([r["metrics"]["identical"]] if greedy else [])
                for r in latest(records, "depth", case) if r["params"].get("mode") == mode]
        return md_table(heads + (["identical"] if greedy else []), rows)
    return table


def table_layerdrop(records) -> str:
    got = {(r["params"]["remove"], r["params"]["by"]): r["metrics"] for r in latest(records, "depth", "layerdrop")}
    rows = []
    for n in sorted({k[0] for k in got}):
        row = [n]
        for by in ("importance (cosine)", "importance (kl)", "even"):
            m = got.get((n, by))
            row += [str(m["removed"]), _fmt(m["kl"])] if m else ["-", "-"]
        rows.append(row)
    return md_table(["removed", "importance (1−cos) layers", "KL", "importance (skip-KL) layers", "KL",
                     "even layers", "KL"], rows)


TABLES = {"depth-exit": table_exit, "depth-layerdrop": table_layerdrop}
for _case, _name in (("speed-original", "original"), ("speed-layerskip", "layerskip"), ("big", "big")):
    for _mode in ("greedy", "sampling"):
        TABLES[f"depth-{_name}-{_mode}"] = _speed_table(_case, _mode)
