"""Quality of the reconstruction pruning passes (issue 3): KL(dense || pruned) on stories260k
for magnitude / wanda / sparsegpt / dass, each alone, + DSnoT, + OWL (unstructured), and
combinations, at 2:4, 50% and 70%; time and peak RSS of each compression (each case runs in
its own subprocess, so its peak RSS is its own). Optionally all-MiniLM-L6-v2 at 2:4: mean /
min embedding cosine to the dense model on the builtin-eval sentences.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py                 # stories260k table
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --minilm        # + MiniLM 2:4 cosines
    .venv/bin/python bench/quality.py --only 'sparsegpt|wanda' --targets 2:4
    .venv/bin/python bench/quality.py --table bench/quality_results.jsonl   # re-print a table
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --llama20m      # time / RSS on the 20M random Llama

Results append to a JSON-lines file (``--results``) as each case finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
CALIB = SHARED / "data" / "stories260k-calib.jsonl"
EVAL = SHARED / "data" / "stories260k-eval.jsonl"
LLMC = {"sparsegpt": {"2:4": 0.450, "50%": 0.230, "70%": 0.731}, "wanda": {"2:4": 1.546, "50%": 0.839, "70%": 1.723}}
TARGETS = {"2:4": {"pattern": "2:4"}, "50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}}
DSNOT = {"pass": "dsnot"}


def cases(targets: list[str]) -> list[tuple[str, str, list]]:
    out = []
    for t in targets:
        tgt = TARGETS[t]
        unstructured = "sparsity" in tgt
        bases = {
            "magnitude": {"pass": "magnitude", **tgt},
            "wanda": {"pass": "wanda", **tgt},
            "sparsegpt": {"pass": "sparsegpt", **tgt},
            "dass": {"pass": "dass", **tgt},
            "dass(attn=sparsegpt)": {"pass": "dass", "attn_method": "sparsegpt", **tgt},
        }
        for name, entry in bases.items():
            out.append((name, t, [entry]))
            out.append((name + " + dsnot", t, [entry, DSNOT]))
        if unstructured:
            for name in ("wanda", "sparsegpt", "dass(attn=sparsegpt)"):
                owl = {**bases[name], "sparsity_profile": "owl"}
                out.append((name + " + owl", t, [owl]))
                out.append((name + " + owl + dsnot", t, [owl, DSNOT]))
    return out


def child(args) -> None:
    """Compress + evaluate one case; print one JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import squeeze

    recipe = json.loads(args.child)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if args.model == "minilm":
            r = squeeze.compress(None, out, recipe=recipe, keep_in_memory=False)
            from squeeze.defaults import default_model_path

            ev = squeeze.evaluate(out, "builtin-eval", reference=default_model_path())
            quality = {"cosine_mean": ev["cosine_mean"], "cosine_min": ev["cosine_min"]}
        elif args.calib:  # speed-only case (random model): no quality
            r = squeeze.compress(args.model, out, recipe=recipe, calib=args.calib, nsamples=args.nsamples,
                                 seqlen=512, keep_in_memory=False)
            quality = {}
        else:
            r = squeeze.compress(args.model, out, recipe=recipe, calib=str(CALIB), nsamples=args.nsamples,
                                 seqlen=400, keep_in_memory=False)
            ev = squeeze.evaluate(out, str(EVAL), reference=args.model)
            quality = {"kl": ev["kl"]}
    print(json.dumps({"seconds": r.report["seconds"], "peak_rss_mb": r.report["peak_rss_mb"],
                      "sparsity": r.report["summary"].get("sparsity"), "pass_reports": r.report.get("pass_reports"),
                      **quality}))


