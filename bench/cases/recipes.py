"""The shipped recipes (``recipes/*.yaml``), each run as a user runs it: one ``squeeze compress
--recipe NAME`` command line in a subprocess, then scored on held-out data (stories260k: KL(dense ||
export) in nats/token on stories260k-eval; MiniLM: mean / min embedding cosine to the dense model on
the built-in held-out sentences). The figure a recipe file states under ``reaches`` is the latest
full run of its case (tests/test_recipes.py keeps them in step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cases.prune import EVAL, STORIES
from bench.harness import ROOT, Case, Skip, latest, md_table

MODELS = {"stories260k": "decoder", "minilm": "encoder"}
STORIES_ARGS = "../shared/models/stories260k"
CALIB_ARGS = "--calib ../shared/data/stories260k-calib.jsonl"


def recipe_commands(name: str, model: str) -> list[str]:
    """The documented command line of a shipped recipe (paths as a user beside ../shared types them)."""
    if model == "stories260k":
        return [f"squeeze compress {STORIES_ARGS} --recipe {name} --out OUT {CALIB_ARGS}"]
    return [f"squeeze compress --recipe {name} --out OUT"]


# docs/guides.md: each job's commands, scored the same way (OUT1 is the first command's export)
GUIDES = {
    "guide-int8-stories260k": ("stories260k", [f"squeeze compress {STORIES_ARGS} --out OUT --quantize int8 {CALIB_ARGS}"]),
    "guide-int4-stories260k": ("stories260k", [f"squeeze compress {STORIES_ARGS} --out OUT --quantize int4 {CALIB_ARGS}"]),
    "guide-best-2:4+int8-stories260k": ("stories260k", [
        f"squeeze compress {STORIES_ARGS} --recipe best-2:4 --out OUT1 {CALIB_ARGS}",
        f"squeeze compress OUT1 --out OUT --quantize int8 {CALIB_ARGS}"]),
    "guide-int8-minilm": ("minilm", ["squeeze compress --out OUT --quantize int8"]),
    "guide-quick-2:4+int8-minilm": ("minilm", ["squeeze compress --out OUT --method sparsegpt --pattern 2:4 "
                                               "--quantize int8"]),
}


def run(commands: list[str], model: str, recipe: str | None = None) -> list[dict]:
    """Run ``commands`` (``squeeze ...`` lines) one after another in subprocesses, score the last
    one's export on held-out data; one row."""
    import shlex

    import squeeze
    from squeeze.defaults import default_model_path

    if model == "stories260k" and not STORIES.is_dir():
        raise Skip(f"{STORIES} is missing")
    shared = str(STORIES.parents[1])
    seconds, report = 0.0, {}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {"OUT": str(Path(tmp) / "out"), "OUT1": str(Path(tmp) / "out1")}
        for line in commands:
            argv = [outs.get(a, a.replace("../shared", shared)) for a in shlex.split(line)]
            assert argv[0] == "squeeze"
            extra = ["--no-verify", "--json", str(Path(tmp) / "report.json")] if argv[1] == "compress" else []
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "squeeze.cli.main", *argv[1:], *extra], cwd=ROOT,
                               env=os.environ, check=False, capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"{line} exited with {p.returncode}:\n{p.stderr[-3000:]}")
            seconds += time.perf_counter() - t0
            report = json.loads((Path(tmp) / "report.json").read_text())
        out = outs["OUT"]
        if model == "stories260k":
            ev = squeeze.evaluate(out, str(EVAL), reference=str(STORIES))
            quality = {"kl": ev["kl"], "ppl": ev["ppl"]}
        else:
            ev = squeeze.evaluate(out, "builtin-eval", reference=default_model_path())
            quality = {"cosine_mean": ev["cosine_mean"], "cosine_min": ev["cosine_min"]}
    size = report["size_bytes"]
    return [{"row": f"{recipe or 'commands'} ({model})",
             "params": {"recipe": recipe, "model": model, "command": " && ".join(commands)},
             "metrics": {**quality, "seconds": round(seconds, 1), "size_ratio": size["ratio"],
                         "export_mb": round(size["export"] / 1e6, 3)}}]


def case_name(name: str, model: str) -> str:
    return f"{name}-{model}"


def _cases() -> list[Case]:
    from squeeze.recipe import shipped_recipes

    cases = []
    for rec in shipped_recipes():
        for model, kind in MODELS.items():
            if rec.kind in (kind, None):
                quick = {} if (rec.name, model) == ("quick-2:4", "minilm") else None
                long = (rec.recover or {}).get("steps", 0) > 500  # the long recoveries run on both cores
                cases.append(Case("recipes", case_name(rec.name, model), "bench.cases.recipes:run",
                                  {"commands": recipe_commands(rec.name, model), "model": model,
                                   "recipe": rec.name}, quick=quick, threads=2 if long else 1))
    cases += [Case("recipes", name, "bench.cases.recipes:run", {"commands": cmds, "model": model})
              for name, (model, cmds) in GUIDES.items()]
    return cases


CASES = _cases()


def figure(metrics: dict) -> str:
    if "kl" in metrics:
        return f"KL {metrics['kl']:.4g}"
    return f"cosine {metrics['cosine_mean']:.4f} mean / {metrics['cosine_min']:.4f} min"


def _table(guides: bool):
    def table(records) -> str:
        rows = []
        for c in CASES:
            if c.name.startswith("guide-") != guides:
                continue
            for r in latest(records, "recipes", c.name):
                m = r["metrics"]
                rows.append([f"`{r['params'].get('recipe') or r['params'].get('name')}`" if not guides else c.name.removeprefix("guide-"),
                             r["params"]["model"], figure(m), f"{m['size_ratio']:.2f}x", f"{m['seconds']:.0f}",
                             # rows of the first runs name the recipe, not the command: the case's is the same
                             f"`{r['params'].get('command') or ' && '.join(c.params['commands'])}`"])
        return md_table(["recipe" if not guides else "case", "model", "held-out quality", "size", "wall s",
                         "command"], rows)
    return table


TABLES = {"recipes": _table(False), "recipes-guides": _table(True)}


DATA = {"stories260k": "stories260k-eval", "minilm": "the built-in held-out sentences"}
REACHED_KEYS = ("kl", "cosine_mean", "cosine_min", "size_ratio", "seconds")


def reaches_of(metrics: dict, model: str) -> dict:
    """A recipe file's ``reaches:`` from its bench row (what tests/test_recipes.py compares)."""
    out = {"model": "stories260k" if model == "stories260k" else "all-MiniLM-L6-v2", "data": DATA[model]}
    for k in REACHED_KEYS:
        if k in metrics:
            out[k] = round(metrics[k]) if k == "seconds" else round(metrics[k], 4)
    return out


def write_reaches(records) -> list[str]:
    """Rewrite the one ``reaches:`` line of every shipped recipe file from the latest full run of its
    bench case; the rest of the file (comments, settings) stays as written. Returns the files changed."""
    import re

    from squeeze.recipe import shipped_recipes

    changed = []
    for rec in shipped_recipes():
        suite, case = rec.bench.split("/", 1)
        rows = latest(records, suite, case)
        if not rows:
            continue
        model = next(m for m in MODELS if case.endswith("-" + m))
        fields = reaches_of(rows[-1]["metrics"], model)
        line = "reaches: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"
        text = rec.path.read_text()
        new = re.sub(r"^reaches:.*$", line, text, count=1, flags=re.M)
        if new != text:
            tmp = rec.path.with_name(rec.path.name + ".tmp")
            tmp.write_text(new)
            tmp.replace(rec.path)
            changed.append(rec.path.name)
    return changed
