"""The one benchmark harness: run cases in child processes, append JSON lines, render README tables.

A *case* is a function (``"module:function"``) plus its parameters. Every case runs in a fresh
interpreter with the same thread settings and environment, so nothing one case imports, caches or
leaks (allocator state, peak RSS, warm kernels) reaches the next. A case returns one or more rows;
rows that are compared (sparse vs dense decode, plain vs speculative) are measured by the same
call, side by side, and a row naming its baseline in ``ratio_to`` gets its metrics divided by the
baseline's. Every row becomes one JSON line in ``bench/results/<suite>.jsonl``::

    {"suite", "case", "row", "params", "metrics", "ratio_to": null | {"row", "metrics"},
     "mode": "quick" | "full", "imported", "run", "process": {"wall_s", "peak_rss_mb"},
     "machine", "versions", "git", "command", "time"}

README tables are generated from those lines: ``<!-- bench:table NAME -->`` ... ``<!-- bench:end -->``
sections of ``bench/README.md`` are rewritten by the table function NAME; prose stays as written.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from squeeze.versions import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
SCHEMA_KEYS = ("suite", "case", "row", "params", "metrics", "ratio_to", "mode", "imported", "run", "process",
               "machine", "versions", "git", "command", "time")


class Skip(Exception):
    """Raised by a case that cannot run here (missing model, optional tool): reported, not recorded."""


@dataclass(frozen=True)
class Case:
    suite: str
    name: str
    fn: str  # "module:function", imported in the child
    params: dict = field(default_factory=dict)
    quick: dict | None = None  # parameter overrides for the quick suite; None: full suite only
    threads: int = 1

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}"

    def params_for(self, mode: str) -> dict:
        return {**self.params, **(self.quick or {})} if mode == "quick" else dict(self.params)


def child_env(threads: int) -> dict:
    """The environment every case runs in: fixed thread counts (torch reads OMP_NUM_THREADS when it
    starts), offline hub, no hash salt, quiet transformers."""
    n = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
            "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        # the results and the README this harness writes do not make a checkout "dirty"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench/results", ":!bench/README.md"],
                               cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine(threads: int, load_avg: float) -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "load_avg": round(load_avg, 2)}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "squeeze"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def with_ratios(rows: list[dict]) -> list[dict]:
    """Resolve each row's ``ratio_to`` (a row name of the same call) into metric ratios."""
    by_name = {r["row"]: r for r in rows}
    out = []
    for r in rows:
        base = r.get("ratio_to")
        if base is not None:
            if base not in by_name:
                raise ValueError(f"row {r['row']!r}: ratio_to {base!r} is not a row of the same case")
            bm = by_name[base]["metrics"]
            ratios = {k: round(v / bm[k], 4) for k, v in r["metrics"].items()
                      if is_number(v) and is_number(bm.get(k)) and bm[k] != 0}
            r = {**r, "ratio_to": {"row": base, "metrics": ratios}}
        out.append(r)
    return out


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _normalise(result, params: dict) -> list[dict]:
    """A case returns a metrics dict (a single unnamed row) or a list of row dicts."""
    rows = result if isinstance(result, list) else [{"row": "", "metrics": result}]
    return [{"row": r.get("row", ""), "params": {**params, **r.get("params", {})}, "metrics": r["metrics"],
             "ratio_to": r.get("ratio_to")} for r in rows]


def settle(max_load: float, timeout_s: float = 600, log=print) -> None:
    """Wait until the 1-minute load average is at most ``max_load`` (other jobs on a shared
    machine), so every case starts from a comparable machine state; give up after ``timeout_s``."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < timeout_s:
        time.sleep(5)
    if os.getloadavg()[0] > max_load:
        log(f"load average still {os.getloadavg()[0]:.1f} > {max_load} after {timeout_s:.0f}s: running anyway")


def run_case(case: Case, mode: str, results_dir: Path = RESULTS, log=print, max_load: float | None = None) -> list[dict]:
    """Run one case in a child process; append its rows to ``results_dir/<suite>.jsonl``; return them."""
    params = case.params_for(mode)
    if max_load is not None:
        settle(max_load, log=log)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        spec = json.dumps({"fn": case.fn, "params": params})
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "bench.harness", spec, str(result_file)], cwd=ROOT,
                           env=child_env(case.threads), capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"{case.id} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        out = json.loads(result_file.read_text())
    if "skip" in out:
        log(f"{case.id}: skipped ({out['skip']})")
        return []
    now = datetime.datetime.now(datetime.UTC)
    common = {"suite": case.suite, "case": case.name, "mode": mode, "imported": False,
              "run": now.strftime("%Y%m%dT%H%M%S.%fZ"),  # sorts by time; shared by the rows of this call
              "process": {"wall_s": round(wall, 2), "peak_rss_mb": out["peak_rss_mb"]},
              "machine": machine(case.threads, load_before), "versions": versions(), "git": _git(),
              "command": f".venv/bin/python -m bench.run --{mode} --only {case.id}",
              "time": now.isoformat(timespec="seconds")}
    records = [{**common, **row} for row in out["rows"]]
    records = [{k: r[k] for k in SCHEMA_KEYS} for r in records]
    append(records, results_dir)
    return records


def append(records: list[dict], results_dir: Path = RESULTS) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    for suite in dict.fromkeys(r["suite"] for r in records):
        lines = "".join(json.dumps(r) + "\n" for r in records if r["suite"] == suite)
        with open(results_dir / f"{suite}.jsonl", "a") as f:
            f.write(lines)  # one write per case: an interrupted run leaves no half case


def load(results_dir: Path = RESULTS) -> list[dict]:
    out = []
    for f in sorted(results_dir.glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def latest(records: list[dict], suite: str, case: str, mode: str = "full") -> list[dict]:
    """The rows of the most recent run of one case (imported runs count as full): a table is
    always drawn from one run, so its side-by-side ratios stay side by side."""
    mine = [r for r in records if r["suite"] == suite and r["case"] == case
            and (r["mode"] == mode or (mode == "full" and r.get("imported")))]
    if not mine:
        return []
    last = max(r["run"] for r in mine)
    return [r for r in mine if r["run"] == last]


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


MARK = re.compile(r"(<!-- bench:table (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- bench:end -->)", re.DOTALL)


def render(text: str, tables: dict[str, Callable[[list[dict]], str]], records: list[dict]) -> str:
    """Rewrite every marked table section of ``text``; everything outside the markers is kept."""

    def sub(m):
        name = m["name"]
        if name not in tables:
            raise KeyError(f"README marks an unknown table {name!r}")
        return m[1] + tables[name](records).rstrip("\n") + "\n" + m[4]

    return MARK.sub(sub, text)


def _child(spec_json: str, result_file: str) -> None:
    # The thread count and log level reach torch and transformers through child_env, so a case
    # that imports neither (the harness's own test) starts in a fraction of a second.
    from bench.harness import Skip  # this file runs as __main__: the cases raise the importable class

    spec = json.loads(spec_json)
    module, name = spec["fn"].split(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        out = {"rows": with_ratios(_normalise(fn(**spec["params"]), spec["params"]))}
    except Skip as e:
        out = {"skip": str(e)}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(result_file).write_text(json.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
