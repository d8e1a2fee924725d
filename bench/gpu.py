"""GPU checks and measurements: the Triton kernels against their torch references, against the
byte roofline, and end-to-end decode of exports against the dense bf16 source (issue 14, item 5).

    pip install --no-deps -e .                  # once, on the GPU machine (squeeze.kernels is kernels/)
    python -m bench.gpu                         # check + roofline + e2e on the ~160M model
    python -m bench.gpu --only check roofline   # the kernels only
    python -m bench.gpu --e2e 1b --rounds 3     # the issue's ~1B random Llama (builds and compresses it first)
    TRITON_INTERPRET=1 python -m bench.gpu --only check --tiny   # the checks on CPU (Triton's interpreter)

Not yet run on a GPU (none was at hand when it was written): sized for minutes, the e2e part the
longest (12 processes at the defaults, each loading torch, CUDA and the model).

Three parts, each a list of rows in one JSON file (``--out``, default bench/results/gpu.json):

- **check**: every Triton entry point (2:4 linear decode and prefill, quantized linear int8 / int4
  symmetric and asymmetric / fp8 and 2:4 + int8, decode and prefill, chunk-sparse FFN under each
  activity rule, FFN over given neurons) against its torch reference, computed in fp32 from the
  same inputs, on ragged shapes (N, K not multiples of the tiles, partial last groups), in fp32,
  fp16 and bf16. A row fails when max |error| exceeds the dtype's tolerance times the output's
  magnitude; the script exits 1 when any row fails. ``--tiny`` shrinks the shapes so the Triton
  interpreter runs them on a CPU in seconds (tests/kernels/test_gpu_bench.py does that).
- **roofline** (CUDA only): each kernel at Llama-7B shapes (4096 x 11008 and back, batch 1 and 8),
  bf16 activations, against the bytes it must read: median GPU time over ``--reps`` launches with
  the L2 cache flushed before each, achieved GB/s, the share of the bandwidth this GPU reaches on a
  1 GiB device copy, the time that bandwidth allows (``bound_us``), the speed-up over dense bf16
  ``F.linear`` / the dense FFN measured beside it, and the byte bound of that speed-up
  (dense bytes / kernel bytes). Every timed call's output is also checked against the reference.
- **e2e** (CUDA by default): a random Llama (``--e2e small`` ~160M parameters, ``1b`` ~1.1B,
  TinyLlama's shape; ``tiny`` for a CPU dry run) saved in bf16, compressed with the squeeze API to
  2:4 (magnitude, packed), int8 and int4 g128 (round to nearest), 2:4 + int8 and TEAL 50%, then
  ``squeeze.bench_models`` on ``--device`` in bf16: decode tokens/s at batch 1 and 8 and prefill,
  each case in its own process, alternating rounds. Random weights: speed only, no quality.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import torch
    import torch.nn.functional as F

    from squeeze.kernels import (
        chunk_sparse_ffn,
        chunk_sparse_ffn_reference,
        compressed_bytes,
        dense_ffn_reference,
        dequantize_24_reference,
        linear_24,
        pack_24,
        pack_int4,
        quant_bytes,
        quant_linear,
        quant_linear_24,
        quant_linear_reference,
        sparse_ffn_from_indices,
        sparse_ffn_reference,
    )
except ImportError as e:  # run from a bare checkout: say how to get squeeze.kernels, not a traceback
    sys.exit(f"bench/gpu.py needs torch and squeeze installed ({e}); run `pip install --no-deps -e .` first")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "gpu.json"
# max |error| allowed, as a fraction of max |reference| (x4, as tests/kernels/helpers.assert_close):
# fp32 accumulation everywhere; the output's rounding to the dtype dominates
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LLAMA7B = (4096, 11008)  # hidden, intermediate


# -- shared helpers ---------------------------------------------------------------------------------
def rand_24(n: int, k: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """A 2:4 weight [n, k]: the two largest |w| of every group of four columns kept (vectorised)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k // 4, 4, generator=g).to(device)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, dim=-1).indices, True)
    if not dtype.is_floating_point:  # integer codes in [-127, 127], never 0 where kept
        w = (w * 40).round().clamp(-127, 127)
        w = torch.where(w == 0, torch.ones_like(w), w)
    return torch.where(keep, w, torch.zeros((), device=device)).view(n, k).to(dtype)


