"""Quality and size of weight-only quantization (issue 13), alone and on top of 2:4, beside
llm-compressor in the same run.

- ``quant/<recipe>``: squeeze only: KL(dense || quantized) on stories260k's held-out ids, export bytes
  (``--format compressed``), whether the 2:4 pattern survived.
- ``quant/vs-llmc-<recipe>``: one recipe by both tools, one after the other in the same case: squeeze
  with its defaults and with llm-compressor's settings, llm-compressor 0.14 with its defaults (through
  ``../shared/anchors/llmcompressor_run.py``) and with its mse observer (``bench/llmc_quant.py``).
  llm-compressor runs in its own venv (it needs transformers <= 5.17): ``BENCH_LLMC_PYTHON``, else
  ``../.venv-llmc/bin/python`` beside this checkout; without one its rows say "not run". Its saved
  compressed-tensors checkpoint is scored here, by squeeze's KL / cosine code on the same ids
  (loading it needs ``compressed-tensors`` in squeeze's venv), and its 2:4 pattern is counted.
- ``quant/options``: act-order x observer on held-out calibration rows (rows 128-255 of the
  calibration file, never calibrated on) and on the eval file: how the defaults were chosen.
- ``quant/minilm-*``: all-MiniLM-L6-v2, cosine of mean-pooled embeddings to dense (built-in
  calibration 64 x 128, the 240 ``builtin-eval`` sentences), squeeze beside llm-compressor.

Per-channel symmetric weights are the common granularity: llm-compressor's group-128 / group-32
presets refuse stories260k's 64 / 172 dimensions (../shared/anchors/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.cases.prune import CALIB, EVAL, STORIES
from bench.harness import ROOT, SHARED, Case, Skip, latest, md_table

SPARSE = {"pass": "sparsegpt", "pattern": "2:4"}
ANCHOR = SHARED / "anchors" / "llmcompressor_run.py"
EXTRA = ROOT / "bench" / "llmc_quant.py"
# issue 13's llm-compressor 0.14.0.1 numbers (per-channel, 128 x 400): shown as the issue's, never as measured
ISSUE = {"int8 obs": 0.00031, "int4 obs": 0.0706, "int8 rtn": 0.00154, "int4 rtn": 0.504}


def _q(bits, solver="obs", group=None, **kw):
    return {"pass": "quantize", "bits": bits, "solver": solver, **({"group_size": group} if group else {}), **kw}


def llmc_python() -> tuple[str | None, str]:
    """llm-compressor's interpreter ($BENCH_LLMC_PYTHON, else ../.venv-llmc beside the checkout), or
    None and why not."""
    env = os.environ.get("BENCH_LLMC_PYTHON")
    path = Path(env) if env else ROOT.parent / ".venv-llmc" / "bin" / "python"
    if path.is_file():
        return str(path), ""
    where = f"BENCH_LLMC_PYTHON={env} does not exist" if env else f"no {path} and no BENCH_LLMC_PYTHON"
    return None, f"not run: {where} (llm-compressor's venv: ../shared/anchors/README.md)"


# ---------------------------------------------------------------------------------------------
# squeeze alone

RECIPES = {  # row -> recipe, in table order ("per-channel": one scale per output row)
    "int8 rtn": [_q("int8", "rtn")],
    "int8 obs": [_q("int8")],
    "int4 rtn": [_q("int4", "rtn", "channel")],
    "int4 obs": [_q("int4", "obs", "channel")],
    "int4 g32 rtn": [_q("int4", "rtn", 32)],
    "int4 g32 obs": [_q("int4", "obs", 32)],
    "fp8 rtn": [_q("fp8", "rtn")],
    "fp8 obs": [_q("fp8")],
    "sparsegpt 2:4": [SPARSE],
    "sparsegpt 2:4 + int8 obs": [SPARSE, _q("int8")],
    "sparsegpt 2:4 + int4 obs": [SPARSE, _q("int4", "obs", "channel")],
    "sparsegpt 2:4 + int4 g32 obs": [SPARSE, _q("int4", "obs", 32)],
}


def broken_24(model) -> float | None:
    """Fraction of the groups of 4 consecutive input weights with more than 2 non-zeros, over every
    linear inside the blocks (not the LM head or BERT's pooler); None if no linear has 4 columns."""
    import torch

    bad = total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "lm_head" in name or "pooler" in name:
            continue
        w = mod.weight.detach()
        k = w.shape[1] - w.shape[1] % 4
        if k == 0:
            continue
        nz = (w[:, :k] != 0).view(w.shape[0], k // 4, 4).sum(-1)
        bad += int((nz > 2).sum())
        total += nz.numel()
    return bad / total if total else None


def _compress(recipe, out: Path, nsamples: int, seqlen: int, model: str = "stories260k", calib: Path = CALIB):
    import squeeze

    if model == "minilm":  # float32 like llm-compressor's output (the embedded default exports in bf16)
        return squeeze.compress(None, out, recipe=recipe, keep_in_memory=False, format="compressed",
                                dtype="float32")
    return squeeze.compress(STORIES, out, recipe=recipe, calib=str(calib), nsamples=nsamples, seqlen=seqlen,
                            keep_in_memory=False, format="compressed")


def _quality(model_or_path, model: str = "stories260k", data: str | None = None) -> dict:
    import squeeze

    if model == "minilm":
        from squeeze.defaults import default_model_path

        ev = squeeze.evaluate(model_or_path, "builtin-eval", reference=str(default_model_path()))
        # 1 - cosine is the distance to dense that ratios are taken of
        return {"cosine_mean": ev["cosine_mean"], "cosine_min": ev["cosine_min"],
                "one_minus_cos": 1.0 - ev["cosine_mean"]}
    return {"kl": squeeze.evaluate(model_or_path, data or str(EVAL), reference=STORIES)["kl"]}


def compress_eval(row: str, recipe: list, nsamples: int, seqlen: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        r = _compress(recipe, out, nsamples, seqlen)
        q = _quality(out)
    lins = r.report["linears"].values()
    pattern = [rec["pattern_ok"] for rec in lins if "pattern_ok" in rec]
    return [{"row": row, "metrics": {**q, "export_bytes": r.report["size_bytes"]["export"],
                                     "ratio": r.report["size_bytes"]["ratio"], "seconds": r.report["seconds"],
                                     "pattern_ok": all(pattern) if pattern else None}}]


# ---------------------------------------------------------------------------------------------
# squeeze beside llm-compressor

LLMC_SETTINGS = {"obs": {"actorder": "static", "observer": "minmax"}, "rtn": {"observer": "minmax"}}
BEFORE = {"actorder": "none", "observer": "minmax"}  # squeeze's OBS before act-order and the mse observer
VERSUS = {  # row -> (squeeze recipe, llm-compressor recipe), per-channel symmetric weights
    "int8 rtn": ([_q("int8", "rtn")], "rtn:W8A16:ch"),
    "int8 obs": ([_q("int8")], "gptq:W8A16:ch"),
    "int4 rtn": ([_q("int4", "rtn", "channel")], "rtn:W4A16:ch"),
    "int4 obs": ([_q("int4", "obs", "channel")], "gptq:W4A16:ch"),
    "sparsegpt 2:4": ([SPARSE], "sgpt24"),
    "sparsegpt 2:4 + int8 obs": ([SPARSE, _q("int8")], "sgpt24+gptq:W8A16:ch"),
    "sparsegpt 2:4 + int4 obs": ([SPARSE, _q("int4", "obs", "channel")], "sgpt24+gptq:W4A16:ch"),
}
MINILM = {
    "sparsegpt 2:4": ([SPARSE], "sgpt24"),
    "int8 obs": ([_q("int8")], "gptq:W8A16:ch"),
    "int4 obs": ([_q("int4", "obs", "channel")], "gptq:W4A16:ch"),
    "sparsegpt 2:4 + int8 obs": ([SPARSE, _q("int8")], "sgpt24+gptq:W8A16:ch"),
}


def _with(recipe: list, by_solver: dict) -> list:
    """The recipe with ``by_solver[its solver]`` added to its quantize step's settings."""
    return [{**step, **by_solver.get(step["solver"], {})} if step["pass"] == "quantize" else step
            for step in recipe]


def _squeeze_row(label, recipe, out, nsamples, seqlen, model) -> dict:
    import squeeze

    r = _compress(recipe, out, nsamples, seqlen, model)
    q = _quality(out, model)
    q["broken_24"] = broken_24(squeeze.load(out)) if any(s["pass"] == "sparsegpt" for s in recipe) else None
    record = json.loads((out / "squeeze.json").read_text())  # the settings that ran, defaults resolved
    quant = next((s for s in record["passes"] if s.get("pass") == "quantize"), None)
    return {"row": label, "params": {"tool": "squeeze", "recipe": recipe, "settings": quant},
            "metrics": {**q, "seconds": r.report["seconds"], "ratio": r.report["size_bytes"]["ratio"]}}


def _load_compressed_tensors(path: Path, encoder: bool):
    """llm-compressor's saved model, dequantized to float32 (a pruning-only save is a plain checkpoint)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if encoder else AutoModelForCausalLM
    if "quantization_config" not in json.loads((path / "config.json").read_text()):
        return cls.from_pretrained(path, dtype=torch.float32).eval()
    try:
        from transformers import CompressedTensorsConfig
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise Skip("scoring llm-compressor's output needs compressed-tensors in squeeze's venv: "
                   ".venv/bin/pip install compressed-tensors==0.20.0") from None
    return cls.from_pretrained(path, dtype=torch.float32,
                               quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()


def _llmc_row(label, python, recipe, out, nsamples, seqlen, model, observer=None, file_order=False) -> dict:
    encoder = model == "minilm"
    if observer is None and not encoder and not file_order:  # its defaults: the shared anchor script as it is
        cmd = [python, str(ANCHOR), recipe, str(out), str(nsamples), str(seqlen)]
    else:
        if encoder:
            from squeeze.defaults import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, default_model_path

            mdir, calib = str(default_model_path()), out.parent / "minilm-calib.jsonl"
            nsamples, seqlen = DEFAULT_NSAMPLES, DEFAULT_SEQLEN
            _minilm_calibration(calib)
        else:
            mdir, calib = str(STORIES), str(CALIB)
        cmd = [python, str(EXTRA), mdir, str(calib), recipe, str(out), "--nsamples", str(nsamples),
               "--seqlen", str(seqlen)] + (["--observer", observer] if observer else []) + \
              (["--encoder"] if encoder else []) + (["--file-order"] if file_order else [])
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - t
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LLMC ")), None)
    settings = {"recipe": recipe, "observer": observer or "default", "file_order": file_order}
    if p.returncode != 0 or line is None:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])[-400:]
        return {"row": label, "params": {"tool": "llm-compressor", "settings": settings},
                "metrics": {"error": f"exit {p.returncode}: {tail}"}}
    info = json.loads(line[len("LLMC "):])
    m = _load_compressed_tensors(out, encoder)
    q = _quality(m, model)
    q["broken_24"] = broken_24(m) if "sgpt24" in recipe else None
    return {"row": label, "params": {"tool": "llm-compressor", "settings": settings, **_llmc_versions(python)},
            "metrics": {**q, "seconds": info["oneshot_s"], "process_wall_s": round(wall, 2)}}


def _llmc_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')}))")
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return {"llmc_versions": json.loads(p.stdout)} if p.returncode == 0 else {}


def _minilm_calibration(path: Path) -> None:
    """The token ids squeeze calibrates MiniLM on (built-in corpus, 64 x 128), for llm-compressor."""
    if path.is_file():
        return
    from transformers import AutoConfig

    from squeeze.calib.build import build_calibration
    from squeeze.checkpoint import Checkpoint
    from squeeze.defaults import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, default_model_path

    p = default_model_path()
    cal = build_calibration(Checkpoint(p), AutoConfig.from_pretrained(p), "builtin", DEFAULT_NSAMPLES,
                            DEFAULT_SEQLEN)
    path.write_text("".join(json.dumps({"input_ids": s.tolist()}) + "\n" for s in cal.samples))


def versus(row: str, recipe: list, llmc_recipe: str, nsamples: int, seqlen: int,
           model: str = "stories260k") -> list[dict]:
    """One recipe by squeeze (defaults; llm-compressor's settings; for OBS also as before act-order
    and mse) and by llm-compressor (defaults; mse observer), in this order, in this process."""
    if model == "stories260k" and not STORIES.is_dir():
        raise Skip(f"{STORIES} not present")
    quantized = any(s["pass"] == "quantize" for s in recipe)
    obs = any(s.get("solver") == "obs" for s in recipe)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants = [("squeeze", recipe)]
        if quantized:
            variants.append(("squeeze, llm-compressor's settings", _with(recipe, LLMC_SETTINGS)))
        if obs:
            variants.append(("squeeze, left to right + minmax (before)", _with(recipe, {"obs": BEFORE})))
        for i, (label, rec) in enumerate(variants):
            rows.append(_squeeze_row(label, rec, tmp / f"s{i}", nsamples, seqlen, model))
        python, why = llmc_python()
        if python is None:
            rows.append({"row": "llm-compressor", "params": {"tool": "llm-compressor"}, "metrics": {"error": why}})
            return rows
        rows.append(_llmc_row("llm-compressor", python, llmc_recipe, tmp / "l0", nsamples, seqlen, model))
        if quantized:
            rows.append(_llmc_row("llm-compressor, mse observer", python, llmc_recipe, tmp / "l1", nsamples,
                                  seqlen, model, observer="mse"))
            rows.append(_llmc_row("llm-compressor, mse observer, rows in file order", python, llmc_recipe,
                                  tmp / "l2", nsamples, seqlen, model, observer="mse", file_order=True))
        _same_weights(rows, tmp, model)
    base = next(r for r in rows if r["row"] == "llm-compressor")
    if "error" not in base["metrics"]:  # squeeze's rows as ratios to llm-compressor's defaults
        for r in rows:
            if r["params"]["tool"] == "squeeze":
                r["ratio_to"] = "llm-compressor"
    return rows


def _same_weights(rows: list[dict], tmp: Path, model: str) -> None:
    """For each llm-compressor row, the fraction of block-linear weight entries exactly equal to the
    squeeze row run with the same settings (act-order, observer), if there is one."""
    import squeeze

    def settings(r):
        q = r["params"].get("settings") or {}
        if r["params"]["tool"] == "squeeze":
            return (q.get("observer"), q.get("actorder") in (None, "static")) if q else ("none", True)
        if "gptq" not in q.get("recipe", "") and "rtn" not in q.get("recipe", ""):
            return "none", True  # pruning only
        obs = q.get("observer", "default")
        return ("minmax" if obs == "default" else obs), True

    squeeze_dirs = {i: tmp / f"s{i}" for i in range(len(rows)) if rows[i]["params"]["tool"] == "squeeze"}
    llmc_dirs = [tmp / f"l{j}" for j in range(3)]
    llmc_rows = [r for r in rows if r["params"]["tool"] == "llm-compressor"]
    for r, d in zip(llmc_rows, llmc_dirs):
        if "error" in r["metrics"] or not d.is_dir():
            continue
        match = next((i for i in squeeze_dirs if settings(rows[i]) == settings(r)), None)
        if match is None:
            continue
        ours = squeeze.load(squeeze_dirs[match]).state_dict()
        theirs = _load_compressed_tensors(d, model == "minilm").state_dict()
        same = total = 0
        for k, w in ours.items():
            if k.endswith(".weight") and w.dim() == 2 and k in theirs and ("layers." in k or "layer." in k):
                same += int((w.float() == theirs[k].float()).sum())
                total += w.numel()
        if total:
            r["metrics"]["same_weights"] = same / total
            r["params"]["same_weights_as"] = rows[match]["row"]


def llmc_spread(recipe: str, observer: str | None, repeats: int, nsamples: int, seqlen: int) -> list[dict]:
    """llm-compressor's run-to-run spread: the same oneshot ``repeats`` times with its shuffled
    calibration order, then twice in file order (the order squeeze uses)."""
    python, why = llmc_python()
    if python is None:
        raise Skip(why)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 2):
            fo = i >= repeats
            label = f"{'file order' if fo else 'shuffled'} run {i - repeats + 1 if fo else i + 1}"
            rows.append(_llmc_row(label, python, recipe, Path(tmp) / f"l{i}", nsamples, seqlen, "stories260k",
                                  observer=observer, file_order=fo))
    return rows


# ---------------------------------------------------------------------------------------------
# how the defaults were chosen

OPTION_RECIPES = {
    "int4 per-channel obs": [_q("int4", "obs", "channel")],
    "int4 g32 obs": [_q("int4", "obs", 32)],
    "int8 obs": [_q("int8")],
    "fp8 obs": [_q("fp8")],
    "int4 asym g32 obs": [_q("int4", "obs", 32, symmetric=False)],
    "sparsegpt 2:4 + int8 obs": [SPARSE, _q("int8")],
    "sparsegpt 2:4 + int4 obs": [SPARSE, _q("int4", "obs", "channel")],
    "sparsegpt 2:4 + int4 g32 obs": [SPARSE, _q("int4", "obs", 32)],
    "int4 per-channel rtn": [_q("int4", "rtn", "channel")],
    "int4 g32 rtn": [_q("int4", "rtn", 32)],
    "int8 rtn": [_q("int8", "rtn")],
    "fp8 rtn": [_q("fp8", "rtn")],
}
OPTIONS = {"obs": [("none", "minmax"), ("static", "minmax"), ("none", "mse"), ("static", "mse")],
           "rtn": [(None, "minmax"), (None, "mse")]}


def options(nsamples: int, seqlen: int, half: str = "first") -> list[dict]:
    """Every recipe of OPTION_RECIPES under every (actorder, observer): KL on the calibration file's
    rows that were not calibrated on (``dev``) and on the eval file. ``half="first"``: calibrate on
    the first ``nsamples`` rows (as every other case), hold out the rest; ``"second"``: the other way
    round, a second draw of the same comparison."""
    if not STORIES.is_dir():
        raise Skip(f"{STORIES} not present")
    rows = []
    lines = CALIB.read_text().splitlines()
    first, rest = lines[:nsamples], lines[nsamples:]
    calib_rows, dev_rows = (first, rest) if half == "first" else (rest, first)
    with tempfile.TemporaryDirectory() as tmp:
        dev, calib = Path(tmp) / "dev.jsonl", Path(tmp) / "calib.jsonl"
        dev.write_text("\n".join(dev_rows) + "\n")
        calib.write_text("\n".join(calib_rows) + "\n")
        for name, recipe in OPTION_RECIPES.items():
            solver = recipe[-1]["solver"]
            for actorder, observer in OPTIONS[solver]:
                settings = {"observer": observer, **({"actorder": actorder} if actorder else {})}
                out = Path(tmp) / f"out-{len(rows)}"
                _compress(_with(recipe, {solver: settings}), out, nsamples, seqlen, calib=calib)
                rows.append({"row": f"{name} | {actorder or '-'} | {observer}",
                             "params": {"recipe": name, **settings},
                             "metrics": {"dev_kl": _quality(out, data=str(dev))["kl"], "kl": _quality(out)["kl"],
                                         "dev_rows": len(dev_rows)}})
                shutil.rmtree(out)
    return rows


def _slug(row: str) -> str:
    return row.replace(" + ", "+").replace(" ", "-").replace(":", "")


QUICK = {"int8 obs", "sparsegpt 2:4 + int4 g32 obs"}
CASES = [Case("quant", _slug(row), "bench.cases.quant:compress_eval",
              {"row": row, "recipe": recipe, "nsamples": 128, "seqlen": 400}, quick={} if row in QUICK else None)
         for row, recipe in RECIPES.items()]
CASES += [Case("quant", "vs-llmc-" + _slug(row), "bench.cases.quant:versus",
               {"row": row, "recipe": rec, "llmc_recipe": lr, "nsamples": 128, "seqlen": 400})
          for row, (rec, lr) in VERSUS.items()]
CASES += [Case("quant", "minilm-" + _slug(row), "bench.cases.quant:versus",
               {"row": row, "recipe": rec, "llmc_recipe": lr, "nsamples": 64, "seqlen": 128, "model": "minilm"})
          for row, (rec, lr) in MINILM.items()]
CASES += [Case("quant", "options", "bench.cases.quant:options", {"nsamples": 128, "seqlen": 400}),
          Case("quant", "options-second-half", "bench.cases.quant:options",
               {"nsamples": 128, "seqlen": 400, "half": "second"})]
CASES += [Case("quant", f"llmc-spread-{name}", "bench.cases.quant:llmc_spread",
               {"recipe": "gptq:W4A16:ch", "observer": obs, "repeats": 5, "nsamples": 128, "seqlen": 400})
          for name, obs in (("minmax", None), ("mse", "mse"))]


# ---------------------------------------------------------------------------------------------
# tables


def table(records) -> str:
    got = {r["row"]: r["metrics"] for c in CASES if c.fn.endswith(":compress_eval")
           for r in latest(records, "quant", c.name)}
    rows = [[row, f"{m['kl']:.5f}", f"{m['ratio']:.3f}", {True: "exact", False: "BROKEN", None: ""}[m["pattern_ok"]],
             f"{m['seconds']:.0f}"] for row in RECIPES if (m := got.get(row))]
    return md_table(["stories260k (squeeze defaults)", "KL", "bytes vs source", "2:4 pattern", "compress s"], rows)


ROLE = {"squeeze": "defaults", "squeeze, llm-compressor's settings": "llm-compressor's settings",
        "squeeze, left to right + minmax (before)": "before act-order and mse"}


def _tool_and_settings(r) -> tuple[str, str]:
    p = r["params"]
    if p.get("tool") == "llm-compressor":
        version = p.get("llmc_versions", {}).get("llmcompressor", "")
        st = p.get("settings") or {}
        obs = st.get("observer", "default")
        recipe = st.get("recipe", "")
        if "gptq" in recipe or "rtn" in recipe:
            text = ("actorder static, " if "gptq" in recipe else "") + ("minmax" if obs == "default"
                                                                        else f"{obs} observer")
            text = "defaults: " + text if obs == "default" else text
        else:
            text = "defaults"
        return f"llm-compressor {version}".strip(), text + ("; rows in file order" if st.get("file_order")
                                                           else "; rows shuffled (its default)")
    q = p.get("settings")
    role = ROLE.get(r["row"], r["row"])
    if not q:
        return "squeeze", role
    detail = ", ".join(x for x in (f"actorder {q['actorder']}" if q.get("actorder") else None,
                                   q.get("observer")) if x)
    return "squeeze", f"{role}: {q.get('solver')}, {detail}"


def _versus_table(records, cases, metric, ratio_of, head) -> str:
    out, issue = [], []
    for c in cases:
        first = True
        for r in latest(records, "quant", c.name):
            m = r["metrics"]
            tool, settings = _tool_and_settings(r)
            if "error" in m:
                cells = [m["error"], "", "", "", ""]
            else:
                ratio = (r["ratio_to"] or {}).get("metrics", {}).get(ratio_of)
                b, same = m.get("broken_24"), m.get("same_weights")
                cells = [f"{m[metric]:.4g}" if metric == "kl" else f"{m[metric]:.5f}", f"{ratio:.3f}x" if ratio else "",
                         "" if b is None else f"{100 * b:.1f}%", "" if same is None else f"{100 * same:.2f}%",
                         f"{m['seconds']:.1f}"]
            out.append([c.params["row"] if first else "", tool, settings, *cells])
            first = False
        if c.params["row"] in ISSUE and metric == "kl":
            issue.append(f"{c.params['row']} {ISSUE[c.params['row']]}")
    what = "KL" if metric == "kl" else "cosine mean"
    vs = "squeeze / llm-compressor defaults" + ("" if ratio_of == metric else " (of 1 - cosine)")
    table = md_table([head, "tool", "settings", what, vs, "2:4 groups broken",
                      "weights identical to squeeze's, same settings", "compress s"], out)
    if issue:
        table += ("\n\nIssue 13's llm-compressor 0.14.0.1 numbers (measured then, not in this run): "
                  + ", ".join(issue))
    return table


def table_versus(records) -> str:
    cases = [c for c in CASES if c.name.startswith("vs-llmc-")]
    return _versus_table(records, cases, "kl", "kl", "stories260k, per-channel")


def table_minilm(records) -> str:
    cases = [c for c in CASES if c.name.startswith("minilm-")]
    return _versus_table(records, cases, "cosine_mean", "one_minus_cos", "MiniLM, per-channel")


def table_spread(records) -> str:
    out = []
    for c in CASES:
        if c.name.startswith("llmc-spread-"):
            rs = [r for r in latest(records, "quant", c.name) if "kl" in r["metrics"]]
            for order in ("shuffled", "file order"):
                kls = sorted(r["metrics"]["kl"] for r in rs if r["row"].startswith(order))
                if kls:
                    out.append([c.params["recipe"], c.params["observer"] or "minmax (default)", order, len(kls),
                                f"{kls[0]:.5f}", f"{kls[len(kls) // 2]:.5f}", f"{kls[-1]:.5f}"])
    return md_table(["llm-compressor", "observer", "calibration order", "runs", "KL min", "KL median", "KL max"],
                    out)


def table_options(records) -> str:
    a = {r["row"]: r["metrics"] for r in latest(records, "quant", "options")}
    b = {r["row"]: r["metrics"] for r in latest(records, "quant", "options-second-half")}
    out, last = [], None
    for row, m in a.items():
        name, actorder, observer = row.split(" | ")
        mb = b.get(row, {})
        cells = [f"{m['dev_kl']:.4g}", f"{m['kl']:.4g}"] + \
                ([f"{mb['dev_kl']:.4g}", f"{mb['kl']:.4g}"] if mb else ["", ""])
        out.append([name if name != last else "", actorder, observer, *cells])
        last = name
    return md_table(["stories260k", "actorder", "observer", "A: KL held-out rows", "A: KL eval",
                     "B: KL held-out rows", "B: KL eval"], out)


TABLES = {"quant-stories260k": table, "quant-vs-llmc": table_versus, "quant-minilm": table_minilm,
          "quant-options": table_options, "quant-llmc-spread": table_spread}
