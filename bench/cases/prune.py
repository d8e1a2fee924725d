"""`squeeze compress` speed and memory (Wanda 2:4, one thread), optionally beside llm-compressor.

The CLI runs as its own process, so "process wall s" includes the interpreter start and imports
and peak RSS is the tool's own report. With ``BENCH_LLMC_PYTHON`` set to the python of a venv with
llmcompressor (../shared/anchors/README.md), the anchor runs in the same case, right after ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, SHARED, Case, Skip, latest, md_table

STORIES = SHARED / "models" / "stories260k"
CALIB = SHARED / "data" / "stories260k-calib.jsonl"
EVAL = SHARED / "data" / "stories260k-eval.jsonl"


def make_llama20m(folder: Path, calib: Path) -> None:
    """A random Llama of ~20M parameters (hidden 256, 4 layers, vocab 32000) and 256 x 512 random
    calibration tokens: big enough that the sweep, not the imports, dominates."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 32000, (256, 512), generator=g).tolist()
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))


def _squeeze_cli(model, calib, nsamples, seqlen, out: Path) -> dict:
    cmd = [str(ROOT / ".venv/bin/squeeze"), "compress", str(model), "--out", str(out), "--method", "wanda",
           "--pattern", "2:4", "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
           "--overwrite", "--no-verify", "--json", f"{out}.json"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rep = json.loads(Path(f"{out}.json").read_text())
    return {"process_wall_s": round(time.perf_counter() - t, 2), "compress_s": rep["seconds"],
            "peak_rss_mb": rep["peak_rss_mb"]}


def _llmc(python: str, nsamples: int) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS %M", python, str(SHARED / "anchors/llmcompressor_stories.py"),
           str(STORIES), str(CALIB), str(EVAL), "wanda", "2:4", "0.5", str(nsamples)]
    t = time.perf_counter()
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    anchor = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("ANCHOR"))[len("ANCHOR "):])
    rss = next(int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("MAXRSS")) / 1024
    return {"process_wall_s": round(wall, 2), "compress_s": anchor["oneshot_s"], "peak_rss_mb": round(rss, 1)}


def stories(nsamples: int, seqlen: int) -> list[dict]:
    if not STORIES.is_dir():
        raise Skip(f"{STORIES} not present")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [{"row": "squeeze wanda 2:4", "metrics": _squeeze_cli(STORIES, CALIB, nsamples, seqlen, Path(tmp) / "o")}]
    llmc = os.environ.get("BENCH_LLMC_PYTHON")
    if llmc:  # side by side: our row is reported as a ratio to the anchor's
        rows.append({"row": "llm-compressor wanda 2:4", "metrics": _llmc(llmc, nsamples)})
        rows[0]["ratio_to"] = "llm-compressor wanda 2:4"
    return rows


def llama20m(nsamples: int, seqlen: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_llama20m(tmp / "llama20m", tmp / "calib.jsonl")
        return [{"row": "squeeze wanda 2:4",
                 "metrics": _squeeze_cli(tmp / "llama20m", tmp / "calib.jsonl", nsamples, seqlen, tmp / "o")}]


CASES = [
    Case("prune", "stories260k", "bench.cases.prune:stories", {"nsamples": 128, "seqlen": 400}, quick={}),
    Case("prune", "llama20m", "bench.cases.prune:llama20m", {"nsamples": 256, "seqlen": 512}),
]


def table_speed(records) -> str:
    rows = []
    for case, label in (("stories260k", "stories260k"), ("llama20m", "random llama 20M")):
        for r in sorted(latest(records, "prune", case), key=lambda r: r["row"], reverse=True):
            m, p = r["metrics"], r["params"]
            peak = m.get("peak_rss_mb_range") or f"{m['peak_rss_mb']:.0f}"
            rows.append([r["row"], f"{label} {p['nsamples']}x{p['seqlen']}", f"{m['process_wall_s']:.1f}",
                         f"{m['compress_s']:.1f}", peak])
    return md_table(["tool", "case", "process wall s", "compress s (in-process)", "peak RSS MB"], rows)


TABLES = {"prune-speed": table_speed}
