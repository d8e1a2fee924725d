"""Streaming proven (issue 15): random bf16 Llamas larger than a memory cap, compressed inside it.

Each case writes a random Llama (hidden 2048, intermediate 5632, GQA 16/4 heads, vocab 32000,
untied head: 262 MB of embeddings + 90 MB per layer in bf16, shards of at most 500 MB), then runs
``squeeze compress`` on it in a child cgroup of the cgroup-v1 memory controller with
``memory.limit_in_bytes`` set to the cap: when the group's memory cannot be brought under the cap
by reclaiming file pages (the shards read, the files written), the kernel's OOM killer ends the
command. A row
records whether the command finished, the OOM kills, the command's own peak RSS, the cgroup's peak
usage (page cache included, so it sits at the cap whenever files are read), and the bound the
command prints for a streamed sweep (:func:`squeeze.calib.runner.memory_bound`).

Needs root and ``/sys/fs/cgroup/memory`` (otherwise the cases are skipped, saying so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cases.prune import CALIB
from bench.harness import ROOT, Case, Skip, latest, md_table

CGROUP = Path("/sys/fs/cgroup/memory")
SHARD_BYTES = 500_000_000


def make_llama(out: Path, layers: int, seed: int = 0, *, hidden: int = 2048, intermediate: int = 5632,
               heads: int = 16, kv_heads: int = 4, vocab: int = 32000) -> int:
    """A random bf16 Llama checkpoint of ``layers`` layers in ``out`` (sharded, with an index);
    its weight bytes. One shard is in memory at a time. The default shape is this suite's (TinyLlama's
    widths with 16 heads); ``bench/cases/e2e.py`` passes TinyLlama's 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from squeeze.resume import save_tensors

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]  # as from_pretrained checkpoints say: `squeeze bench` reads it
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    groups: list[dict] = [{}]
    size = 0
    for key, shape in shapes.items():  # state-dict order: a shard holds consecutive layers
        n = shape.numel() * 2
        if size and size + n > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][key] = shape
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
                   .to(torch.bfloat16) for k, s in group.items()}
        save_tensors(tensors, out / name, {"format": "pt"})
        weight_map.update({k: name for k in group})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(out)
    return total


def run_capped(argv: list[str], cap_bytes: int, env: dict) -> dict:
    """Run ``argv`` as the only process of a fresh memory cgroup capped at ``cap_bytes``; its exit
    code, wall time, peak RSS (its own rusage) and the cgroup's peak usage and OOM kills."""
    if not (CGROUP / "memory.limit_in_bytes").is_file() or not os.access(CGROUP, os.W_OK):
        raise Skip(f"no writable cgroup-v1 memory controller at {CGROUP} (needs root)")
    group = CGROUP / f"squeeze-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        procs = str(group / "cgroup.procs")

        def enter():  # in the child, before exec: the command starts inside the cap
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=ROOT, env=env, preexec_fn=enter, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        out, err = p.communicate()
        wall = time.perf_counter() - t0
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        return {"returncode": p.returncode, "wall_s": round(wall, 1), "stdout": out, "stderr": err,
                "cgroup_peak_mb": round(int((group / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
                "oom_kills": int(oom.get("oom_kill", 0))}
    finally:
        group.rmdir()


def streamed(layers: int, method: str, cap_bytes: int, nsamples: int, seqlen: int) -> list[dict]:
    import resource

    if not CALIB.is_file():
        raise Skip(f"{CALIB} is missing")
    with tempfile.TemporaryDirectory(prefix="bench-streaming-", dir=os.environ.get("BENCH_TMP")) as tmp:
        model, out, report = Path(tmp) / "model", Path(tmp) / "out", Path(tmp) / "report.json"
        model_bytes = make_llama(model, layers)
        argv = [sys.executable, "-m", "squeeze.cli.main", "compress", str(model), "--method", method,
                "--pattern", "2:4", "--calib", str(CALIB), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                "--out", str(out), "--eval-data", "none", "--json", str(report)]
        got = run_capped(argv, cap_bytes, {**os.environ, "SQUEEZE_PROGRESS": "off"})
        # the children's peak so far: the capped command is the only child large enough to set it
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        done = got["returncode"] == 0
        r = json.loads(report.read_text()) if done else {}
        bound = (r.get("memory_bound") or {})
        if not done and not got["oom_kills"]:
            raise RuntimeError(f"compress failed (exit {got['returncode']}):\n{got['stderr'][-2000:]}")
    return [{"row": f"{method} {layers} layers", "metrics": {
        "model_mb": round(model_bytes / 2**20, 1), "cap_mb": round(cap_bytes / 2**20, 1), "finished": done,
        "oom_kills": got["oom_kills"], "peak_rss_mb": round(peak / 1024, 1),
        "cgroup_peak_mb": got["cgroup_peak_mb"], "bound_mb": bound.get("total_mb"),
        "interpreter_mb": bound.get("interpreter_mb"), "block_fp32_mb": bound.get("block_fp32_mb"),
        "peak_over_model": round(peak / 1024 / (model_bytes / 2**20), 3) if done else None,
        "wall_s": got["wall_s"], "phases_s": r.get("seconds_by_phase")}}]


CAP = 1_000_000_000  # 1.0 GB (953.7 MiB)
SIZES = (6, 12, 36)  # 0.77, 1.25, 3.27 GiB: the largest is 3.5x the cap
CASES = [Case("streaming", f"wanda-{n}", "bench.cases.streaming:streamed",
              {"layers": n, "method": "wanda", "cap_bytes": CAP, "nsamples": 16, "seqlen": 256},
              quick={"layers": 2} if n == SIZES[0] else None) for n in SIZES]
# SparseGPT's fp64 Hessians: the 5632-input down-projection's solve alone holds 3 x 242 MiB, so its
# bound is above 1 GB; it runs under a 2 GB cap, its peak beside its printed bound
CASES.append(Case("streaming", "sparsegpt-12", "bench.cases.streaming:streamed",
                  {"layers": 12, "method": "sparsegpt", "cap_bytes": 2 * CAP, "nsamples": 16, "seqlen": 256}))


def table(records) -> str:
    rows = []
    for c in CASES:
        for r in latest(records, c.suite, c.name):
            m = r["metrics"]
            rows.append([r["row"], f"{m['model_mb']:.0f}", f"{m['cap_mb']:.0f}", "yes" if m["finished"] else "no",
                         m["oom_kills"], f"{m['peak_rss_mb']:.0f}" if m["peak_rss_mb"] else "-",
                         f"{m['bound_mb']:.0f}" if m["bound_mb"] else "-",
                         f"{m['peak_over_model']:.2f}x" if m["peak_over_model"] else "-", f"{m['wall_s']:.0f}"])
    return md_table(["run", "model MiB", "cap MiB", "finished", "OOM kills", "peak RSS MiB", "printed bound MiB",
                     "peak / model", "wall s"], rows)


def table_phases(records) -> str:
    """Where a streamed compress of each model spends its time (seconds, from its report)."""
    rows, names = [], []
    for c in CASES:
        for r in latest(records, c.suite, c.name):
            phases = r["metrics"].get("phases_s")
            if phases:
                names = names or list(phases)
                rows.append([r["row"], f"{r['metrics']['model_mb']:.0f}"] + [f"{phases.get(k, 0):.1f}" for k in names])
    return md_table(["run", "model MiB"] + names, rows) if rows else ""


TABLES = {"streaming": table, "streaming-phases": table_phases}
