"""RAC calibration and recovery distillation on stories260k: KL(dense || pruned) and wall time.

Rows per target (Wanda 2:4 and 50% by default):
- ``real 400``      : calibration on 128 rows x the first 400 real tokens (the anchor setup)
- ``real 200``      : the first 200 tokens only (the control for RAC)
- ``200 + RAC 200`` : the first 200 tokens + 200 tokens the dense model generates (sampled, T=1)
- ``200 + greedy 200``: the same with greedy decoding
- ``real 400 + recover N``: the anchor-setup model after N recovery steps (KL distillation on the
  same 128 x 400 calibration tokens, batch 8, Adam lr 1e-4)
- ``200 + RAC 200 + recover N``: RAC and recovery combined

Scored on stories260k-eval.jsonl (full rows). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/rac_recover.py [--steps 100 300] [--targets 2:4 0.5] \
        [--method wanda] [--out bench/README_rac_recover.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260k"
CALIB = SHARED / "data" / "stories260k-calib.jsonl"
EVAL = SHARED / "data" / "stories260k-eval.jsonl"


def target_kw(t: str) -> dict:
    return {"pattern": t} if ":" in t else {"sparsity": float(t)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--targets", nargs="+", default=["2:4", "0.5"])
    ap.add_argument("--steps", nargs="*", type=int, default=[100, 300], help="recovery steps (none: skip)")
    ap.add_argument("--combo-steps", type=int, default=100, help="recovery steps for the RAC+recover row (0: skip)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--generate", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "README_rac_recover.md"))
    ap.add_argument("--append", action="store_true", help="add this run's table to --out instead of replacing it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import squeeze

    work = Path(tempfile.mkdtemp(prefix="rac_recover-"))
    full = args.prompt + args.generate
    rows = []

    def score(path):
        return squeeze.evaluate(path, str(EVAL), reference=str(MODEL))["kl"]

    def compress(tag, target, seqlen, **kw):
        out = work / tag
        t = time.perf_counter()
        r = squeeze.compress(str(MODEL), out, method=args.method, calib=str(CALIB), nsamples=args.nsamples,
                             seqlen=seqlen, seed=0, overwrite=True, **target_kw(target), **kw)
        secs = time.perf_counter() - t
        cal = r.report["calibration"]
        return out, secs, cal.get("prompt_tokens", cal["tokens"]), cal.get("generated_tokens", 0)

    def recover(src, tag, steps):
        out = work / tag
        r = squeeze.recover(src, out, reference=str(MODEL), calib=str(CALIB), nsamples=args.nsamples,
                            seqlen=full, steps=steps, lr=args.lr, seed=0, overwrite=True)
        return out, r.report["seconds"], r.report["loss_before"], r.report["loss_after"]

    for target in args.targets:
        label = f"{args.method} {target if ':' in target else f'{float(target):.0%}'}"

        def add(recipe, kl, secs, prompt_tok, gen_tok, extra="", label=label):
            rows.append((label, recipe, kl, secs, prompt_tok, gen_tok, extra))
            print(rows[-1], flush=True)

        base, secs, p, g = compress("base", target, full)
        add(f"real {full}", score(base), secs, p, g)
        short, secs, p, g = compress("short", target, args.prompt)
        add(f"real {args.prompt}", score(short), secs, p, g)
        rac, secs, p, g = compress("rac", target, args.prompt, calib_generate=args.generate,
                                   calib_generate_mode="sample")
        add(f"{args.prompt} + RAC {args.generate} (sample)", score(rac), secs, p, g)
        greedy, secs, p, g = compress("greedy", target, args.prompt, calib_generate=args.generate,
                                      calib_generate_mode="greedy")
        add(f"{args.prompt} + RAC {args.generate} (greedy)", score(greedy), secs, p, g)
        for steps in args.steps:
            rec, secs, lb, la = recover(base, f"rec{steps}", steps)
            add(f"real {full} + recover {steps}", score(rec), secs, args.nsamples * full, 0,
                f"train loss {lb:.3f} -> {la:.3f}")
        if args.combo_steps:
            rec, secs, lb, la = recover(rac, "racrec", args.combo_steps)
            add(f"{args.prompt} + RAC {args.generate} + recover {args.combo_steps}", score(rec), secs,
                args.nsamples * full, 0, f"train loss {lb:.3f} -> {la:.3f}")
    shutil.rmtree(work, ignore_errors=True)

    cmd = "OMP_NUM_THREADS=1 .venv/bin/python bench/rac_recover.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])
    lines = [
        "# RAC calibration and recovery distillation on stories260k",
        "",
        f"Measured with `{cmd.strip()}` (torch threads 1, on a shared 2-core machine under heavy load from",
        "other jobs: wall times are indicative only; compare within a column).",
        "",
        f"Model `stories260k`; calibration `stories260k-calib.jsonl`, {args.nsamples} rows; KL(dense || pruned)",
        "nats/token on `stories260k-eval.jsonl` (full rows). `seconds` is the wall time of the compress",
        "call (including RAC generation) or of the recover call (training + loss before/after + export).",
        f"Recovery: Adam lr {args.lr:g}, batch 8, on the {args.nsamples} x {full} real calibration tokens.",
        "",
        "| target | calibration / recipe | KL | seconds | prompt tokens | generated tokens | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, recipe, kl, secs, p, g, extra in rows:
        lines.append(f"| {label} | {recipe} | {kl:.4f} | {secs:.1f} | {p} | {g} | {extra} |")
    if args.append and Path(args.out).is_file():
        lines = Path(args.out).read_text().splitlines() + ["", f"## {args.method}", ""] + lines[2:]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