def quant_case(fmt: str, n: int, k: int, group_size: int, device, seed: int = 0) -> dict:
    """Codes over each format's whole range and scales as a quantizer would make them; the
    keyword arguments of :func:`quant_linear`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    groups = -(-k // group_size)
    zero = None
    if fmt == "fp8":
        codes = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale, bits, symmetric = torch.rand(n, groups, generator=g) / 448 + 1e-3, 8, True
    elif fmt.startswith("int8"):
        symmetric, bits = fmt == "int8", 8
        if symmetric:
            codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        else:
            codes = torch.randint(0, 256, (n, k), generator=g).to(torch.uint8)
            zero = torch.randint(0, 256, (n, groups), generator=g).to(torch.uint8)
        scale = torch.rand(n, groups, generator=g) / 127 + 1e-3
    else:  # int4 (symmetric) or int4a (asymmetric)
        symmetric, bits = fmt == "int4", 4
        u = torch.randint(1 if symmetric else 0, 16, (n, k), generator=g)
        if not symmetric:
            zero = torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8)
        codes = pack_int4(u)
        scale = torch.rand(n, groups, generator=g) / 7 + 1e-2
    to = (lambda t: None if t is None else t.to(device))
    return {"codes": to(codes), "scale": to(scale), "zero": to(zero), "bits": bits, "symmetric": symmetric,
            "group_size": group_size}


def quant24_case(n: int, k: int, group_size: int, device, seed: int = 0) -> dict:
    values, meta = pack_24(rand_24(n, k, torch.int8, device, seed))
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    scale = (torch.rand(n, -(-k // group_size), generator=g) / 127 + 1e-3).to(device)
    return {"values": values, "meta": meta, "scale": scale, "group_size": group_size}


def ffn_case(t: int, h: int, i: int, dtype, device, active: float | None = None, seed: int = 0):
    """x [t, h], w_gate, w_up, w_downT [i, h]. x[:, 0] = 1 is a bias feature: with ``active`` = f,
    the gates of a fraction f of the neurons get +8 on it and the rest -8, so for relu exactly
    that fraction is active for every token (a controlled union, whatever t); without, 40% of
    the neurons are dead and the rest vary per token."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    x[:, 0] = 1.0
    w_gate, w_up = torch.randn(i, h, generator=g) / h**0.5, torch.randn(i, h, generator=g) / h**0.5
    w_downT = torch.randn(i, h, generator=g) / i**0.5
    order = torch.randperm(i, generator=g)
    if active is None:
        w_gate[order[: int(0.4 * i)], 0] = -8.0
    else:
        live = int(round(active * i))
        w_gate[order[:live], 0], w_gate[order[live:], 0] = 8.0, -8.0
    return [v.to(dtype).to(device) for v in (x, w_gate, w_up, w_downT)]


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in the widest gap among the middle half of the per-neuron scores, so that
    rounding differences between implementations cannot flip a neuron's decision."""
    s = scores.flatten().float().sort().values
    lo, hi = len(s) // 4, max(len(s) * 3 // 4, len(s) // 4 + 2)
    mid = s[lo:hi]
    j = int((mid[1:] - mid[:-1]).argmax())
    return float((mid[j] + mid[j + 1]) / 2)


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, **info) -> dict:
    """One check row: max |got - ref| against the dtype's tolerance scaled to |ref|'s size."""
    scale = max(float(ref.abs().max()), 1e-6)
    err = float((got.float() - ref.float()).abs().max())
    tol = REL_TOL[dtype] * scale * 4
    ok = got.dtype == dtype and got.shape == ref.shape and math.isfinite(err) and err <= tol
    return {"check": name, "dtype": str(dtype).removeprefix("torch."), **info, "max_abs_err": err, "tol": tol,
            "ok": bool(ok)}


