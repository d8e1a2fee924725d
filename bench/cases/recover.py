"""RAC calibration and recovery distillation (issue 3).

- ``rac-*`` (stories260k): KL(dense || pruned) after calibrating on real tokens, on shorter real
  prompts, on those prompts + tokens the dense model generates (RAC, sampled or greedy), and after
  ``squeeze.recover`` from the full-calibration model and from the RAC model. One case = one
  method, every row of it in one process (later rows recover from earlier rows' models).
- ``minilm-*``: all-MiniLM-L6-v2 at 2:4, which recovery recipe brings the mean-pooled embeddings
  back: every variant recovers the same SparseGPT 2:4 start, scored on the held-out builtin-eval
  sentences.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.cases.prune import CALIB, EVAL, STORIES
from bench.harness import Case, latest, md_table


def _target_kw(t: str) -> dict:
    return {"pattern": t} if ":" in t else {"sparsity": float(t)}


def rac(method: str, targets: list[str], prompt: int, generate: int, steps: list[int], combo_steps: int,
        lr: float = 1e-4, nsamples: int = 128, modes: tuple = ("sample", "greedy")) -> list[dict]:
    import squeeze

    full = prompt + generate
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def add(label, recipe, out, secs, prompt_tokens, generated, **extra):
            kl = squeeze.evaluate(out, str(EVAL), reference=str(STORIES))["kl"]
            rows.append({"row": f"{label} | {recipe}", "params": {"target": label, "recipe": recipe},
                         "metrics": {"kl": kl, "seconds": round(secs, 1), "prompt_tokens": prompt_tokens,
                                     "generated_tokens": generated, **extra}})

        def compress(tag, label, recipe, target, seqlen, **kw):
            t = time.perf_counter()
            r = squeeze.compress(str(STORIES), work / tag, method=method, calib=str(CALIB), nsamples=nsamples,
                                 seqlen=seqlen, seed=0, overwrite=True, **_target_kw(target), **kw)
            cal = r.report["calibration"]
            add(label, recipe, work / tag, time.perf_counter() - t, cal.get("prompt_tokens", cal["tokens"]),
                cal.get("generated_tokens", 0))
            return work / tag

        def recover(src, tag, label, recipe, n):
            r = squeeze.recover(src, work / tag, reference=str(STORIES), calib=str(CALIB), nsamples=nsamples,
                                seqlen=full, steps=n, lr=lr, seed=0, overwrite=True)
            add(label, recipe, work / tag, r.report["seconds"], nsamples * full, 0,
                train_loss_before=r.report["loss_before"], train_loss_after=r.report["loss_after"])

        for target in targets:
            label = f"{method} {target if ':' in target else f'{float(target):.0%}'}"
            base = compress("base", label, f"real {full}", target, full)
            compress("short", label, f"real {prompt}", target, prompt)
            rac_dir = None
            for mode in modes:
                d = compress(mode, label, f"{prompt} + RAC {generate} ({mode})", target, prompt,
                             calib_generate=generate, calib_generate_mode=mode)
                rac_dir = rac_dir or d
            for n in steps:
                recover(base, f"rec{n}", label, f"real {full} + recover {n}", n)
            if combo_steps and rac_dir:
                recover(rac_dir, "racrec", label, f"{prompt} + RAC {generate} + recover {combo_steps}", combo_steps)
    return rows


# name -> squeeze.recover keyword arguments (steps / lr / batch size / data / loss / schedule)
PACKED = {"calib": "builtin", "nsamples": 64, "seqlen": 128}
SENT = {"calib": "builtin", "rows": "sentences", "seqlen": 128}
AUG = "pairs,drop:0.15,replace:0.15"
VARIANTS: dict[str, dict] = {
    "none (one-shot only)": {},
    "packed, last, 300 x 8, lr 3e-4": {**PACKED, "steps": 300, "lr": 3e-4, "batch_size": 8},
    "sentences, last, 300 x 32, lr 3e-4": {**SENT, "steps": 300, "lr": 3e-4, "batch_size": 32},
    "sentences, pooled, 300 x 32, lr 3e-4": {**SENT, "steps": 300, "lr": 3e-4, "batch_size": 32,
                                             "encoder_loss": "pooled"},
    "sentences, layers+pooled, 300 x 32, lr 3e-4": {**SENT, "steps": 300, "lr": 3e-4, "batch_size": 32,
                                                    "encoder_loss": "layers,pooled"},
    "sentences, last, drop:0.15, 300 x 32, lr 3e-4": {**SENT, "steps": 300, "lr": 3e-4, "batch_size": 32,
                                                       "augment": "drop:0.15"},
    "sentences, last, replace:0.15, 300 x 32, lr 3e-4": {**SENT, "steps": 300, "lr": 3e-4, "batch_size": 32,
                                                          "augment": "replace:0.15"},
    "sentences, last, pairs+drop+replace, 300 x 32, lr 3e-4": {**SENT, "steps": 300, "lr": 3e-4, "batch_size": 32,
                                                                "augment": AUG},
    "sentences, last, pairs+drop+replace, 1000 x 32, cosine lr 5e-4": {
        **SENT, "steps": 1000, "lr": 5e-4, "batch_size": 32, "augment": AUG, "lr_schedule": "cosine", "warmup": 50},
    "sentences, last, pairs+drop+replace, 2500 x 32, cosine lr 5e-4": {
        **SENT, "steps": 2500, "lr": 5e-4, "batch_size": 32, "augment": AUG, "lr_schedule": "cosine", "warmup": 50},
}


def minilm(variant: str, start: str, recover: dict) -> list[dict]:
    """SparseGPT 2:4 start (built-in calibration 64 x 128), then one recovery variant, scored."""
    import squeeze
    from squeeze.defaults import default_model_path

    dense = default_model_path()
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "start"
        t0 = time.perf_counter()
        squeeze.compress(None, model, recipe=[{"pass": start, "pattern": "2:4"}], keep_in_memory=False)
        res["compress_seconds"] = round(time.perf_counter() - t0, 1)
        if recover:
            out = Path(tmp) / "rec"
            t0 = time.perf_counter()
            r = squeeze.recover(model, out, reference=dense, seed=0, checkpoint_every=10 ** 6, **recover)
            res.update(recover_seconds=round(time.perf_counter() - t0, 1), train_seconds=r.report["train_seconds"],
                       loss=r.report["loss"], loss_before=r.report["loss_before"],
                       loss_after=r.report["loss_after"], train_rows=r.report["calibration"]["nsamples"],
                       train_tokens=r.report["calibration"]["tokens"])
            info = squeeze.info(out)
            res["pattern_ok"] = all(rec.get("fits_2_4", False) for rec in info["linears"].values())
            model = out
        ev = squeeze.evaluate(model, "builtin-eval", reference=dense)
        res.update(cosine_mean=ev["cosine_mean"], cosine_min=ev["cosine_min"])
    return [{"row": variant, "metrics": res}]


RAC = {  # case -> parameters of one measured invocation
    "rac-wanda-p200": dict(method="wanda", targets=["2:4", "0.5"], prompt=200, generate=200, steps=[100, 300],
                           combo_steps=100),
    "rac-sparsegpt-p200": dict(method="sparsegpt", targets=["2:4", "0.5"], prompt=200, generate=200, steps=[100],
                               combo_steps=100),
    "rac-wanda-p32": dict(method="wanda", targets=["2:4", "0.5"], prompt=32, generate=368, steps=[], combo_steps=0),
    "rac-sparsegpt-p32": dict(method="sparsegpt", targets=["2:4", "0.5"], prompt=32, generate=368, steps=[],
                              combo_steps=0),
}
# quick: real 400 vs real 32 tokens, Wanda 2:4 (deterministic KL, seconds)
CASES = [Case("recover", n, "bench.cases.recover:rac", p,
              quick={"targets": ["2:4"], "modes": []} if n == "rac-wanda-p32" else None) for n, p in RAC.items()]
CASES += [Case("recover", "minilm-" + str(i), "bench.cases.recover:minilm",
               {"variant": v, "start": "sparsegpt", "recover": kw}, quick={} if not kw else None,
               threads=2 if kw.get("steps", 0) > 1000 else 1)  # the 2500-step row was measured on 2 threads
          for i, (v, kw) in enumerate(VARIANTS.items())]


def _rac_table(case):
    def table(records) -> str:
        rows = []
        for r in latest(records, "recover", case):
            m = r["metrics"]
            note = (f"train loss {m['train_loss_before']:.3f} -> {m['train_loss_after']:.3f}"
                    if "train_loss_before" in m else "")
            rows.append([r["params"]["target"], r["params"]["recipe"], f"{m['kl']:.4f}", f"{m['seconds']:.1f}",
                         m["prompt_tokens"], m["generated_tokens"], note])
        return md_table(["target", "calibration / recipe", "KL", "seconds", "prompt tokens", "generated tokens",
                         "note"], rows)
    return table


def table_minilm(records) -> str:
    rows = []
    for i, c in enumerate(x for x in CASES if x.name.startswith("minilm-")):
        for r in latest(records, "recover", c.name):
            m = r["metrics"]
            loss = f"{m['loss']} {m['loss_before']:.3f} → {m['loss_after']:.3f}" if "loss" in m else "–"
            wall = (f"{r['process']['wall_s']:.0f}" if r["process"].get("wall_s") else "") + \
                (f" ({r['machine']['threads']} threads)" if r["machine"].get("threads", 1) > 1 else "")
            rows.append([i + 1, r["row"], m.get("train_rows", "–"), f"{m['cosine_mean']:.4f}",
                         f"{m['cosine_min']:.4f}", loss, wall])
    rows.append(["–", "llm-compressor SparseGPT 2:4 (anchor, one-shot)", "", "0.874", "0.777", "", ""])
    return md_table(["#", "recovery (all from SparseGPT 2:4)", "rows", "cosine mean", "cosine min",
                     "train loss before → after", "wall s"], rows)


TABLES = {f"recover-{n}": _rac_table(n) for n in RAC}
TABLES["recover-minilm"] = table_minilm
