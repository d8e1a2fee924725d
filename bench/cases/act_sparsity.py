"""Activation sparsity (TEAL / WINA / dReLU): quality vs sparsity, dReLU recovery, chunk-level
sparsity, the input-sparse linear's break-even, and CPU decode speed of squeeze.load-ed models
against dense (every model of one dtype timed in one process, interleaved, as ratios to dense)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.cases.prune import CALIB, EVAL, STORIES
from bench.harness import Case, latest, md_table

SPARSITIES = [0.25, 0.4, 0.5, 0.65, 0.8]
COMBOS = ("teal-uniform", "wina-uniform", "teal-greedy", "wina-greedy", "wina+transform-uniform",
          "wina+transform-greedy")


def kl_curve(model: str, combo: str, sparsities: list, nsamples: int, rows: int | None, greedy_tokens: int,
             greedy_step: float = 0.05) -> list[dict]:
    """One method (e.g. ``wina+transform-greedy``) at every sparsity: stories260k KL or MiniLM cosine."""
    import squeeze
    from squeeze.defaults import default_model_path

    method, alloc = combo.rsplit("-", 1)
    kw = dict(method=method.split("+")[0], allocation=alloc, greedy_tokens=greedy_tokens, greedy_step=greedy_step,
              transform=method.endswith("+transform"))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in sparsities:
            d = Path(tmp) / str(s)
            if model == "stories260k":
                squeeze.compress(STORIES, d, act_sparsity=s, calib=str(CALIB), nsamples=nsamples, seqlen=400, **kw)
                metrics = {"kl": squeeze.evaluate(d, str(EVAL), reference=STORIES, max_rows=rows)["kl"]}
            else:
                dense = default_model_path()
                squeeze.compress(dense, d, act_sparsity=s, calib="builtin", nsamples=nsamples, seqlen=128, **kw)
                metrics = {"cosine_mean": squeeze.evaluate(d, "builtin-eval", reference=dense)["cosine_mean"]}
            out.append({"row": f"{combo} {s}", "params": {"sparsity": s}, "metrics": metrics})
            shutil.rmtree(d, ignore_errors=True)
    return out


def drelu(variants: list, steps: int, lr: float, batch: int, nsamples: int, rows: int) -> list[dict]:
    import squeeze

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            d = Path(tmp) / variant
            t0 = time.perf_counter()
            r = squeeze.compress(STORIES, d, method="drelu", variant=variant, recover_steps=steps, lr=lr, batch=batch,
                                 calib=str(CALIB), nsamples=nsamples, seqlen=400, progress=False)
            wall = time.perf_counter() - t0
            ev = squeeze.evaluate(d, str(EVAL), reference=STORIES, max_rows=rows, activation_stats=True)
            rep = r.report["pass_reports"]["drelu"]
            out.append({"row": variant, "metrics": {
                "wall_s": round(wall, 1), "train_s": rep["train"]["seconds"], "kl_before_calib": rep["kl_before"],
                "kl_after_calib": rep["kl_after"], "zero_before": rep["down_input_zero_before"],
                "zero_after": rep["down_input_zero_after"], "kl_eval": round(ev["kl"], 5),
                "tls_eval": ev["activation_stats"]["mean"]["tls"], "cls8_eval": ev["activation_stats"]["mean"]["cls8"]}})
    return out


def cls(dense: bool, methods: list, sparsities: list, drelu_steps: int, nsamples: int, rows: int, lr: float = 1e-3) -> list[dict]:
    """Token- and chunk-level sparsity (BlockFFN's TLS / CLS) of the MLP intermediate on eval rows."""
    import squeeze
    from squeeze.act_stats import activation_stats  # the one internal import of this suite
    from squeeze.evaluation import eval_rows

    data = eval_rows(str(EVAL), None, rows, 512)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        if dense:  # a dense SwiGLU has no exact zeros: count |x| <= 0.01 as inactive
            out.append({"row": "dense |x|<=0.01",
                        "metrics": activation_stats(squeeze.load(STORIES), data, threshold=0.01)["mean"]})
        for method in methods:
            for s in sparsities:
                d = Path(tmp) / f"{method}{s}"
                squeeze.compress(STORIES, d, method=method, act_sparsity=s, calib=str(CALIB), nsamples=nsamples,
                                 seqlen=400)
                out.append({"row": f"{method} {s:.0%}", "metrics": activation_stats(squeeze.load(d), data)["mean"]})
        if drelu_steps:
            d = Path(tmp) / "drelu"
            squeeze.compress(STORIES, d, method="drelu", recover_steps=drelu_steps, lr=lr, calib=str(CALIB),
                             nsamples=nsamples, seqlen=400, progress=False)
            out.append({"row": f"drelu ({drelu_steps} steps)", "metrics": activation_stats(squeeze.load(d), data)["mean"]})
    return out


def _best(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def breakeven(in_features: int, out_features: int, dtypes: list, tokens: list, active: list, reps: int) -> list[dict]:
    """squeeze.kernels' bag / gather input-sparse linears vs F.linear, per dtype, token count and
    active fraction (one active set shared by the call's tokens), on W [out, in] and its transpose
    shape: the bag through our C kernel ("bag", where it is built) and through torch's embedding
    bags ("bag_torch"). kernels/cpu_input_sparse.py's plans are read off these ratios."""
    import torch
    import torch.nn.functional as F
    from squeeze.kernels.cpu_input_sparse import (linear_rows_bag, linear_rows_embedding_bag, linear_rows_gather,
                                                  native_rows)

    out = []
    for dname in dtypes:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dname]
        for shape in ((out_features, in_features), (in_features, out_features)):
            w = torch.randn(*shape).to(dtype)
            wt = w.t().contiguous()
            for t in tokens:
                for a in active:
                    idx = torch.randperm(shape[1])[: int(a * shape[1])].sort().values
                    x = torch.zeros(t, shape[1], dtype=dtype)
                    x[:, idx] = torch.randn(t, idx.numel()).to(dtype)
                    with torch.no_grad():
                        td = _best(lambda: F.linear(x, w), reps)
                        tb = _best(lambda: linear_rows_bag(x, wt), reps) if native_rows(dtype) else None
                        tt = _best(lambda: linear_rows_embedding_bag(x, wt), reps)
                        tg = _best(lambda: linear_rows_gather(x, wt, idx), reps)
                    out.append({"row": f"{dname} {shape[0]}x{shape[1]} t{t} {a}",
                                "params": {"dtype": dname, "shape": f"{shape[0]}x{shape[1]}", "tokens": t, "active": a},
                                "metrics": {"dense_ms": round(td * 1e3, 3), "bag": tb and round(td / tb, 3),
                                            "bag_torch": round(td / tt, 3), "gather": round(td / tg, 3)}})
    return out


def speed(dtypes: list, layers: int, methods: list, sparsities: list, new: int, rounds: int) -> list[dict]:
    """Decode tokens/s of squeeze.load-ed TEAL / WINA models vs the dense model on a random Llama
    (hidden 2048, intermediate 5632: memory-bound), 16-token cached prompt, ``new`` tokens fed 1 or
    8 at a time, best of ``rounds`` interleaved in alternating order. "dense copy" is the dense
    model loaded a second time: its ratio is the run's noise floor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import squeeze
    from squeeze.compat import cache_kwargs, new_cache
    from tests.tiny import token_rows, write_jsonl

    @torch.no_grad()
    def decode_tps(model, prompt, chunk):
        cache = new_cache()
        model(input_ids=prompt, use_cache=True, **cache_kwargs(cache))
        toks = torch.randint(3, 2000, (1, new))
        t = time.perf_counter()
        for i in range(0, new, chunk):
            model(input_ids=toks[:, i:i + chunk], use_cache=True, **cache_kwargs(cache))
        return new / (time.perf_counter() - t)

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = write_jsonl(token_rows(8, 64, vocab=2000), tmp / "calib.jsonl")
        for dname in dtypes:
            src = tmp / f"src-{dname}"
            cfg = LlamaConfig(vocab_size=2048, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dname]).save_pretrained(src)
            models = {"dense": squeeze.load(src), "dense copy": squeeze.load(src)}
            for combo in methods:
                for s in sparsities:
                    d = tmp / f"{combo}-{dname}-{s}"
                    squeeze.compress(src, d, method=combo.split("+")[0], act_sparsity=s, calib=str(calib), nsamples=8,
                                     seqlen=64, dense_prefix=0.0,
                                     **({"transform": True} if combo.endswith("+transform") else {}))
                    models[f"{combo} {s:.0%}"] = squeeze.load(d)
            # Loaded weights are mmapped file pages, and where a file's pages sit measured up to
            # +-8% on the same dense model: copy every model into fresh memory first.
            with torch.no_grad():
                for m in models.values():
                    for p in m.parameters():
                        p.data = p.data.clone()
            prompt = torch.randint(3, 2000, (1, 16))
            for chunk in (1, 8):
                times = {k: [] for k in models}
                for r in range(rounds):  # interleaved, alternating order: the machine is shared
                    for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                        times[k].append(decode_tps(models[k], prompt, chunk))
                base = f"{dname} chunk{chunk} dense"
                for k, v in times.items():
                    row = f"{dname} chunk{chunk} {k}"
                    out.append({"row": row, "params": {"dtype": dname, "chunk": chunk, "model": k},
                                "metrics": {"tok_s": round(max(v), 2)}, "ratio_to": None if row == base else base})
            del models
    return out


CASES = [Case("act_sparsity", f"kl-stories260k-{c}", "bench.cases.act_sparsity:kl_curve",
              {"model": "stories260k", "combo": c, "sparsities": SPARSITIES, "nsamples": 32, "rows": 20,
               "greedy_tokens": 512}, quick={"sparsities": [0.5]} if c == "teal-uniform" else None) for c in COMBOS]
CASES += [Case("act_sparsity", f"kl-minilm-{c}", "bench.cases.act_sparsity:kl_curve",
               {"model": "minilm", "combo": c, "sparsities": SPARSITIES, "nsamples": 32, "rows": None,
                "greedy_tokens": 512}) for c in COMBOS]
CASES += [
    Case("act_sparsity", "drelu", "bench.cases.act_sparsity:drelu",
         {"variants": ["drelu", "relu"], "steps": 300, "lr": 1e-3, "batch": 4, "nsamples": 128, "rows": 30}),
    Case("act_sparsity", "cls", "bench.cases.act_sparsity:cls",
         {"dense": True, "methods": ["teal", "wina"], "sparsities": [0.5, 0.8], "drelu_steps": 0, "nsamples": 32, "rows": 20}),
    Case("act_sparsity", "cls-drelu", "bench.cases.act_sparsity:cls",
         {"dense": False, "methods": [], "sparsities": [], "drelu_steps": 300, "nsamples": 32, "rows": 20}),
    Case("act_sparsity", "breakeven", "bench.cases.act_sparsity:breakeven",
         {"in_features": 2048, "out_features": 5632, "dtypes": ["float32", "bfloat16"], "tokens": [1, 2, 4, 8],
          "active": [0.1, 0.3, 0.5, 0.7, 0.9], "reps": 7},
         quick={"dtypes": ["bfloat16"], "tokens": [1], "active": [0.1, 0.5], "reps": 3}),
    Case("act_sparsity", "speed", "bench.cases.act_sparsity:speed",
         {"dtypes": ["bf16", "fp32"], "layers": 4, "methods": ["teal", "wina+transform"], "sparsities": [0.5, 0.7, 0.9],
          "new": 32, "rounds": 6},
         quick={"dtypes": ["bf16"], "layers": 1, "methods": ["teal"], "sparsities": [0.9], "new": 16, "rounds": 2}),
]


def table_kl(records) -> str:
    rows = []
    for model, label, key, fmt in (("stories260k", "stories260k KL", "kl", "{:.3f}"),
                                   ("minilm", "MiniLM mean cosine", "cosine_mean", "{:.4f}")):
        for c in COMBOS:
            got = {r["params"]["sparsity"]: r["metrics"][key] for r in latest(records, "act_sparsity", f"kl-{model}-{c}")}
            if got:
                rows.append([f"{label}, {c}", *(fmt.format(got[s]) if s in got else "-" for s in SPARSITIES)])
    return md_table(["method", *(f"{s:.0%}" for s in SPARSITIES)], rows)


def table_drelu(records) -> str:
    names = {"drelu": "dReLU relu(gate)*relu(up)", "relu": "ReLU of gate only"}
    rows = [[names[r["row"]], f"{m['zero_before']:.1%}", f"{m['zero_after']:.1%}", f"{m['kl_before_calib']:.3f}",
             f"{m['kl_after_calib']:.3f}", f"{m['kl_eval']:.3f}", f"{m['tls_eval']:.1%}", f"{m['cls8_eval']:.1%}",
             f"{m['train_s']:.0f} s"] for r in latest(records, "act_sparsity", "drelu") for m in [r["metrics"]]]
    return md_table(["variant", "zero before", "zero after", "KL before (calib rows)", "KL after (calib rows)",
                     "KL eval (30 rows)", "TLS eval", "CLS8 eval", "train wall"], rows)


CLS_LABELS = {"dense |x|<=0.01": "dense, inactive = abs(x) <= 0.01", "teal 50%": "TEAL 50%", "teal 80%": "TEAL 80%",
              "wina 50%": "WINA 50%", "wina 80%": "WINA 80%"}


def table_cls(records) -> str:
    cols = ["tls", "cls2", "cls4", "cls8", "cls16", "cls32", "cls64"]
    rows = [[CLS_LABELS.get(r["row"], r["row"]), *(f"{r['metrics'][c]:.3f}" for c in cols)]
            for case in ("cls", "cls-drelu") for r in latest(records, "act_sparsity", case)]
    return md_table(["model", *(c.upper() for c in cols)], rows)


def table_breakeven(records) -> str:
    got = {(r["params"]["dtype"], r["params"]["shape"], r["params"]["tokens"], r["params"]["active"]): r["metrics"]
           for r in latest(records, "act_sparsity", "breakeven")}

    def cell(dtype, t, a, method):
        pair = [got.get((dtype, shape, t, a), {}).get(method) for shape in ("5632x2048", "2048x5632")]
        return "-" if None in pair else f"{pair[0]:.2f} / {pair[1]:.2f}"

    rows = []
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        for t in (1, 8):
            for method, label in (("bag", "bag, ours"), ("bag_torch", "bag, torch"), ("gather", "gather")):
                cells = [cell(dtype, t, a, method) for a in (0.1, 0.3, 0.5, 0.7, 0.9)]
                if (t > 1 or method != "gather") and any(c != "-" for c in cells):
                    rows.append([f"{short}, {t}", label, *cells])
    return md_table(["dtype, tokens", "method", "10%", "30%", "50%", "70%", "90%"], rows)


def _speed_table(case):
    def table(records) -> str:
        recs = latest(records, "act_sparsity", case)
        models = list(dict.fromkeys(r["params"]["model"] for r in recs))
        rows = []
        for d, chunk in dict.fromkeys((r["params"]["dtype"], r["params"]["chunk"]) for r in recs):
            got = {r["params"]["model"]: r for r in recs if (r["params"]["dtype"], r["params"]["chunk"]) == (d, chunk)}
            cells = [f"{got['dense']['metrics']['tok_s']:.2f}"]
            cells += [f"{got[k]['ratio_to']['metrics']['tok_s']:.2f}x" if k in got else "-" for k in models[1:]]
            rows.append([d, chunk, *cells])
        return md_table(["dtype", "tokens/call", "dense tok/s", *models[1:]], rows)
    return table


TABLES = {"act-kl": table_kl, "act-drelu": table_drelu, "act-cls": table_cls, "act-breakeven": table_breakeven,
          "act-speed": _speed_table("speed")}
