"""CPU benchmarks of the squeeze.kernels fast paths on a Llama-7B FFN slice (hidden 4096,
intermediate 11008, swiglu, random weights): the activation-sparse FFN (dense / sparse / auto,
round-robin in one loop, a fresh random active set per round, minimum over repeats), the plan
calibration behind kernels/cpu_ffn.py's defaults, and 2:4 compressed sizes.

Times are process CPU time by default (``clock="process"``: excludes time spent descheduled on a
shared machine); ``clock="wall"`` uses perf_counter.
"""

from __future__ import annotations

import time

from bench.harness import Case, latest, md_table

DTYPES = ("fp32", "bf16", "fp16")
LLAMA7B = {"hidden": 4096, "intermediate": 11008}


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _clock(name):
    return time.process_time if name == "process" else time.perf_counter


def make_ffn(h: int, i: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    w_gate = (torch.randn(i, h, generator=g) / h**0.5).to(dtype)
    w_up = (torch.randn(i, h, generator=g) / h**0.5).to(dtype)
    w_down = (torch.randn(h, i, generator=g) / i**0.5).to(dtype)  # nn.Linear layout [H, I]
    return w_gate, w_up, w_down, w_down.t().contiguous()


def ffn(hidden, intermediate, dtypes, tokens, sparsity, repeats, clock="process") -> list[dict]:
    import torch
    import torch.nn.functional as F
    from squeeze.kernels import SparseFFNWorkspace, act_mul

    clk = _clock(clock)

    def dense_ffn(x, w_gate, w_up, w_down):  # what an nn.Linear MLP does (down in [H, I] layout)
        return F.linear(act_mul(F.linear(x, w_gate), F.linear(x, w_up), "swiglu"), w_down)

    def timed(fn, *args):
        t0 = clk()
        fn(*args)
        return clk() - t0

    rows = []
    for dname in dtypes:
        w_gate, w_up, w_down, w_downT = make_ffn(hidden, intermediate, _dtype(dname))
        ws = SparseFFNWorkspace(w_gate, w_up, w_downT, "swiglu", w_down=w_down, max_tokens=max(tokens))
        for t in tokens:
            x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(1)).to(_dtype(dname))
            plan = ws.plan(t)
            for sp in sparsity:
                n = max(1, round((1 - sp) * intermediate))
                gen = torch.Generator().manual_seed(int(sp * 1000) + t)
                sets = [torch.randperm(intermediate, generator=gen)[:n].sort().values for _ in range(repeats + 1)]
                best = {"dense": float("inf"), "sparse": float("inf"), "auto": float("inf")}
                for r, idx in enumerate(sets):  # round-robin, a fresh active set per round
                    calls = [("dense", dense_ffn, (x, w_gate, w_up, w_down)),
                             ("sparse", ws.sparse, (x, idx, plan)), ("auto", ws, (x, idx))]
                    calls = calls[r % 3:] + calls[: r % 3]  # rotate: no variant always runs first
                    times = {name: timed(fn, *a) for name, fn, a in calls}
                    if r:  # the first round is warm-up
                        best = {k: min(best[k], times[k]) for k in best}
                ms = {f"{k}_ms": round(v * 1e3, 3) for k, v in best.items()}
                rows.append({"row": f"{dname} T={t} {sp:.0%}", "params": {"dtype": dname, "tokens": t, "sparsity": sp},
                             "metrics": {**ms, "sparse_speedup": round(best["dense"] / best["sparse"], 3),
                                         "auto_speedup": round(best["dense"] / best["auto"], 3),
                                         "plan": f"{plan.gate_up}+{plan.down}", "max_active": plan.max_active,
                                         "auto_used": "sparse" if ws.use_sparse(n, t) else "dense"}})
    return rows


def plans(hidden, intermediate, dtypes, tokens, repeats, clock="process") -> list[dict]:
    """Re-measure cpu_ffn's plans: every method pair at active fractions 5%..95%."""
    from squeeze.kernels import SparseFFNWorkspace
    from squeeze.kernels.cpu_ffn import measure_plan

    rows = []
    for dname in dtypes:
        w_gate, w_up, w_down, w_downT = make_ffn(hidden, intermediate, _dtype(dname))
        ws = SparseFFNWorkspace(w_gate, w_up, w_downT, "swiglu", w_down=w_down, max_tokens=max(tokens))
        for t in tokens:
            plan, measured = measure_plan(ws, t, [f / 20 for f in range(1, 20)], repeats=repeats, clock=_clock(clock))
            best = {}
            for frac, d, res in measured:
                method, secs = min(res.items(), key=lambda kv: kv[1])
                best[f"{frac:.2f}"] = [round(d / secs, 2), method]
            rows.append({"row": f"{dname}, {t}", "params": {"dtype": dname, "tokens": t},
                         "metrics": {"plan": f"{plan.gate_up}+{plan.down}", "max_active": plan.max_active,
                                     "dense_ms": round(measured[0][1] * 1e3, 1), "best_speedup": best}})
    return rows


