"""Quality of the pruning passes (issue 3): KL(dense || pruned) on stories260k for magnitude / wanda /
sparsegpt / dass alone, + DSnoT, + OWL, at 2:4 / 50% / 70%; MiniLM 2:4 embedding cosines; time and
peak RSS on the 20M random Llama. One case per (model, recipe, target): each compression runs in
its own process, so its peak RSS is its own."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.cases.prune import CALIB, EVAL, STORIES, make_llama20m
from bench.harness import Case, latest, md_table

# llm-compressor 0.14 on the same rows (../shared/anchors/README.md): the anchors our KL is held to
LLMC = {"sparsegpt": {"2:4": 0.450, "50%": 0.230, "70%": 0.731}, "wanda": {"2:4": 1.546, "50%": 0.839, "70%": 1.723}}
TARGETS = {"2:4": {"pattern": "2:4"}, "50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}}
DSNOT = {"pass": "dsnot"}
BASES = ("magnitude", "wanda", "sparsegpt", "dass", "dass(attn=sparsegpt)")
OWL_BASES = ("wanda", "sparsegpt", "dass(attn=sparsegpt)")


def recipes(target: str) -> dict[str, list]:
    """Method name -> recipe, in table order."""
    tgt = TARGETS[target]
    base = {n: {"pass": n.split("(")[0], **({"attn_method": "sparsegpt"} if "attn=" in n else {}), **tgt}
            for n in BASES}
    out = {}
    for n in BASES:
        out[n] = [base[n]]
        out[n + " + dsnot"] = [base[n], DSNOT]
    if "sparsity" in tgt:  # OWL redistributes an unstructured sparsity across layers
        for n in OWL_BASES:
            owl = {**base[n], "sparsity_profile": "owl"}
            out[n + " + owl"] = [owl]
            out[n + " + owl + dsnot"] = [owl, DSNOT]
    return out


def compress_eval(model: str, method: str, target: str, recipe: list, nsamples: int, seqlen: int) -> list[dict]:
    import squeeze

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if model == "minilm":
            from squeeze.defaults import default_model_path

            r = squeeze.compress(None, out, recipe=recipe, keep_in_memory=False)
            ev = squeeze.evaluate(out, "builtin-eval", reference=default_model_path())
            quality = {"cosine_mean": ev["cosine_mean"], "cosine_min": ev["cosine_min"]}
        elif model == "llama20m":  # time / memory only: a random model has no quality to measure
            make_llama20m(Path(tmp) / "llama20m", Path(tmp) / "calib.jsonl")
            r = squeeze.compress(Path(tmp) / "llama20m", out, recipe=recipe, calib=str(Path(tmp) / "calib.jsonl"),
                                 nsamples=nsamples, seqlen=seqlen, keep_in_memory=False)
            quality = {}
        else:
            r = squeeze.compress(STORIES, out, recipe=recipe, calib=str(CALIB), nsamples=nsamples, seqlen=seqlen,
                                 keep_in_memory=False)
            quality = {"kl": squeeze.evaluate(out, str(EVAL), reference=STORIES)["kl"]}
    return [{"row": method, "metrics": {"seconds": r.report["seconds"], "peak_rss_mb": r.report["peak_rss_mb"],
                                        "sparsity": r.report["summary"].get("sparsity"),
                                        "pass_reports": r.report.get("pass_reports"), **quality}}]


def _slug(method: str) -> str:
    return method.replace("(attn=sparsegpt)", "-attn-sgpt").replace(" + ", "+")


def _case(model, method, target, recipe, nsamples, seqlen, quick=None):
    name = f"{model}-{_slug(method)}-{target.replace(':', '').rstrip('%')}"
    return Case("quality", name, "bench.cases.quality:compress_eval",
                {"model": model, "method": method, "target": target, "recipe": recipe, "nsamples": nsamples,
                 "seqlen": seqlen}, quick=quick)


QUICK = {("wanda", "2:4"), ("sparsegpt", "2:4")}  # deterministic KL, a few seconds each
CASES = [_case("stories260k", m, t, r, 128, 400, {} if (m, t) in QUICK else None)
         for t in TARGETS for m, r in recipes(t).items()]
CASES += [_case("minilm", m, "2:4", r, 64, 128) for m, r in recipes("2:4").items()]
CASES += [_case("llama20m", m, "2:4", recipes("2:4")[m], 256, 512)
          for m in ("wanda", "sparsegpt", "dass", "sparsegpt + dsnot")]


def _rows(records, model):
    out = {}
    for c in CASES:
        if c.params["model"] == model:
            for r in latest(records, "quality", c.name):
                out[(r["row"], r["params"]["target"])] = r["metrics"]
    return out


def table_stories(records) -> str:
    get = _rows(records, "stories260k")
    targets = [t for t in TARGETS if any(k[1] == t for k in get)]
    names = list(dict.fromkeys(n for t in targets for n in recipes(t)))
    rows = []
    for n in names:
        if not any((n, t) in get for t in targets):
            continue
        kl = [f"{get[(n, t)]['kl']:.3f}" if (n, t) in get else "" for t in targets]
        cost = [f"{get[(n, t)]['seconds']:.0f} / {get[(n, t)]['peak_rss_mb']:.0f}" if (n, t) in get else ""
                for t in targets]
        rows.append([n, *kl, *cost])
    for ref, vals in LLMC.items():
        rows.append([f"llm-compressor {ref} (anchor)", *(f"{vals[t]:.3f}" for t in targets), *[""] * len(targets)])
    ratio = [f"{ref} {t}: {get[(ref, t)]['kl'] / vals[t]:.3f}x" for ref, vals in LLMC.items() for t in targets
             if (ref, t) in get]
    return (md_table(["method", *(f"KL {t}" for t in targets), *(f"s / MB {t}" for t in targets)], rows)
            + "\n\nours / llm-compressor: " + ", ".join(ratio))


def table_llama20m(records) -> str:
    get = _rows(records, "llama20m")
    return md_table(["20M random Llama, 2:4", "compress s", "peak RSS MB"],
                    [[n, f"{m['seconds']:.1f}", f"{m['peak_rss_mb']:.0f}"] for (n, _), m in get.items()])


def table_minilm(records) -> str:
    get = _rows(records, "minilm")
    return md_table(["MiniLM 2:4", "cosine mean", "cosine min", "s / MB"],
                    [[n, f"{m['cosine_mean']:.4f}", f"{m['cosine_min']:.4f}",
                      f"{m['seconds']:.0f} / {m['peak_rss_mb']:.0f}"] for (n, _), m in get.items()])


TABLES = {"quality-stories260k": table_stories, "quality-llama20m": table_llama20m, "quality-minilm": table_minilm}
