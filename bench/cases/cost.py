"""What a compression costs (issue 15 item 5): squeeze beside llm-compressor 0.14 on stories260k.

Each round runs both tools' one-shot command in its own process, one after the other, the order
alternating between rounds; a row is the median over the rounds (min-max beside it) of the
process's wall time (start to exit: imports, calibration, sweep, writing) and its peak RSS (the
process's own ``ru_maxrss``, from ``wait4``). squeeze: ``squeeze compress`` with the same rows
(128 x 400 tokens of stories260k-calib, no scoring); llm-compressor:
``../shared/anchors/llmcompressor_run.py`` in its own venv (``BENCH_LLMC_PYTHON`` or
``../.venv-llmc``), which saves without scoring. One thread each. squeeze's row also carries the
median seconds of each phase its report lists (startup = interpreter and imports, model code =
transformers' modeling import, then the sweep's phases).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cases.prune import CALIB, STORIES
from bench.cases.quant import llmc_python
from bench.harness import ROOT, SHARED, Case, Skip, latest, md_table

ANCHOR = SHARED / "anchors" / "llmcompressor_run.py"
LLMC_RECIPE = {"wanda": "wanda24", "sparsegpt": "sgpt24"}


def _timed(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process; raises with its stderr when it fails."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed (exit {p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def side_by_side(method: str, nsamples: int, seqlen: int, rounds: int) -> list[dict]:
    if not STORIES.is_dir() or not CALIB.is_file():
        raise Skip(f"{STORIES} or {CALIB} is missing")
    llmc, why = llmc_python()
    env = {**os.environ, "SQUEEZE_PROGRESS": "off"}
    got: dict[str, dict[str, list]] = {"squeeze": {"wall": [], "rss": []}, "llm-compressor": {"wall": [], "rss": []}}
    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        report = Path(tmp) / "report.json"
        ours = [sys.executable, "-m", "squeeze.cli.main", "compress", str(STORIES), "--method", method,
                "--pattern", "2:4", "--calib", str(CALIB), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                "--out", str(Path(tmp) / "squeeze"), "--overwrite", "--eval-data", "none", "--json", str(report)]
        theirs = [llmc, str(ANCHOR), LLMC_RECIPE[method], str(Path(tmp) / "llmc"), str(nsamples), str(seqlen)]
        for r in range(rounds):
            order = [("squeeze", ours), ("llm-compressor", theirs)]
            for tool, argv in order if r % 2 == 0 else order[::-1]:
                if tool == "llm-compressor" and llmc is None:
                    continue
                wall, rss = _timed(argv, env)
                got[tool]["wall"].append(wall)
                got[tool]["rss"].append(rss)
                if tool == "squeeze":
                    for k, v in json.loads(report.read_text())["seconds_by_phase"].items():
                        phases.setdefault(k, []).append(v)
    rows = [{"row": "squeeze", "metrics": {
        "wall_s": _summary(got["squeeze"]["wall"])["median"], "peak_rss_mb": _summary(got["squeeze"]["rss"])["median"],
        "wall_range": _summary(got["squeeze"]["wall"]), "rss_range": _summary(got["squeeze"]["rss"]),
        "phases_s": {k: round(statistics.median(v), 2) for k, v in phases.items()}},
        **({"ratio_to": "llm-compressor"} if llmc else {})}]
    if llmc:
        rows.append({"row": "llm-compressor", "metrics": {
            "wall_s": _summary(got["llm-compressor"]["wall"])["median"],
            "peak_rss_mb": _summary(got["llm-compressor"]["rss"])["median"],
            "wall_range": _summary(got["llm-compressor"]["wall"]), "rss_range": _summary(got["llm-compressor"]["rss"])}})
    else:
        rows.append({"row": "llm-compressor", "metrics": {"not_run": why}})
    return rows


CASES = [Case("cost", f"{m}-2:4", "bench.cases.cost:side_by_side",
              {"method": m, "nsamples": 128, "seqlen": 400, "rounds": 3},
              quick={"rounds": 1} if m == "wanda" else None) for m in ("wanda", "sparsegpt")]


def table(records) -> str:
    rows = []
    for c in CASES:
        got = {r["row"]: r for r in latest(records, c.suite, c.name)}
        if not got:
            continue
        ours, theirs = got["squeeze"], got["llm-compressor"]
        t = theirs["metrics"]
        if "not_run" in t:
            rows.append([c.params["method"] + " 2:4", f"{ours['metrics']['wall_s']:.1f}", "-",
                         f"{ours['metrics']['peak_rss_mb']:.0f}", "-", "-", "-"])
            continue
        o, ratio = ours["metrics"], ours["ratio_to"]["metrics"]
        rows.append([c.params["method"] + " 2:4",
                     f"{o['wall_s']:.1f} ({o['wall_range']['min']:.1f}-{o['wall_range']['max']:.1f})",
                     f"{t['wall_s']:.1f} ({t['wall_range']['min']:.1f}-{t['wall_range']['max']:.1f})",
                     f"{o['peak_rss_mb']:.0f}", f"{t['peak_rss_mb']:.0f}",
                     f"{ratio['wall_s']:.2f}x", f"{ratio['peak_rss_mb']:.2f}x"])
    return md_table(["one-shot, 128 x 400", "squeeze wall s", "llm-compressor wall s", "squeeze peak MiB",
                     "llm-compressor peak MiB", "wall ratio", "RSS ratio"], rows)


def table_phases(records) -> str:
    rows = []
    for c in CASES:
        for r in latest(records, c.suite, c.name):
            if r["row"] == "squeeze":
                rows.append([c.params["method"] + " 2:4"] + [f"{v:.2f}" for v in r["metrics"]["phases_s"].values()])
                names = list(r["metrics"]["phases_s"])
    return md_table(["squeeze, stories260k"] + names, rows) if rows else ""


TABLES = {"cost": table, "cost-phases": table_phases}
