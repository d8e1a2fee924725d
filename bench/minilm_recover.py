"""all-MiniLM-L6-v2 at 2:4 (issue 3): which recovery-distillation recipe brings the mean-pooled
sentence embeddings back to the dense model's. Every variant starts from the same one-shot
pruned model (``--start``: SparseGPT 2:4 on every linear of the encoder blocks, built-in
calibration 64 x 128 tokens), runs ``squeeze.recover`` on the ``builtin`` corpus (the calibration
text) and is scored by ``squeeze.evaluate`` on the 240 held-out ``builtin-eval`` sentences: mean
and min cosine of the mean-pooled embeddings to the dense model's. Each variant runs in its own
subprocess, one after another (``OMP_NUM_THREADS`` threads), and appends one JSON line to
``--results`` as it finishes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/minilm_recover.py                    # every variant
    OMP_NUM_THREADS=1 .venv/bin/python bench/minilm_recover.py --only 'sent'      # regex over names
    .venv/bin/python bench/minilm_recover.py --list
    .venv/bin/python bench/minilm_recover.py --table bench/minilm_recover_results.jsonl
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
START = {"sparsegpt": [{"pass": "sparsegpt", "pattern": "2:4"}], "wanda": [{"pass": "wanda", "pattern": "2:4"}]}

# name -> squeeze.recover keyword arguments (steps / lr / batch size / data / loss / schedule)
PACKED = {"calib": "builtin", "nsamples": 64, "seqlen": 128}
SENT = {"calib": "builtin", "rows": "sentences", "seqlen": 128}
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
                                                                "augment": "pairs,drop:0.15,replace:0.15"},
    "sentences, last, pairs+drop+replace, 1000 x 32, cosine lr 5e-4": {
        **SENT, "steps": 1000, "lr": 5e-4, "batch_size": 32, "augment": "pairs,drop:0.15,replace:0.15",
        "lr_schedule": "cosine", "warmup": 50},
    "sentences, last, pairs+drop+replace, 2500 x 32, cosine lr 5e-4": {
        **SENT, "steps": 2500, "lr": 5e-4, "batch_size": 32, "augment": "pairs,drop:0.15,replace:0.15",
        "lr_schedule": "cosine", "warmup": 50},
}


def child(args) -> None:
    """Recover one variant from the start model, score it; print one JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import squeeze
    from squeeze.defaults import default_model_path

    kw = json.loads(args.child)
    dense = default_model_path()
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.start_dir
        if kw:
            out = Path(tmp) / "rec"
            t0 = time.perf_counter()
            r = squeeze.recover(model, out, reference=dense, seed=0, checkpoint_every=10 ** 6, **kw)
            res = {"recover_seconds": round(time.perf_counter() - t0, 1), "train_seconds": r.report["train_seconds"],
                   "loss": r.report["loss"], "loss_before": r.report["loss_before"],
                   "loss_after": r.report["loss_after"], "train_rows": r.report["calibration"]["nsamples"],
                   "train_tokens": r.report["calibration"]["tokens"]}
            model = out
            info = squeeze.info(out)
            res["pattern_ok"] = all(rec.get("fits_2_4", False) for rec in info["linears"].values())
        ev = squeeze.evaluate(model, "builtin-eval", reference=dense)
        res.update(cosine_mean=ev["cosine_mean"], cosine_min=ev["cosine_min"])
    print(json.dumps(res))


def build_start(method: str, folder: Path) -> dict:
    import squeeze

    t0 = time.perf_counter()
    r = squeeze.compress(None, folder, recipe=START[method], overwrite=True, keep_in_memory=False)
    return {"start": method, "compress_seconds": round(time.perf_counter() - t0, 1),
            "calibration": r.report["calibration"]}


def table(rows: list[dict]) -> str:
    lines = ["| start | recovery variant | cosine mean | cosine min | train loss before -> after | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('start', '')} | {r['name']} | error: {r['error']} | | | |")
            continue
        loss = f"{r['loss']}: {r['loss_before']:.4f} -> {r['loss_after']:.4f}" if "loss" in r else ""
        lines.append(f"| {r['start']} | {r['name']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {loss} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--start-dir", help=argparse.SUPPRESS)
    ap.add_argument("--start", default="sparsegpt", choices=sorted(START), help="one-shot pruning to start from")
    ap.add_argument("--only", help="regex over variant names")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--results", default=str(ROOT / "bench" / "minilm_recover_results.jsonl"))
    ap.add_argument("--table", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.list:
        for name, kw in VARIANTS.items():
            print(f"{name}: {json.dumps(kw)}")
        return
    if args.table:
        print(table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
        return
    todo = [(n, kw) for n, kw in VARIANTS.items() if not args.only or re.search(args.only, n)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start_dir = Path(tmp) / "start"
        start = build_start(args.start, start_dir)
        print(f"start: {args.start} 2:4 in {start['compress_seconds']} s", flush=True)
        for name, kw in todo:
            cmd = [sys.executable, __file__, "--child", json.dumps(kw), "--start-dir", str(start_dir)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            wall = round(time.perf_counter() - t0, 1)
            row = {"name": name, "start": args.start, "recover": kw, "wall_seconds": wall}
            if p.returncode != 0:
                row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
            else:
                row.update(json.loads(p.stdout.strip().splitlines()[-1]))
            rows.append(row)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:55s} {row.get('cosine_mean', row.get('error'))} {row.get('cosine_min', '')} {wall}s",
                  flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
