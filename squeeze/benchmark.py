"""``squeeze.bench_models``: size, speed and quality of exports beside their dense reference.

Every case (the reference and each model) is measured by :mod:`squeeze.benchmark_case` in a
process of its own, so peak RSS and timings belong to one model; the processes alternate
(reference, model 1, model 2, reference, ...) for ``rounds`` rounds, so a machine that slows down
or speeds up part-way (other jobs, frequency scaling) shifts every case alike. Each figure is
reported as the median over the rounds with its spread (min and max), and as a ratio of medians
to the reference's (model / reference for every figure: above 1 is faster for tokens/s, slower
for milliseconds). Quality is scored once per model, in its first round's process after the
speed figures, on held-out data with :func:`squeeze.evaluation.quality` (what compress reports):
ppl and KL(reference || model) for causal LMs, embedding cosine for encoders. The reference is
scored against itself too, which gives the KL (0) and cosine (1) a perfect copy gets. For causal
LMs each case also carries its decode bound, the memory's read bandwidth ÷ the bytes one batch-1
decode step reads (:mod:`squeeze.roofline`), so a speed-up stands beside the one its bytes allow.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from squeeze import progress
from squeeze.errors import SqueezeError
from squeeze.report import write_json

BATCH = 8  # the batched figure: decode (LMs) or forward (encoders) of this many prompts at once
DEFAULT_PROMPT_LEN = 128
DEFAULT_NEW_TOKENS = 128
DEFAULT_ROUNDS = 3
# figures every round measures, per kind; ratios are model / reference
METRICS = {"causal": ("decode_tps_b1", "decode_tps_b8", "prefill_ms", "peak_rss_mb"),
           "encoder": ("prefill_ms", "prefill_ms_b8", "peak_rss_mb")}
# the one speed-up a model is summed up by (the PNG's vertical axis): batch-1 decode for LMs (what a
# chat user waits on), the batch-8 forward for encoders (embedding jobs are batched)
HEADLINE = {"causal": ("decode_tps_b1", "decode tokens/s at batch 1"),
            "encoder": ("prefill_ms_b8", f"forward over {BATCH} prompts")}
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def bench_models(models, reference, *, rounds: int = DEFAULT_ROUNDS, new_tokens: int | None = None,
                 prompt_len: int = DEFAULT_PROMPT_LEN, threads: int | None = None, device: str = "cpu",
                 dtype: str = "auto", eval_data: str | None = "auto", eval_rows: int | None = None,
                 json_path: str | Path | None = None, png_path: str | Path | None = None) -> dict:
    """Measure ``reference`` (the dense source) and each of ``models`` (folders) side by side.

    Returns the report ``squeeze bench`` prints: ``settings``, ``machine``, ``versions``, ``kind``
    and ``cases`` (the reference first), each with ``rounds`` (the raw figures of every round),
    ``median`` / ``min`` / ``max``, ``ratio`` (medians over the reference's, and bytes on disk over
    the reference's), ``speedup`` (the headline speed-up, see :data:`HEADLINE`), ``bytes_on_disk``
    (every file in the folder), ``quality`` and, for LMs, ``greedy_match`` (the share of batch-1
    new tokens equal to the reference's). ``new_tokens`` (LMs only; default
    :data:`DEFAULT_NEW_TOKENS`) tokens are decoded after ``prompt_len``-token prompts;
    ``eval_data`` / ``eval_rows`` are compress's ``--eval-data`` / ``--eval-rows``. Bad input
    (a missing folder, a reference of another architecture or vocabulary, decode settings for an
    encoder, ...) is a :class:`SqueezeError` before anything runs.

    Causal LMs also get the decode bound (:mod:`squeeze.roofline`): ``bandwidth`` (the memory's
    read bandwidth, measured once before the rounds in a process of its own with the cases'
    threads) and per case ``bytes_per_token``, ``bound_tps``, ``bound_speedup`` and ``of_bound``
    (see :func:`_bound`)."""
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    plan = _plan(list(models), reference, rounds, new_tokens, prompt_len, threads, device, dtype, eval_data,
                 eval_rows, json_path, png_path)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in plan["cases"]}
    bandwidth = None
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-") as work, \
            progress.phase("bench", total=rounds * len(plan["cases"]), unit="run") as shown:
        if plan["kind"] == "causal":  # once, before the rounds, with the threads the cases use
            from squeeze.roofline import BANDWIDTH_REPEATS, bandwidth_bytes

            spec = {"bandwidth": {"bytes": bandwidth_bytes(device), "repeats": BANDWIDTH_REPEATS},
                    "device": device, "threads": threads}
            bandwidth = _run(spec, "bandwidth", Path(work) / "bandwidth", threads)
        for r in range(rounds):
            for i, case in enumerate(plan["cases"]):
                spec = {**plan["spec"], "path": case["path"],
                        "quality": plan["quality"] if r == 0 and plan["quality"] else None}
                runs[case["name"]].append(_run(spec, case["name"], Path(work) / f"{r}-{i}", threads))
                shown.advance(1, case=case["name"], round=f"{r + 1}/{rounds}")
    report = _summary(plan, runs, bandwidth)
    report["machine"]["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if json_path:
        write_json(json_path, report)
    if png_path:
        from squeeze.benchmark_plot import plot

        plot(report, png_path)
    return report


# -- what is measured, checked before anything runs ------------------------------------------------
def _plan(models, reference, rounds, new_tokens, prompt_len, threads, device, dtype, eval_data, eval_rows,
          json_path, png_path) -> dict:
    from squeeze.evaluation import CAUSAL_SUFFIXES, check_eval_data, check_reference, resolve_eval_data, shape_of

    if not models:
        raise SqueezeError("give at least one model to set beside --reference")
    for name, value, least in (("--rounds", rounds, 1), ("--prompt-len", prompt_len, 1), ("--threads", threads, 1),
                               ("--new-tokens", new_tokens, 2), ("--eval-rows", eval_rows, 1)):
        if value is not None and value < least:
            raise SqueezeError(f"{name} must be at least {least}; got {value}")
    if device not in ("cpu", "cuda"):
        raise SqueezeError(f"--device must be cpu or cuda; got {device!r}")
    if str(dtype).lower() not in DTYPES:
        raise SqueezeError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for flag, path in (("--json", json_path), ("--png", png_path)):
        if path and not Path(path).resolve().parent.is_dir():
            raise SqueezeError(f"{flag} {path}: folder {Path(path).resolve().parent} does not exist")
    if png_path:
        from squeeze.benchmark_plot import check_matplotlib

        check_matplotlib()
    for m in models:  # each folder is read (config only) here: a missing one stops before any process starts
        check_reference(m, reference)
    model_type, vocab, _, arch, _ = shape_of(reference)
    kind = "causal" if arch.endswith(CAUSAL_SUFFIXES) else "encoder"
    for m in models:
        other = "causal" if shape_of(m)[3].endswith(CAUSAL_SUFFIXES) else "encoder"
        if other != kind:
            raise SqueezeError(f"{m} is {_a(other)} but --reference {reference} is {_a(kind)}: bench sets a model "
                               "beside the checkpoint it was made from")
    config = _text_config(reference)
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if kind == "encoder":
        if new_tokens is not None:
            raise SqueezeError(f"--new-tokens is for causal LMs (decoding); {reference} is an encoder ({arch}), "
                               f"measured by its forward over --prompt-len tokens at batch 1 and {BATCH}")
    else:
        from squeeze.runtime.stack import STACK_TYPES

        if model_type not in STACK_TYPES:
            raise SqueezeError(f"bench decodes with squeeze's layer runner (as `squeeze generate`), which supports "
                               f"{', '.join(STACK_TYPES)}; {reference} is {model_type!r}")
        new_tokens = new_tokens or DEFAULT_NEW_TOKENS
    need = prompt_len + (new_tokens or 0)
    if context and need > context:
        raise SqueezeError(f"--prompt-len {prompt_len}" + (f" + --new-tokens {new_tokens}" if new_tokens else "")
                           + f" = {need} tokens exceed {reference}'s context of {context}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SqueezeError("--device cuda: this machine has no CUDA device torch can use")
    data, skipped = resolve_eval_data(eval_data, reference)
    check_eval_data(data, reference)
    prompts, prompt_desc = _prompts(data, reference, prompt_len, vocab)
    cases, seen = [], {}
    for role, path in [("reference", reference)] + [("model", m) for m in models]:
        name = Path(path).resolve().name
        seen[name] = seen.get(name, 0) + 1
        cases.append({"name": name if seen[name] == 1 else f"{name}#{seen[name]}", "path": str(Path(path).resolve()),
                      "role": role})
    settings = {"rounds": rounds, "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": BATCH,
                "threads": threads, "device": device, "dtype": DTYPES[str(dtype).lower()], "eval_data": data,
                "eval_rows": eval_rows, "prompts": prompt_desc}
    quality = {"reference": str(Path(reference).resolve()), "data": data, "rows": eval_rows} if data else None
    return {"cases": cases, "kind": kind, "settings": settings, "skipped": skipped, "quality": quality,
            "spec": {"kind": kind, "device": device, "dtype": settings["dtype"], "threads": threads,
                     "new_tokens": new_tokens, "prompts": prompts}}


def _a(kind: str) -> str:
    return "a causal LM" if kind == "causal" else "an encoder"


def _text_config(path) -> dict:
    from squeeze.checkpoint import Checkpoint

    cfg = Checkpoint(path).config_dict
    return cfg.get("text_config") or cfg


def _prompts(data, reference, prompt_len: int, vocab: int) -> tuple[list[list[int]], str]:
    """:data:`BATCH` prompts of ``prompt_len`` tokens, the same for every case: consecutive windows
    of the held-out rows joined in file order (real text, so run-time activation sparsity and exit
    confidences behave as on real inputs), or seeded random ids when there is no data."""
    import torch

    if data is not None:
        from squeeze.evaluation import eval_rows

        stream = torch.cat(eval_rows(data, Path(reference), None, 1 << 30))
        reps = math.ceil(BATCH * prompt_len / stream.numel())
        stream = stream.repeat(reps)[:BATCH * prompt_len]
        what = f"{BATCH} windows of {prompt_len} tokens of {data} (rows joined in file order" + \
            (", repeated)" if reps > 1 else ")")
        return stream.view(BATCH, prompt_len).tolist(), what
    g = torch.Generator().manual_seed(0)
    low = 3 if vocab > 3 else 0  # past the usual pad / bos / eos ids
    return torch.randint(low, vocab, (BATCH, prompt_len), generator=g).tolist(), \
        f"{BATCH} x {prompt_len} random token ids (seed 0; no evaluation data)"


# -- one case in its own process ------------------------------------------------------------------
def _run(spec: dict, name: str, stem: Path, threads: int | None) -> dict:
    spec_file, result_file = stem.with_suffix(".spec.json"), stem.with_suffix(".result.json")
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    if threads:  # before the child's torch starts its thread pools (it also calls set_num_threads)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "squeeze.benchmark_case", str(spec_file), str(result_file)],
                          env=env, capture_output=True, text=True)
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result and "error" in result:
        raise SqueezeError(f"{name}: {result['error']}")
    if proc.returncode < 0:
        raise SqueezeError(f"bench case {name}: its process was killed by signal {-proc.returncode} "
                           "(out of memory?)")
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"bench case {name} failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    return result


# -- medians, spreads, ratios ---------------------------------------------------------------------
def disk_bytes(path) -> tuple[int, int]:
    """(bytes, files) of every file under ``path``: what the model costs on disk, configs included."""
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def method_of(path) -> str:
    """What was done to a checkpoint, in a few words from its squeeze.json (``dense`` when nothing)."""
    from squeeze.loading import read_record

    parts = []
    for p in read_record(path).get("passes") or []:
        what = next((p[k] for k in ("pattern", "sparsity", "act_sparsity", "quant") if p.get(k) is not None), None)
        if p.get("pass") == "layerdrop":
            what = f"-{len(p.get('removed') or [])} layers"
        parts.append(f"{p.get('pass')} {what:g}" if isinstance(what, float) else
                     " ".join(str(x) for x in (p.get("pass"), what) if x is not None))
    return " + ".join(parts) or "dense"


def _summary(plan: dict, runs: dict[str, list[dict]], bandwidth: dict | None = None) -> dict:
    from squeeze.versions import versions

    kind = plan["kind"]
    metrics = METRICS[kind]
    ref_name = plan["cases"][0]["name"]
    cases = []
    for case in plan["cases"]:
        rounds = runs[case["name"]]
        first = rounds[0]
        size, files = disk_bytes(case["path"])
        row = {**case, "method": method_of(case["path"]), "bytes_on_disk": size, "files": files,
               "dtype": first["dtype"], "threads": first["threads"],
               "rounds": [{m: r[m] for m in metrics} for r in rounds],
               "median": {m: statistics.median(r[m] for r in rounds) for m in metrics},
               "min": {m: min(r[m] for r in rounds) for m in metrics},
               "max": {m: max(r[m] for r in rounds) for m in metrics}}
        if "decode_mode" in first:
            row["decode_mode"] = first["decode_mode"]
        row["runtime"] = first.get("runtime") or {}
        row["quality"] = first.get("quality") or {"measured": False, "reason": plan["skipped"] or "not measured"}
        cases.append(row)
    ref = cases[0]
    ref_tokens = runs[ref_name][0].get("new_ids")
    headline = HEADLINE[kind][0]
    for row in cases:
        row["ratio"] = {m: row["median"][m] / ref["median"][m] for m in metrics}
        row["ratio"]["bytes_on_disk"] = row["bytes_on_disk"] / ref["bytes_on_disk"]
        r = row["ratio"][headline]
        row["speedup"] = r if headline.startswith("decode_tps") else 1 / r  # a latency's speed-up is its inverse
        if ref_tokens is not None:
            mine = runs[row["name"]][0]["new_ids"]
            row["greedy_match"] = sum(a == b for a, b in zip(mine, ref_tokens)) / max(len(ref_tokens), 1)
    if bandwidth is not None:
        _bound(cases, runs, bandwidth["bytes_per_s"])
    out = {"kind": kind, "reference": ref["path"], "settings": plan["settings"],
           "headline": {"metric": headline, "what": HEADLINE[kind][1]},
           "machine": _machine(), "versions": versions(), "cases": cases}
    if bandwidth is not None:
        out["bandwidth"] = bandwidth
    return out


def _bound(cases: list[dict], runs: dict[str, list[dict]], bytes_per_s: float) -> None:
    """Each causal case's decode bound (:mod:`squeeze.roofline`): ``bytes_per_token`` (what one
    batch-1 decode step reads, from its first round: the loaded model is the same every round),
    ``bound_tps`` = bandwidth ÷ those bytes, ``bound_speedup`` = its ratio to the reference's bound
    (the speed-up the bytes alone allow), ``of_bound`` = measured median batch-1 tokens/s ÷
    ``bound_tps``."""
    for row in cases:
        row["bytes_per_token"] = runs[row["name"]][0]["bytes_per_token"]
        row["bound_tps"] = bytes_per_s / row["bytes_per_token"]["total"]
        row["of_bound"] = row["median"]["decode_tps_b1"] / row["bound_tps"]
    for row in cases:
        row["bound_speedup"] = row["bound_tps"] / cases[0]["bound_tps"]


def _machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}