# -- check: every Triton kernel against its reference ----------------------------------------------
def check(device: str, tiny: bool, dtypes=("fp32", "fp16", "bf16")) -> list[dict]:
    """Correctness rows for every kernel on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("check on the CPU runs the Triton kernels in their interpreter: set TRITON_INTERPRET=1")
    # ragged shapes: N not a multiple of the row tiles, K not of the column tiles (K % 8 == 4 for 2:4),
    # the last quantization group partial; the batch sizes cross the decode / prefill switches
    n, k, group = (40, 68, 32) if tiny else (1000, 4100, 128)
    batches24, batches_q = ((1, 9), (1, 17)) if tiny else ((1, 8, 64), (1, 16, 64))
    tokens, (h, i) = ((1, 3), (64, 96)) if tiny else ((1, 8, 16, 64), (512, 1376))
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        w = rand_24(n, k, dtype, device, seed=1)
        values, meta = pack_24(w)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
        for m in batches24:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
            ref = F.linear(x.float(), w.float(), bias.float())
            rows.append(compare("linear_24", linear_24(x, values, meta, bias, backend="triton"), ref, dtype,
                                shape=[m, n, k], path="decode" if m <= 8 else "prefill"))
        for fmt in ("int8", "int8a", "int4", "int4a", "fp8"):
            if fmt == "fp8" and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
                continue  # e4m3 needs sm89+ in Triton
            q = quant_case(fmt, n, k, k if fmt in ("int8", "fp8") else group, device, seed=3)
            for m in batches_q:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(10 + m)).to(dtype).to(device)
                got = quant_linear(x, **q, backend="triton")
                rows.append(compare(f"quant_linear {fmt}", got, quant_linear_reference(x, **q), dtype,
                                    shape=[m, n, k], group_size=q["group_size"],
                                    path="decode" if m <= 16 else "prefill"))
        q24 = quant24_case(n, k, group, device, seed=4)
        w24 = dequantize_24_reference(**q24, K=k)
        for m in batches_q:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(20 + m)).to(dtype).to(device)
            rows.append(compare("quant_linear_24", quant_linear_24(x, **q24, backend="triton"),
                                F.linear(x.float(), w24), dtype, shape=[m, n, k], group_size=group,
                                path="decode" if m <= 16 else "prefill"))
        for t in tokens:
            x, wg, wu, wd = ffn_case(t, h, i, dtype, device, seed=5 + t)
            xf, wgf, wuf, wdf = (v.float() for v in (x, wg, wu, wd))
            h_scores = (F.silu(F.linear(xf, wgf)) * F.linear(xf, wuf)).abs().amax(0)  # (I,) per-neuron max
            g_scores = F.silu(F.linear(xf, wgf)).abs().amax(0)
            for act, thr, on in (("relu", None, "h"), ("drelu", None, "h"),
                                 ("swiglu", gap_threshold(h_scores), "h"), ("swiglu", gap_threshold(g_scores), "gate")):
                got = chunk_sparse_ffn(x, wg, wu, wd, act, thr, threshold_on=on, backend="triton")
                ref = chunk_sparse_ffn_reference(xf, wgf, wuf, wdf, act, thr, on)
                rows.append(compare("chunk_sparse_ffn", got, ref, dtype, shape=[t, h, i], act=act,
                                    threshold_on=on if thr is not None else None))
            idx = torch.randperm(i, generator=torch.Generator().manual_seed(t))[: i // 3].to(device)
            count = torch.tensor([i // 4], device=device, dtype=torch.int32)  # a router's device-side count
            for c in (None, count):
                got = sparse_ffn_from_indices(x, wg, wu, wd, idx, "swiglu", c, backend="triton")
                ref = sparse_ffn_reference(xf, wgf, wuf, wdf, idx, "swiglu", c)
                rows.append(compare("sparse_ffn_from_indices", got, ref, dtype, shape=[t, h, i],
                                    neurons=i // 3 if c is None else i // 4))
    return rows


# -- roofline: time against the bytes each kernel must read ----------------------------------------
class Timer:
    """Median CUDA-event time of one call, the L2 cache flushed before each (a 512 MiB write:
    larger than any GPU's L2), so weights that fit in L2 are read from HBM every time, as in a
    model whose other layers evict them. The flush also keeps the GPU busy for ~0.1 ms while the
    CPU queues the call, so the time is the kernels' own, not Python's launch overhead (that one
    is in the e2e figures)."""

    def __init__(self, reps: int, warmup: int = 10):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):  # Triton's autotuning and compilation happen here
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e-3  # seconds


def copy_bandwidth(timer: Timer) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): what this GPU's HBM delivers here,
    the ceiling every memory-bound kernel below is held against."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / timer(lambda: dst.copy_(src))


def _row(rows, timer, bw, kernel, shape, m, fn, ref, nbytes, dense_t, dense_bytes) -> float:
    """Time ``fn`` (whose output is checked against ``ref`` first) and append its roofline row;
    ``dense_t`` None makes this the dense baseline itself. Returns the time."""
    ok = compare(kernel, fn(), ref, torch.bfloat16)["ok"]
    t = timer(fn)
    dense_t = t if dense_t is None else dense_t
    rows.append({"kernel": kernel, "shape": shape, "tokens": m, "time_us": t * 1e6, "bytes": nbytes,
                 "gbps": nbytes / t / 1e9, "of_copy_bandwidth": nbytes / t / bw, "bound_us": nbytes / bw * 1e6,
                 "speedup_vs_dense": dense_t / t, "bound_speedup": dense_bytes / nbytes, "ok": ok})
    return t


def _linear_rows(rows, timer, bw, n: int, k: int) -> None:
    """One [n, k] layer, bf16 activations: dense F.linear, then every weight format's kernel."""
    dtype, dev = torch.bfloat16, "cuda"
    w = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
    w24 = rand_24(n, k, dtype, dev, seed=1)
    values, meta = pack_24(w24)
    quants = {f"{f} {'per-channel' if g >= k else 'g128'}": quant_case(f, n, k, g, dev, seed=2)
              for f, g in (("int8", k), ("int8", 128), ("int4", 128), ("int4a", 128), ("fp8", k))}
    q24 = quant24_case(n, k, 128, dev, seed=3)
    w_q24 = dequantize_24_reference(**q24, K=k)
    for m in (1, 8):
        x = torch.randn(m, k, device=dev).to(dtype)
        io = 2 * m * (n + k)  # bf16 activations in and out
        dense_bytes = 2 * n * k + io
        args = (rows, timer, bw)
        dense_t = _row(*args, "dense bf16 F.linear", [n, k], m, lambda: F.linear(x, w), F.linear(x.float(), w.float()),
                       dense_bytes, None, dense_bytes)
        _row(*args, "2:4 bf16 linear_24", [n, k], m, lambda: linear_24(x, values, meta),
             F.linear(x.float(), w24.float()), compressed_bytes(n, k, dtype) + io, dense_t, dense_bytes)
        for name, q in quants.items():
            nbytes = quant_bytes(n, k, bits=q["bits"], group_size=None if q["group_size"] >= k else q["group_size"],
                                 symmetric=q["symmetric"]) + io
            _row(*args, f"{name} quant_linear", [n, k], m, lambda q=q: quant_linear(x, **q),
                 quant_linear_reference(x, **q), nbytes, dense_t, dense_bytes)
        _row(*args, "2:4 + int8 g128 quant_linear_24", [n, k], m, lambda: quant_linear_24(x, **q24),
             F.linear(x.float(), w_q24), quant_bytes(n, k, bits=8, group_size=128, sparse24=True) + io,
             dense_t, dense_bytes)


def _ffn_rows(rows, timer, bw, hidden: int, inter: int, active: float, t: int) -> None:
    """A relu FFN with exactly ``active`` of its neurons active: dense, predictor-free (gate for
    every neuron, up and down for the active ones), and over a given active set (a router's)."""
    x, wg, wu, wd = ffn_case(t, hidden, inter, torch.bfloat16, "cuda", active=active, seed=4)
    xf, wgf, wuf, wdf = (v.float() for v in (x, wg, wu, wd))
    ref = chunk_sparse_ffn_reference(xf, wgf, wuf, wdf, "relu")
    idx = (F.linear(xf, wgf) > 0).any(0).nonzero().squeeze(1)
    io, shape, args = 4 * t * hidden, [hidden, inter, f"active {active:g}"], (rows, timer, bw)
    dense_bytes = 3 * 2 * hidden * inter + io
    dense_t = _row(*args, "dense bf16 FFN", shape, t, lambda: dense_ffn_reference(x, wg, wu, wd, "relu"), ref,
                   dense_bytes, None, dense_bytes)
    _row(*args, "chunk_sparse_ffn relu", shape, t, lambda: chunk_sparse_ffn(x, wg, wu, wd, "relu"), ref,
         int(2 * hidden * inter * (1 + 2 * active)) + io, dense_t, dense_bytes)
    _row(*args, "sparse_ffn_from_indices", shape, t, lambda: sparse_ffn_from_indices(x, wg, wu, wd, idx, "relu"), ref,
         int(3 * 2 * hidden * inter * active) + io, dense_t, dense_bytes)


def roofline(reps: int) -> dict:
    timer = Timer(reps)
    bw = copy_bandwidth(timer)
    rows: list[dict] = []
    hidden, inter = LLAMA7B
    for n, k in ((inter, hidden), (hidden, inter)):  # gate/up, then down
        _linear_rows(rows, timer, bw, n, k)
    for active in (0.5, 0.3, 0.1):
        for t in (1, 8):
            _ffn_rows(rows, timer, bw, hidden, inter, active, t)
    return {"copy_bandwidth_gbps": bw / 1e9, "device": torch.cuda.get_device_name(), "rows": rows}


# -- e2e: exports decoded beside their dense bf16 source -------------------------------------------
E2E = {  # LlamaConfig fields; 1b is TinyLlama-1.1B's shape
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=512),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
# (folder, squeeze.compress arguments): one export per run-time the loader installs on a GPU
EXPORTS = (("sparse24", dict(method="magnitude", pattern="2:4")),
           ("int8", dict(quantize="int8", quant_solver="rtn")),
           ("int4-g128", dict(quantize="int4", group_size=128, quant_solver="rtn")),
           ("sparse24-int8", dict(method="magnitude", pattern="2:4", quantize="int8", group_size=128,
                                  quant_solver="rtn")),
           ("teal50", dict(method="teal", act_sparsity=0.5)))


def e2e(size: str, device: str, rounds: int, new_tokens: int, prompt_len: int, work: Path) -> dict:
    import squeeze
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**E2E[size], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    src = work / f"llama-{size}"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster there
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).to("cpu").save_pretrained(src)
    params = sum(p.numel() for p in model.parameters())
    del model
    g = torch.Generator().manual_seed(0)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": torch.randint(3, cfg.vocab_size, (64,), generator=g).tolist()})
                             + "\n" for _ in range(8)))
    outs = []
    for name, kwargs in EXPORTS:
        out = work / name
        squeeze.compress(src, out, calib=str(calib), nsamples=8, seqlen=64, keep_in_memory=False, **kwargs)
        outs.append(out)
    build_s = time.perf_counter() - t0
    report = squeeze.bench_models(outs, src, rounds=rounds, new_tokens=new_tokens, prompt_len=prompt_len,
                                  device=device, dtype="bfloat16", eval_data="none")
    return {"size": size, "parameters": params, "config": E2E[size], "build_s": build_s, "bench": report}