def run_case(name, target, recipe, model, nsamples, calib=None) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(recipe), "--model", str(model), "--nsamples", str(nsamples)]
    cmd += ["--calib", str(calib)] if calib else []
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"name": name, "target": target, "error": p.stderr.strip().splitlines()[-1:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    kind = "minilm" if model == "minilm" else "llama20m" if calib else "stories260k"
    return {"name": name, "target": target, "model": kind,
            "nsamples": nsamples, "recipe": recipe, "wall_seconds": round(wall, 1), **res}


def table(rows: list[dict]) -> str:
    stories = [r for r in rows if r.get("model") == "stories260k" and "kl" in r]
    targets = [t for t in TARGETS if any(r["target"] == t for r in stories)]
    names = list(dict.fromkeys(r["name"] for r in stories))
    get = {(r["name"], r["target"]): r for r in stories}
    lines = ["| method | " + " | ".join(f"KL {t}" for t in targets) + " | " +
             " | ".join(f"s / MB {t}" for t in targets) + " |",
             "|---|" + "---|" * (2 * len(targets))]
    for n in names:
        kl = [f"{get[(n, t)]['kl']:.3f}" if (n, t) in get else "" for t in targets]
        cost = [f"{get[(n, t)]['seconds']:.0f} / {get[(n, t)]['peak_rss_mb']:.0f}" if (n, t) in get else ""
                for t in targets]
        lines.append(f"| {n} | " + " | ".join(kl) + " | " + " | ".join(cost) + " |")
    for ref, vals in LLMC.items():
        lines.append(f"| llm-compressor {ref} (anchor) | " + " | ".join(f"{vals[t]:.3f}" for t in targets) + " |" +
                     " |" * len(targets))
    ratio = []
    for ref, vals in LLMC.items():
        for t in targets:
            if (ref, t) in get:
                ratio.append(f"{ref} {t}: {get[(ref, t)]['kl'] / vals[t]:.3f}x")
    out = "\n".join(lines) + "\n\nours / llm-compressor: " + ", ".join(ratio) + "\n"
    big = [r for r in rows if r.get("model") == "llama20m" and "seconds" in r]
    if big:
        out += "\n| 20M random Llama, 2:4 | compress s | peak RSS MB |\n|---|---|---|\n"
        for r in big:
            out += f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |\n"
    mini = [r for r in rows if r.get("model") == "minilm" and "cosine_mean" in r]
    if mini:
        out += "\n| MiniLM 2:4 | cosine mean | cosine min | s / MB |\n|---|---|---|---|\n"
        for r in mini:
            out += (f"| {r['name']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                    f"{r['seconds']:.0f} / {r['peak_rss_mb']:.0f} |\n")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--targets", default="2:4,50%,70%")
    ap.add_argument("--only", help="regex over case names")
    ap.add_argument("--minilm", action="store_true", help="also MiniLM 2:4 cosines")
    ap.add_argument("--minilm-only", action="store_true")
    ap.add_argument("--llama20m", action="store_true", help="only time / RSS on the 20M random Llama (256 x 512)")
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(ROOT / "bench" / "quality_results.jsonl"))
    ap.add_argument("--table", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.table:
        rows = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]
        print(table(rows))
        return
    if args.llama20m:
        sys.path.insert(0, str(ROOT / "bench"))
        from prune import make_llama20m

        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            model, calib = Path(tmp) / "llama20m", Path(tmp) / "calib.jsonl"
            make_llama20m(model, calib)
            for name in ("wanda", "sparsegpt", "dass", "sparsegpt + dsnot"):
                recipe = [{"pass": name.split()[0], "pattern": "2:4"}] + ([DSNOT] if "dsnot" in name else [])
                res = run_case(name, "2:4", recipe, model, 256, calib)
                rows.append(res)
                with open(args.results, "a") as f:
                    f.write(json.dumps(res) + "\n")
                print(name, res.get("seconds"), res.get("peak_rss_mb"), res.get("error", ""), flush=True)
        print(table(rows))
        return
    todo = []
    if not args.minilm_only:
        todo += [(n, t, r, args.model) for n, t, r in cases(args.targets.split(","))]
    if args.minilm or args.minilm_only:
        todo += [(n, t, r, "minilm") for n, t, r in cases(["2:4"])]
    if args.only:
        todo = [c for c in todo if re.search(args.only, c[0])]
    rows = []
    for name, target, recipe, model in todo:
        res = run_case(name, target, recipe, model, args.nsamples)
        rows.append(res)
        with open(args.results, "a") as f:
            f.write(json.dumps(res) + "\n")
        q = res.get("kl", res.get("cosine_mean", res.get("error")))
        print(f"{model if model == 'minilm' else 'stories'} {target:4s} {name:36s} {q}  "
              f"{res.get('seconds', '')}s {res.get('peak_rss_mb', '')}MB", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
