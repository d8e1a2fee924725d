"""What the load-time plan (squeeze.runtime.plan) decides at the benchmark model's shapes.

``python -m bench.plan_shapes [--threads N]`` builds the linears of the random Llama of
bench/cases/act_sparsity.py (hidden 2048, intermediate 5632: q/k/v/o 2048x2048, gate/up 5632x2048,
down 2048x5632) with a TEAL site at 50 / 70 / 90% sparsity, and its MLP ReLU-fied (dReLU, the
gate of random weights active for about half the neurons), in bf16 and fp32, and runs the
planner on them exactly as ``squeeze.load`` does, with a fresh cache so every key is measured.
Prints one line per key: the chosen path, dense us / sparse us and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types

import torch
from torch import nn

from squeeze.runtime import act_sparse, drelu
from squeeze.runtime.plan import PlanCache, plan

HIDDEN, INTER = 2048, 5632


class _MLP(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False).to(dtype)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False).to(dtype)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False).to(dtype)

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * torch.relu(self.up_proj(x)))


def build(dtypes, sparsities) -> nn.Module:
    root = nn.Module()
    i = 0
    for dtype in dtypes:
        for out_f, in_f in ((HIDDEN, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)):
            for s in sparsities:
                lin = nn.Linear(in_f, out_f, bias=False).to(dtype)
                sp = act_sparse.ActSparsifier(in_f)
                sp.set(s, 1.0)
                site = types.SimpleNamespace(module=lin, transposed=False)
                act_sparse.install(site, [site], sp)
                root.add_module(f"lin{i}", lin)
                i += 1
        mlp = _MLP(dtype)
        drelu.install_fast_path(mlp, "drelu")
        root.add_module(f"mlp{i}", mlp)
        i += 1
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build((torch.bfloat16, torch.float32), (0.5, 0.7, 0.9))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        decisions = plan(drelu.plan_candidates(model) + act_sparse.plan_candidates(model), "auto", PlanCache(tmp))
        took = time.perf_counter() - t0
    for d in decisions:
        print(f"{d.key:70s} {d.path:6s} dense {d.dense_us:8.0f} us  sparse {d.sparse_us:8.0f} us  {d.ratio:.2f}x")
    print(f"{len(decisions)} keys planned in {took:.2f} s, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