# -- printing and main ------------------------------------------------------------------------------
def _print_rows(rows: list[dict], keys: list[str]) -> None:
    widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("check", "roofline", "e2e"), default=("check", "roofline", "e2e"))
    ap.add_argument("--tiny", action="store_true", help="check: interpreter-sized shapes (CPU, TRITON_INTERPRET=1)")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=("fp32", "fp16", "bf16"))
    ap.add_argument("--reps", type=int, default=50, help="roofline: timed launches per kernel (their median)")
    ap.add_argument("--e2e", dest="size", choices=tuple(E2E), default="small", help="e2e: the random Llama's size")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=2, help="e2e: alternating rounds of squeeze bench")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=OUT, help="JSON with every row (written atomically)")
    args = ap.parse_args(argv)
    if "roofline" in args.only and args.device != "cuda":
        ap.error("roofline needs a CUDA device (run with --only check --tiny under TRITON_INTERPRET=1 on a CPU)")
    result: dict = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "command": " ".join(sys.argv)}
    failed = 0
    if "check" in args.only:
        t0 = time.perf_counter()
        rows = check(args.device, args.tiny, args.dtypes)
        failed = sum(not r["ok"] for r in rows)
        print(f"\n== check: {len(rows) - failed}/{len(rows)} outputs within tolerance "
              f"({time.perf_counter() - t0:.1f} s)")
        _print_rows(rows, ["check", "dtype", "shape", "path", "act", "threshold_on", "max_abs_err", "tol", "ok"])
        result["check"] = rows
    if "roofline" in args.only:
        rl = roofline(args.reps)
        failed += sum(not r["ok"] for r in rl["rows"])
        print(f"\n== roofline on {rl['device']}: device copy {rl['copy_bandwidth_gbps']:.0f} GB/s")
        _print_rows(rl["rows"], ["kernel", "shape", "tokens", "time_us", "bound_us", "gbps", "of_copy_bandwidth",
                                 "speedup_vs_dense", "bound_speedup", "ok"])
        result["roofline"] = rl
    if "e2e" in args.only:
        with tempfile.TemporaryDirectory(prefix="squeeze-gpu-e2e-") as work:
            result["e2e"] = e2e(args.size, args.device, args.rounds, args.new_tokens, args.prompt_len, Path(work))
        from squeeze.cli.cmd_bench import print_bench

        print(f"\n== e2e: random Llama {args.size} ({result['e2e']['parameters'] / 1e6:.3g}M parameters), bf16, "
              f"{args.device}")
        print_bench(result["e2e"]["bench"])
    from squeeze.report import write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"\nwrote {args.out}" + (f"; {failed} rows FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
