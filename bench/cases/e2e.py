"""End-to-end decode on a ~1B Llama (issue 14 item 4): exports beside their dense bf16 source.

A random bf16 Llama of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32
heads, 4 KV heads, vocab 32000, untied head; :func:`bench.cases.streaming.make_llama`) is
compressed by the CLI, one ``squeeze compress`` process per export (int8 and int4 g128
round-to-nearest, TEAL 50 / 70 / 90% calibrated on 8 x 64 random token ids with no dense prompt
prefix, and TEAL 70% composed with int4 and with int8), then ``squeeze.bench_models`` sets every
export beside the source, in bf16, at 1 and at 2 threads: alternating rounds, each case in its
own process, batch-1 decode tokens/s as the median of the rounds and its ratio to the source's.
Beside each ratio stands the bound the export's bytes allow (:mod:`squeeze.roofline`: the bytes
one decode step reads ÷ the memory read bandwidth measured in the same run with the same threads)
and how much of that bound the run-time reaches. Random weights say nothing about quality, so
none is scored here (the quality targets are measured on stories260k / MiniLM elsewhere).

Each export is loaded once (``squeeze.load``, bf16) in a child process before the bench; one that
fails to compress or to load gets a row with its error and stays out of the bench, so the other
exports are still measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cases.streaming import make_llama
from bench.harness import RESULTS, ROOT, Case, latest, md_table

TEAL = ["--method", "teal", "--set", "dense_prefix=0"]  # decode masks every token; so does calibration
INT8 = ["--quantize", "int8", "--quant-solver", "rtn"]
INT4 = ["--quantize", "int4", "--quant-solver", "rtn", "--group-size", "128"]
# export name -> (squeeze compress flags, the issue's batch-1 speed-up target over the dense bf16 source)
EXPORTS = {
    "int8": (INT8, 1.8),
    "int4-g128": (INT4, 2.5),
    "teal50": (TEAL + ["--act-sparsity", "0.5"], 1.3),
    "teal70": (TEAL + ["--act-sparsity", "0.7"], 2.3),
    "teal90": (TEAL + ["--act-sparsity", "0.9"], 5.0),
    # the issue asks the best composed recipe for >= 3x (at a KL stated from stories260k)
    "teal70-int4": (TEAL + ["--act-sparsity", "0.7"] + INT4, 3.0),
    "teal70-int8": (TEAL + ["--act-sparsity", "0.7"] + INT8, 3.0),
}
TINYLLAMA = {"layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000}
CALIB_ROWS, CALIB_LEN = 8, 64
# a folder that keeps the source and the exports between runs (only the bench is measured again;
# delete an export's folder to make it anew); unset: a temporary folder, removed afterwards
KEEP_ENV = "BENCH_E2E_DIR"


def _calib(path: Path, vocab: int) -> Path:
    from tests.tiny import token_rows, write_jsonl

    return write_jsonl(token_rows(CALIB_ROWS, CALIB_LEN, vocab=vocab), path)  # ids from 3: past pad / bos / eos


def _compress(src: Path, out: Path, flags: list[str], calib: Path) -> str | None:
    """Run ``squeeze compress`` in its own process; None when it wrote the export, else its error."""
    argv = [sys.executable, "-m", "squeeze.cli.main", "compress", str(src), "--out", str(out), *flags,
            "--calib", str(calib), "--nsamples", str(CALIB_ROWS), "--seqlen", str(CALIB_LEN), "--eval-data", "none"]
    p = subprocess.run(argv, cwd=ROOT, env={**os.environ, "SQUEEZE_PROGRESS": "off"}, capture_output=True, text=True)
    return None if p.returncode == 0 else f"compress failed (exit {p.returncode}): {_last_line(p.stderr)}"


PROBE = """import gc, json, sys
import squeeze
errors = {}
for path in sys.argv[1:]:
    try:
        squeeze.load(path, dtype="bfloat16")
    except Exception as e:  # any failure is this export's, recorded as its row
        errors[path] = f"load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    gc.collect()  # one ~1B model in memory at a time