def pack24(hidden, intermediate, clock="process") -> list[dict]:
    import torch
    from squeeze.kernels import compressed_bytes, pack_24, unpack_24

    clk, n, k = _clock(clock), hidden, intermediate  # a down-projection-shaped weight
    rows = []
    for dname in ("fp16", "bf16", "fp32"):
        dtype = _dtype(dname)
        keep = torch.rand(n, k // 4, 4).argsort(-1) < 2
        w = (torch.randn(n, k).to(dtype).view(n, k // 4, 4) * keep.to(dtype)).view(n, k)
        t0 = clk()
        values, meta = pack_24(w)
        t_pack = clk() - t0
        t0 = clk()
        back = unpack_24(values, meta)
        t_unpack = clk() - t0
        assert torch.equal(back, w)
        dense_b = w.numel() * w.element_size()
        comp_b = values.numel() * values.element_size() + meta.numel()
        assert comp_b == compressed_bytes(n, k, dtype)
        rows.append({"row": dname, "metrics": {"dense_mb": dense_b / 1e6, "comp_mb": comp_b / 1e6,
                                               "ratio": comp_b / dense_b, "pack_ms": t_pack * 1e3,
                                               "unpack_ms": t_unpack * 1e3}})
    return rows


CASES = [
    Case("kernels", "ffn", "bench.cases.kernels:ffn",
         {**LLAMA7B, "dtypes": ["bf16", "fp32"], "tokens": [1, 8], "sparsity": [0.0, 0.25, 0.5, 0.7, 0.9],
          "repeats": 15}, quick={"dtypes": ["bf16"], "tokens": [1], "sparsity": [0.5, 0.9], "repeats": 5}),
    Case("kernels", "plans", "bench.cases.kernels:plans",
         {**LLAMA7B, "dtypes": ["bf16", "fp32"], "tokens": [1, 2, 4, 8, 16, 32, 64], "repeats": 4}),
    Case("kernels", "pack24", "bench.cases.kernels:pack24", dict(LLAMA7B), quick={}),
]


def table_ffn(records) -> str:
    rows = []
    for r in latest(records, "kernels", "ffn"):
        p, m = r["params"], r["metrics"]
        rows.append([p["dtype"], p["tokens"], f"{p['sparsity']:.0%}",
                     f"{m['plan']} (dense above {m['max_active']:.0%} active)", f"{m['dense_ms']:.2f}",
                     f"{m['sparse_ms']:.2f}", f"{m['sparse_speedup']:.2f}x", f"{m['auto_ms']:.2f}",
                     f"{m['auto_speedup']:.2f}x", m["auto_used"]])
    return md_table(["dtype", "tokens", "sparsity", "plan", "dense ms", "sparse ms", "sparse speedup", "auto ms",
                     "auto speedup", "auto used"], rows)


# speedups over dense at 50 / 70 / 90% sparsity: the goal set for this kernel and a prototype
# measured earlier on the development machine (../shared/KERNELS.md)
GOALS = {("bf16", 1): ("1.3 / 2.3 / 5.0x", "1.18 / 2.11 / 4.84x"), ("fp32", 1): ("-", "0.87 / 1.30 / 3.21x"),
         ("bf16", 8): ("-", "1.67 / 3.04 / 9.24x"), ("fp32", 8): ("-", "1.29 / 2.27 / 6.80x")}


def table_goals(records) -> str:
    got = {(r["params"]["dtype"], r["params"]["tokens"], r["params"]["sparsity"]): r["metrics"]
           for r in latest(records, "kernels", "ffn")}
    rows = []
    for (d, t), (goal, proto) in GOALS.items():
        cells = [" / ".join(f"{got[(d, t, s)][k]:.2f}" for s in (0.5, 0.7, 0.9)) + "x"
                 if all((d, t, s) in got for s in (0.5, 0.7, 0.9)) else "-" for k in ("sparse_speedup", "auto_speedup")]
        rows.append([f"{d}, {t} token{'s' if t > 1 else ''}", goal, proto, *cells])
    return md_table(["case", "goal", "prototype", "this (sparse)", "this (auto)"], rows)


def table_plans(records) -> str:
    rows = []
    for r in latest(records, "kernels", "plans"):
        m = r["metrics"]
        best = " / ".join(f"{m['best_speedup'][f][0]:.2f} {m['best_speedup'][f][1]}"
                          for f in ("0.10", "0.30", "0.50", "0.70", "0.90"))
        rows.append([r["row"], f"{m['plan']}, {m['max_active']:.0%}", f"{m['dense_ms']:.1f}", best])
    return md_table(["dtype, tokens", "plan (methods, dense above)", "module dense ms",
                     "best sparse speedup over the module's dense at 10% / 30% / 50% / 70% / 90% active"], rows)


def table_pack24(records) -> str:
    return md_table(["dtype", "dense MB", "compressed MB", "ratio", "pack ms", "unpack ms"],
                    [[r["row"], f"{m['dense_mb']:.1f}", f"{m['comp_mb']:.1f}", f"{m['ratio']:.4f}",
                      f"{m['pack_ms']:.0f}", f"{m['unpack_ms']:.0f}"]
                     for r in latest(records, "kernels", "pack24") for m in [r["metrics"]]])


TABLES = {"kernels-ffn": table_ffn, "kernels-goals": table_goals, "kernels-plans": table_plans,
          "kernels-pack24": table_pack24}
