"""CPU benchmark of the squeeze.kernels fast paths (not a test).

Prints, for a Llama-7B FFN slice (hidden 4096, intermediate 11008):
  * activation-sparse FFN: dtype x tokens x sparsity -> dense ms, sparse ms (forced), auto ms
    (SparseFFNWorkspace with its dense fallback), speedups vs dense;
  * 2:4 compressed sizes (values + meta) vs dense for fp16 / bf16 / fp32, and pack/unpack time.

Method: one thread (torch.set_num_threads), for every cell the dense, sparse and auto variants run
round-robin in the same loop, each repeat with a fresh random active set (sorted neuron ids, as a
router would give); the minimum over repeats is reported. ``--clock process`` (default) times with
the process's CPU time, which excludes time spent descheduled (the development machine is shared
and often loaded); ``--clock wall`` uses perf_counter.

    PYTHONPATH= .venv/bin/python bench/kernels.py                 # the table (a few minutes)
    PYTHONPATH= .venv/bin/python bench/kernels.py --calibrate     # re-measure cpu_ffn plans
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from squeeze.kernels import SparseFFNWorkspace, act_mul, compressed_bytes, pack_24, unpack_24
from squeeze.kernels.cpu_ffn import measure_plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLOCK = time.process_time


def make_ffn(h: int, i: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_gate = (torch.randn(i, h, generator=g) / h**0.5).to(dtype)
    w_up = (torch.randn(i, h, generator=g) / h**0.5).to(dtype)
    w_down = (torch.randn(h, i, generator=g) / i**0.5).to(dtype)  # nn.Linear layout [H, I]
    return w_gate, w_up, w_down, w_down.t().contiguous()


def dense_ffn(x, w_gate, w_up, w_down):
    """The baseline: what an nn.Linear MLP does (F.linear x3, down in [H, I] layout)."""
    return F.linear(act_mul(F.linear(x, w_gate), F.linear(x, w_up), "swiglu"), w_down)


def timed(fn, *args) -> float:
    t0 = CLOCK()
    fn(*args)
    return CLOCK() - t0


def bench_ffn(args) -> list[dict]:
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        w_gate, w_up, w_down, w_downT = make_ffn(args.hidden, args.intermediate, dtype)
        ws = SparseFFNWorkspace(w_gate, w_up, w_downT, "swiglu", w_down=w_down, max_tokens=max(args.tokens))
        for t in args.tokens:
            x = torch.randn(t, args.hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
            plan = ws.plan(t)
            for sp in args.sparsity:
                n = max(1, round((1 - sp) * args.intermediate))
                gen = torch.Generator().manual_seed(int(sp * 1000) + t)
                sets = [torch.randperm(args.intermediate, generator=gen)[:n].sort().values
                        for _ in range(args.repeats + 1)]
                best = {"dense": float("inf"), "sparse": float("inf"), "auto": float("inf")}
                for r, idx in enumerate(sets):  # round-robin, a fresh active set per round
                    calls = [("dense", dense_ffn, (x, w_gate, w_up, w_down)),
                             ("sparse", ws.sparse, (x, idx, plan)), ("auto", ws, (x, idx))]
                    calls = calls[r % 3:] + calls[: r % 3]  # rotate: no variant always runs first
                    times = {name: timed(fn, *a) for name, fn, a in calls}
                    if r:  # the first round is warm-up
                        best = {k: min(best[k], times[k]) for k in best}
                row = dict(dtype=dname, tokens=t, sparsity=sp, plan=f"{plan.gate_up}+{plan.down}",
                           max_active=plan.max_active, sparse_used=ws.use_sparse(n, t),
                           **{k: v * 1e3 for k, v in best.items()})
                rows.append(row)
                print(f"{dname:5} T={t:<3} sparsity={sp:>4.0%}  dense {row['dense']:7.2f} ms  "
                      f"sparse {row['sparse']:7.2f} ms ({row['dense'] / row['sparse']:.2f}x)  "
                      f"auto {row['auto']:7.2f} ms ({row['dense'] / row['auto']:.2f}x, "
                      f"{'sparse' if row['sparse_used'] else 'dense'})", flush=True)
    return rows


def bench_24(args) -> list[dict]:
    rows = []
    n, k = args.hidden, args.intermediate  # a down-projection-shaped weight [4096, 11008]
    for dname in ("fp16", "bf16", "fp32"):
        dtype = DTYPES[dname]
        w = torch.randn(n, k).to(dtype)
        keep = torch.rand(n, k // 4, 4).argsort(-1) < 2
        w = (w.view(n, k // 4, 4) * keep.to(dtype)).view(n, k)
        t0 = CLOCK()
        values, meta = pack_24(w)
        t_pack = CLOCK() - t0
        t0 = CLOCK()
        back = unpack_24(values, meta)
        t_unpack = CLOCK() - t0
        assert torch.equal(back, w)
        dense_b = w.numel() * w.element_size()
        comp_b = values.numel() * values.element_size() + meta.numel()
        assert comp_b == compressed_bytes(n, k, dtype)
        rows.append({"dtype": dname, "dense_mb": dense_b / 1e6, "comp_mb": comp_b / 1e6,
                     "ratio": comp_b / dense_b, "pack_ms": t_pack * 1e3, "unpack_ms": t_unpack * 1e3})
    return rows


def print_tables(ffn_rows, s24_rows, args):
    print()
    print(f"Activation-sparse FFN, hidden {args.hidden}, intermediate {args.intermediate}, swiglu, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), min of {args.repeats} repeats, "
          f"{args.clock} clock, load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("| dtype | tokens | sparsity | plan | dense ms | sparse ms | sparse speedup | auto ms | auto speedup | auto used |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ffn_rows:
        print(f"| {r['dtype']} | {r['tokens']} | {r['sparsity']:.0%} | {r['plan']} (dense above "
              f"{r['max_active']:.0%} active) | {r['dense']:.2f} | {r['sparse']:.2f} | "
              f"{r['dense'] / r['sparse']:.2f}x | {r['auto']:.2f} | {r['dense'] / r['auto']:.2f}x | "
              f"{'sparse' if r['sparse_used'] else 'dense'} |")
    print()
    print(f"2:4 compressed size, weight [{args.hidden}, {args.intermediate}] (values + uint8 meta)")
    print()
    print("| dtype | dense MB | compressed MB | ratio | pack ms | unpack ms |")
    print("|---|---|---|---|---|---|")
    for r in s24_rows:
        print(f"| {r['dtype']} | {r['dense_mb']:.1f} | {r['comp_mb']:.1f} | {r['ratio']:.4f} | "
              f"{r['pack_ms']:.0f} | {r['unpack_ms']:.0f} |")


def calibrate(args):
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        w_gate, w_up, w_down, w_downT = make_ffn(args.hidden, args.intermediate, dtype)
        ws = SparseFFNWorkspace(w_gate, w_up, w_downT, "swiglu", w_down=w_down, max_tokens=max(args.tokens))
        for t in args.tokens:
            plan, rows = measure_plan(ws, t, [f / 20 for f in range(1, 20)], repeats=args.repeats, clock=CLOCK)
            print(f"({dname}, {t}): FFNPlan({plan.gate_up!r}, {plan.down!r}, {plan.max_active}),", flush=True)
            for frac, d, res in rows:
                cells = " ".join(f"{k}={d / v:.2f}" for k, v in sorted(res.items(), key=lambda kv: kv[1]))
                print(f"    active {frac:.2f}: dense {d * 1e3:.1f} ms  {cells}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.7, 0.9])
    p.add_argument("--calibrate", action="store_true", help="measure plans (break-even, methods) instead")
    p.add_argument("--clock", choices=["process", "wall"], default="process")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.calibrate:
        calibrate(args)
        return
    ffn_rows = bench_ffn(args)
    s24_rows = bench_24(args)
    print_tables(ffn_rows, s24_rows, args)


if __name__ == "__main__":
    main()