print(json.dumps(errors))
"""


def _load_errors(paths: list[Path]) -> dict[str, str]:
    """{path: error} of the exports ``squeeze.load`` refuses in bf16, from one child process (a
    failure inside the bench would stop every case; one here leaves the others measured)."""
    if not paths:
        return {}
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "SQUEEZE_PROGRESS": "off"})
    if p.returncode != 0:
        raise RuntimeError(f"the load probe failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _weight_bytes(src: Path) -> int:
    from squeeze.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    return sum(ckpt.nbytes(k) for k in ckpt.key_to_shard)


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def e2e(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, exports: list[str],
        threads: list[int], rounds: int, new_tokens: int, prompt_len: int, keep_json: bool = False) -> list[dict]:
    import squeeze

    keep = os.environ.get(KEEP_ENV)
    with (contextlib.nullcontext(keep) if keep
          else tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=os.environ.get("BENCH_TMP"))) as tmp:
        src = Path(tmp) / "dense-bf16"
        if not (src / "config.json").is_file():
            make_llama(src, layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                       vocab=vocab)
        weight_bytes = _weight_bytes(src)
        calib = _calib(Path(tmp) / "calib.jsonl", vocab)
        errors = {}
        for name in exports:
            if keep and (Path(tmp) / name / "config.json").is_file():
                continue  # kept from an earlier run (exports are written atomically: complete or absent)
            err = _compress(src, Path(tmp) / name, EXPORTS[name][0], calib)
            if err:
                errors[name] = err
        probed = _load_errors([Path(tmp) / n for n in exports if n not in errors])
        errors.update({Path(p).name: e for p, e in probed.items()})
        ok = [n for n in exports if n not in errors]
        rows = []
        for t in threads if ok else []:
            report = squeeze.bench_models([Path(tmp) / n for n in ok], src, rounds=rounds, new_tokens=new_tokens,
                                          prompt_len=prompt_len, threads=t, dtype="bfloat16", eval_data="none",
                                          json_path=RESULTS / f"e2e-bench-{t}t.json" if keep_json else None)
            common = {"threads": t, "parameters": weight_bytes // 2,
                      "bandwidth_gbps": round(report["bandwidth"]["bytes_per_s"] / 1e9, 3),
                      "bandwidth_how": report["bandwidth"]["how"], "load_avg": report["machine"]["load_avg_1min"]}
            for case in report["cases"]:
                name = "dense" if case["role"] == "reference" else case["name"]
                rows.append({"row": f"{name} t{t}", "params": {"export": name, "threads": t},
                             "metrics": {**common, **_metrics(case, EXPORTS.get(name, (None, None))[1])}})
            for name, err in errors.items():
                rows.append({"row": f"{name} t{t}", "params": {"export": name, "threads": t},
                             "metrics": {**common, "error": err, "target": EXPORTS[name][1], "met": False}})
        if not ok:  # nothing to bench: every export's error, once
            rows = [{"row": name, "params": {"export": name, "threads": None},
                     "metrics": {"error": err, "target": EXPORTS[name][1], "met": False}}
                    for name, err in errors.items()]
    return rows


def _metrics(case: dict, target: float | None) -> dict:
    med, lo, hi = (case[k]["decode_tps_b1"] for k in ("median", "min", "max"))
    speedup = case["ratio"]["decode_tps_b1"]
    b = case["bytes_per_token"]
    return {"method": case["method"], "decode_tps_b1": round(med, 3), "decode_tps_b1_min": round(lo, 3),
            "decode_tps_b1_max": round(hi, 3), "speedup": round(speedup, 4),
            "bound_tps": round(case["bound_tps"], 3), "bound_speedup": round(case["bound_speedup"], 4),
            "of_bound": round(case["of_bound"], 4), "bytes_per_token": b["total"], "bytes_parts": b,
            "decode_tps_b8": round(case["median"]["decode_tps_b8"], 3),
            "speedup_b8": round(case["ratio"]["decode_tps_b8"], 4),
            "prefill_ms": round(case["median"]["prefill_ms"], 3),
            "peak_rss_mb": round(case["median"]["peak_rss_mb"], 1),
            "bytes_on_disk": case["bytes_on_disk"], "greedy_match": case.get("greedy_match"),
            "runtime": (case.get("runtime") or {}).get("summary") or {},
            "target": target, "met": None if target is None else speedup >= target}


QUICK = {"layers": 2, "hidden": 256, "intermediate": 768, "heads": 4, "kv_heads": 2, "vocab": 512,
         "exports": ["int8", "int4-g128", "teal50", "teal70-int4"], "threads": [1], "rounds": 1,
         "new_tokens": 8, "prompt_len": 16, "keep_json": False}
CASES = [Case("e2e", "llama-1b", "bench.cases.e2e:e2e",
              {**TINYLLAMA, "exports": list(EXPORTS), "threads": [1, 2], "rounds": 3, "new_tokens": 32,
               "prompt_len": 128, "keep_json": True}, quick=QUICK)]


def _g(v: float) -> str:
    """Three significant digits, without an exponent for the thousands a tiny model decodes at."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _rows(records) -> list[dict]:
    return sorted(latest(records, "e2e", "llama-1b"), key=lambda r: r["params"]["threads"] or 0)


def table(records) -> str:
    """Per threads and export: batch-1 decode, its ratio to dense, the bound beside it, the target."""
    rows = []
    for r in _rows(records):
        m, name = r["metrics"], r["params"]["export"]
        target = "-" if m.get("target") is None else f"≥ {m['target']:g}x"
        if "error" in m:
            error = m["error"] if len(m["error"]) <= 120 else m["error"][:117] + "..."
            rows.append([r["params"]["threads"] or "-", name, "-", "-", "-", "-", "-", "-", "-", target,
                         f"no ({error})"])
            continue
        rows.append([m["threads"], name, m["method"],
                     f"{_g(m['decode_tps_b1'])} [{_g(m['decode_tps_b1_min'])}–{_g(m['decode_tps_b1_max'])}]",
                     f"{m['speedup']:.2f}x", f"{m['bound_speedup']:.2f}x", _g(m["bound_tps"]),
                     f"{100 * m['of_bound']:.0f}%", _g(m["bytes_per_token"] / 1e6), target,
                     "-" if m["met"] is None else "yes" if m["met"] else "no"])
    return md_table(["threads", "export", "method", "decode tok/s b1, median [min–max]", "× dense", "bound ×",
                     "bound tok/s", "of bound", "MB/token", "target", "met"], rows)


def table_machine(records) -> str:
    """What the bounds divide by: the read bandwidth each thread count measured, and the load."""
    rows = []
    for r in _rows(records):
        m = r["metrics"]
        if r["params"]["export"] == "dense":
            rows.append([m["threads"], f"{m['parameters'] / 1e6:.4g}M", f"{m['bandwidth_gbps']:.3g}",
                         m["bandwidth_how"], f"{m['load_avg'][0]} / {m['load_avg'][1]}"])
    return md_table(["threads", "parameters", "read bandwidth GB/s", "measured by", "load average before / after"],
                    rows)


TABLES = {"e2e": table, "e2e-machine": table_machine}
