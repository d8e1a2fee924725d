"""Wall time and peak RSS of `squeeze compress` (Wanda 2:4), one thread, each run in its own process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune.py [--llmc .venv-llmc/bin/python]

Cases: stories260k (../shared, 128 x 400 tokens of its calibration file) and a random Llama of
~20M parameters (hidden 256, 4 layers, vocab 32000, 256 x 512 random tokens). With --llmc, the
llm-compressor anchor (../shared/anchors/llmcompressor_stories.py) runs on stories260k in the
same session for a side-by-side ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def run(cmd, env=None) -> float:
    """Wall seconds of a child process (peak RSS comes from the tool's own report)."""
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def make_llama20m(folder: Path, calib: Path) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 32000, (256, 512), generator=g).tolist()
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    print(f"random llama: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def squeeze_case(model, calib, nsamples, seqlen, out, threads=1):
    cmd = [str(ROOT / ".venv/bin/squeeze"), "compress", str(model), "--out", str(out), "--method", "wanda",
           "--pattern", "2:4", "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
           "--overwrite", "--no-verify", "--json", str(out) + ".json"]
    secs = run(cmd, {"OMP_NUM_THREADS": str(threads)})
    rep = json.loads(Path(str(out) + ".json").read_text())
    return secs, rep["peak_rss_mb"], rep["seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmc", help="python of a venv with llmcompressor, to run the anchor side by side")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (SHARED / "models/stories260k").is_dir():
            secs, rss, inner = squeeze_case(SHARED / "models/stories260k", SHARED / "data/stories260k-calib.jsonl",
                                            128, 400, tmp / "stories")
            rows.append(("squeeze wanda 2:4", "stories260k 128x400", secs, inner, rss))
            if args.llmc:
                cmd = [args.llmc, str(SHARED / "anchors/llmcompressor_stories.py"), str(SHARED / "models/stories260k"),
                       str(SHARED / "data/stories260k-calib.jsonl"), str(SHARED / "data/stories260k-eval.jsonl"),
                       "wanda", "2:4", "0.5", "128"]
                t = time.perf_counter()
                r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
                total = time.perf_counter() - t
                line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ANCHOR"))
                anchor = json.loads(line[len("ANCHOR "):])
                rss = next(int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("MAXRSS")) / 1024
                rows.append(("llm-compressor wanda 2:4", "stories260k 128x400", total, anchor["oneshot_s"], rss))
        else:
            print(f"skipping stories260k: {SHARED} not present")
        make_llama20m(tmp / "llama20m", tmp / "calib20m.jsonl")
        secs, rss, inner = squeeze_case(tmp / "llama20m", tmp / "calib20m.jsonl", 256, 512, tmp / "l20")
        rows.append(("squeeze wanda 2:4", "random llama 20M 256x512", secs, inner, rss))
    print("| tool | case | process wall s | compress s (in-process) | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
