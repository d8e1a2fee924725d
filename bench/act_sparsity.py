"""Activation sparsity benchmarks (TEAL / WINA / dReLU). Not a test: writes JSON + a PNG.

    .venv/bin/python bench/act_sparsity.py kl        # KL / cosine vs sparsity, stories260k + MiniLM
    .venv/bin/python bench/act_sparsity.py drelu     # dReLU + recovery on stories260k
    .venv/bin/python bench/act_sparsity.py cls       # chunk-level sparsity table, stories260k
    .venv/bin/python bench/act_sparsity.py breakeven # input-sparse linear vs dense, per active fraction
    .venv/bin/python bench/act_sparsity.py speed     # decode tok/s, squeeze.load-ed sparse vs dense

Timing runs single-threaded (OMP_NUM_THREADS=1) and interleaves dense and sparse (the machine is
shared: compare ratios measured side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import squeeze

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny (random token rows) for the speed benchmark
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
CALIB = SHARED / "data" / "stories260k-calib.jsonl"
EVAL = SHARED / "data" / "stories260k-eval.jsonl"
OUT = ROOT / "bench" / "results_act_sparsity"
SPARSITIES = (0.25, 0.40, 0.50, 0.65, 0.80)
COMBOS = (("teal", "uniform"), ("wina", "uniform"), ("teal", "greedy"), ("wina", "greedy"),
          ("wina+transform", "uniform"), ("wina+transform", "greedy"))


def _quiet():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def bench_kl(args):
    from squeeze.defaults import default_model_path

    results = {"stories260k": {}, "minilm": {}}
    name = "kl-" + "-".join(args.models)
    if (OUT / f"{name}.json").is_file():  # resume: points already measured are kept
        results.update(json.loads((OUT / f"{name}.json").read_text()))
    tmp = Path(tempfile.mkdtemp(prefix="as-kl-"))
    minilm = default_model_path()
    try:
        for combo, alloc in COMBOS:
            method = combo.split("+")[0]
            for s in SPARSITIES:
                key = f"{combo}-{alloc}"
                # wina+transform: WINA with its orthogonal transform
                greedy = dict(greedy_tokens=args.greedy_tokens, greedy_step=args.greedy_step,
                              transform=combo.endswith("+transform"))
                if "stories260k" in args.models and str(s) not in results["stories260k"].get(key, {}):
                    out = tmp / f"st-{key}-{s}"
                    t0 = time.perf_counter()
                    squeeze.compress(STORIES, out, method=method, allocation=alloc, act_sparsity=s, calib=str(CALIB),
                                     nsamples=args.nsamples, seqlen=400, **greedy)
                    ev = squeeze.evaluate(out, str(EVAL), reference=STORIES, max_rows=args.rows)
                    results["stories260k"].setdefault(key, {})[str(s)] = round(ev["kl"], 5)
                    print(f"stories260k {key} {s:.2f} KL {ev['kl']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    _save(name, results)
                if "minilm" in args.models and alloc in args.minilm_alloc and \
                        str(s) not in results["minilm"].get(key, {}):
                    out = tmp / f"lm-{key}-{s}"
                    squeeze.compress(minilm, out, method=method, allocation=alloc, act_sparsity=s, calib="builtin",
                                     nsamples=32, seqlen=128, **greedy)
                    ev = squeeze.evaluate(out, "builtin-eval", reference=minilm)
                    results["minilm"].setdefault(key, {})[str(s)] = round(ev["cosine_mean"], 5)
                    print(f"minilm {key} {s:.2f} cosine {ev['cosine_mean']:.4f}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    _save(name, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_plot(args):
    results = {"stories260k": {}, "minilm": {}}
    for f in sorted(OUT.glob("kl-*.json")):
        for model, curves in json.loads(f.read_text()).items():
            for key, curve in curves.items():
                results[model].setdefault(key, {}).update(curve)
    _plot(results)
    for model, curves in results.items():
        keys = sorted(curves)
        print(f"\n{model}\n| sparsity | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for sp in SPARSITIES:
            print(f"| {sp:.0%} | " + " | ".join(f"{curves[k][str(sp)]:.4f}" if str(sp) in curves[k] else "-"
                                                  for k in keys) + " |")


def _plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (model, ylabel) in zip(axes, (("stories260k", "KL(dense || sparse), nats/token"),
                                          ("minilm", "embedding cosine to dense"))):
        for key, curve in results[model].items():
            xs = sorted(float(k) for k in curve)
            ax.plot([100 * x for x in xs], [curve[str(x)] for x in xs], marker="o",
                    linestyle="-" if key.startswith("wina") else "--", label=key)
        ax.set_xlabel("model-wide activation sparsity (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(model)
        if model == "stories260k":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "act_sparsity_kl.png", dpi=120)


def bench_drelu(args):
    tmp = Path(tempfile.mkdtemp(prefix="as-drelu-"))
    res = {}
    try:
        for variant in ("drelu", "relu"):
            out = tmp / variant
            t0 = time.perf_counter()
            r = squeeze.compress(STORIES, out, method="drelu", variant=variant, recover_steps=args.steps,
                                 lr=args.lr, batch=args.batch, calib=str(CALIB), nsamples=args.nsamples,
                                 seqlen=400, progress=False)
            wall = time.perf_counter() - t0
            ev = squeeze.evaluate(out, str(EVAL), reference=STORIES, max_rows=args.rows, activation_stats=True)
            rep = r.report["pass_reports"]["drelu"]
            res[variant] = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "wall_s": round(wall, 1),
                            "train_s": rep["train"]["seconds"], "kl_before_calib": rep["kl_before"],
                            "kl_after_calib": rep["kl_after"], "zero_before": rep["down_input_zero_before"],
                            "zero_after": rep["down_input_zero_after"], "kl_eval": round(ev["kl"], 5),
                            "tls_eval": ev["activation_stats"]["mean"]["tls"],
                            "cls8_eval": ev["activation_stats"]["mean"]["cls8"]}
            print(variant, res[variant], flush=True)
            _save(f"drelu-{args.steps}", res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_cls(args):
    from squeeze.act_stats import activation_stats
    from squeeze.evaluation import eval_rows

    rows = eval_rows(str(EVAL), None, args.rows, 512)
    tmp = Path(tempfile.mkdtemp(prefix="as-cls-"))
    res = {}
    try:
        dense = squeeze.load(STORIES)
        res["dense |x|<=0.01"] = activation_stats(dense, rows, threshold=0.01)["mean"]
        for method in ("teal", "wina"):
            for s in (0.5, 0.8):
                out = tmp / f"{method}{s}"
                squeeze.compress(STORIES, out, method=method, act_sparsity=s, calib=str(CALIB),
                                 nsamples=args.nsamples, seqlen=400)
                res[f"{method} {s:.0%}"] = activation_stats(squeeze.load(out), rows)["mean"]
                print(method, s, res[f"{method} {s:.0%}"], flush=True)
        if args.steps > 0:
            out = tmp / "drelu"
            squeeze.compress(STORIES, out, method="drelu", recover_steps=args.steps, lr=args.lr, calib=str(CALIB),
                             nsamples=args.nsamples, seqlen=400, progress=False)
            res[f"drelu ({args.steps} steps)"] = activation_stats(squeeze.load(out), rows)["mean"]
        _save("cls" if args.steps > 0 else "cls-teal-wina", res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in res.items():
        print(f"| {k} | " + " | ".join(f"{v[c]:.3f}" for c in ["tls", "cls2", "cls4", "cls8", "cls16", "cls32",
                                                                   "cls64"]) + " |")


def _best(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_breakeven(args):
    """squeeze.kernels' bag / gather input-sparse linears vs F.linear, per dtype, token count and
    active fraction (the same active set for every token of a call: non-zeros = tokens x fraction,
    union = fraction), min of reps, on W [out, in] and its transpose shape. The plans in
    kernels/cpu_input_sparse.py are read off this table."""
    import torch.nn.functional as F

    from squeeze.kernels.cpu_input_sparse import linear_rows_bag, linear_rows_gather

    torch.set_num_threads(1)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((args.out_features, args.in_features), (args.in_features, args.out_features)):
            w = torch.randn(*shape).to(dtype)
            wt = w.t().contiguous()
            for tokens in (1, 2, 4, 8):
                for active in (0.1, 0.3, 0.5, 0.7, 0.9):
                    idx = torch.randperm(shape[1])[: int(active * shape[1])].sort().values
                    x = torch.zeros(tokens, shape[1], dtype=dtype)
                    x[:, idx] = torch.randn(tokens, idx.numel()).to(dtype)
                    with torch.no_grad():
                        td = _best(lambda: F.linear(x, w), args.reps)
                        tb = _best(lambda: linear_rows_bag(x, wt), args.reps)
                        tg = _best(lambda: linear_rows_gather(x, wt, idx), args.reps)
                    key = f"{str(dtype).removeprefix('torch.')} {shape[0]}x{shape[1]} t{tokens}"
                    res.setdefault(key, {})[str(active)] = {"bag": round(td / tb, 3), "gather": round(td / tg, 3)}
                    print(key, active, f"dense {td * 1e3:.2f} ms  bag x{td / tb:.2f}  gather x{td / tg:.2f}", flush=True)
    _save("breakeven" + args.tag, res)


def _random_llama(folder: Path, dtype: torch.dtype, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("cpu"):
        m = LlamaForCausalLM(cfg)
    m.to(dtype).save_pretrained(folder)
    del m


@torch.no_grad()
def _decode_tps(model, prompt: torch.Tensor, new: int, chunk: int) -> float:
    """Tokens/s of feeding ``new`` tokens ``chunk`` at a time after a cached prompt."""
    from squeeze.compat import cache_kwargs, new_cache

    cache = new_cache()
    model(input_ids=prompt, use_cache=True, **cache_kwargs(cache))
    toks = torch.randint(3, 2000, (1, new))
    t = time.perf_counter()
    for i in range(0, new, chunk):
        model(input_ids=toks[:, i:i + chunk], use_cache=True, **cache_kwargs(cache))
    return new / (time.perf_counter() - t)


def bench_speed(args):
    torch.set_num_threads(1)
    _quiet()
    tmp = Path(tempfile.mkdtemp(prefix="as-speed-"))
    res = {}
    try:
        for dname in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            src = tmp / f"src-{dname}"
            _random_llama(src, dtype, args.layers)
            # "dense copy" is the same dense model loaded twice: its ratio is the noise floor
            models = {"dense": squeeze.load(src), "dense copy": squeeze.load(src)}
            from tests.tiny import token_rows, write_jsonl

            calib = write_jsonl(token_rows(8, 64, vocab=2000), tmp / "calib.jsonl")
            for combo in args.methods.split(","):
                for s in args.sparsities:
                    out = tmp / f"{combo}-{dname}-{s}"
                    squeeze.compress(src, out, method=combo.split("+")[0], act_sparsity=s, calib=str(calib),
                                     nsamples=8, seqlen=64, dense_prefix=0.0,
                                     **({"transform": True} if combo.endswith("+transform") else {}))
                    models[f"{combo} {s:.0%}"] = squeeze.load(out)
                    shutil.rmtree(out, ignore_errors=True)
            # Every model's weights are copied into fresh (anonymous) memory: loaded as they are,
            # they are mmapped file pages, and where a file's pages sit measured up to +-8% on the
            # same dense model — more than the effect being measured.
            with torch.no_grad():
                for m in models.values():
                    for p in m.parameters():
                        p.data = p.data.clone()
            prompt = torch.randint(3, 2000, (1, 16))
            for chunk in (1, 8):
                times = {k: [] for k in models}
                for r in range(args.rounds):  # interleave, alternating the order: the machine is shared
                    for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                        times[k].append(_decode_tps(models[k], prompt, args.new, chunk))
                best = {k: max(v) for k, v in times.items()}
                for k, v in best.items():
                    res.setdefault(dname, {}).setdefault(f"chunk{chunk}", {})[k] = {
                        "tok_s": round(v, 2), "vs_dense": round(v / best["dense"], 3)}
                print(dname, f"chunk {chunk}", {k: f"{v:.2f} tok/s ({v / best['dense']:.2f}x)" for k, v in best.items()},
                      flush=True)
                _save("speed" + args.tag, res)
            del models
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(name, obj):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(obj, indent=2) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("kl")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--greedy-tokens", type=int, default=512)
    p.add_argument("--models", nargs="+", default=["stories260k", "minilm"])
    p.add_argument("--minilm-alloc", nargs="+", default=["uniform", "greedy"])
    sub.add_parser("plot")
    p.add_argument("--greedy-step", type=float, default=0.05)
    p = sub.add_parser("drelu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--rows", type=int, default=40)
    p = sub.add_parser("cls")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p = sub.add_parser("breakeven")
    p.add_argument("--in-features", type=int, default=2048)
    p.add_argument("--out-features", type=int, default=5632)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p = sub.add_parser("speed")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="teal", help="comma list: teal, wina, wina+transform")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args(argv)
    _quiet()
    {"kl": bench_kl, "plot": bench_plot, "drelu": bench_drelu, "cls": bench_cls, "breakeven": bench_breakeven,
     "speed": bench_speed}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
