"""Recipes: an ordered list of ``{pass: NAME, ...settings}`` (YAML or JSON file, or built from
CLI flags). Passes run in order within one calibration sweep.

A recipe file is either that list, or a mapping with ``passes:`` and optionally

- ``calibration:`` defaults for ``nsamples`` / ``seqlen`` (flags given on the command line win);
- ``recover:`` settings of :func:`squeeze.recovery.recover`: after the sweep, the one-shot export
  is distilled toward the source (masks kept) and that is the export;
- ``name`` / ``for`` (``decoder`` or ``encoder``) / ``summary`` / ``reaches`` / ``bench``: what a
  shipped recipe is, which models it suits, the figure it reaches and the bench case measuring it.

Shipped recipes (``recipes/*.yaml``, the package ``squeeze.recipes``) are selected by name, e.g.
``--recipe best-2:4``; one name may have a decoder and an encoder variant, and the model decides.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from squeeze.errors import SqueezeError
from squeeze.passes.base import PRESETS, Method, get_pass

KINDS = ("decoder", "encoder")
# what a recover: section may set (the rest comes from compress: reference, calibration data, seed, format)
RECOVER_KEYS = ("steps", "lr", "batch_size", "nsamples", "seqlen", "packing", "rows", "encoder_loss", "augment",
                "lr_schedule", "warmup", "calib")
CALIBRATION_KEYS = ("nsamples", "seqlen")


@dataclass
class Recipe:
    passes: list[dict]
    recover: dict | None = None
    calibration: dict = field(default_factory=dict)
    name: str | None = None
    kind: str | None = None  # "decoder" / "encoder": the models a shipped recipe was measured on
    summary: str = ""
    reaches: dict = field(default_factory=dict)  # {model, metric, value, seconds, ...} as bench measured it
    bench: str | None = None
    path: Path | None = None

    def describe(self) -> dict:
        out = {"name": self.name or (str(self.path) if self.path else None)}
        if self.recover:
            out["recover"] = self.recover
        if self.calibration:
            out["calibration"] = self.calibration
        return {k: v for k, v in out.items() if v is not None}


def yaml_load(text: str):
    """YAML as recipes mean it: ``2:4`` stays the string "2:4". (YAML 1.1, which PyYAML follows,
    reads an unquoted ``2:4`` as the base-60 integer 124.)"""
    import yaml

    return yaml.load(text, Loader=_loader())


@functools.cache
def _loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    int_tag = "tag:yaml.org,2002:int"
    RecipeLoader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rules if tag != int_tag]
        for ch, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    # SafeLoader's int rule without its last (sexagesimal) alternative
    RecipeLoader.add_implicit_resolver(int_tag, re.compile(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"))
    return RecipeLoader


def _parse(p: Path):
    text = p.read_text()
    if p.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SqueezeError(f"recipe {p} line {e.lineno}: cannot parse ({e.msg})") from None
    import yaml

    try:
        return yaml_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}" if mark else ""
        raise SqueezeError(f"recipe {p}{where}: cannot parse ({e.problem or e.context}); check the indentation "
                           "there (every pass is '- pass: NAME' with its settings indented under it)") from None
    except yaml.YAMLError as e:
        raise SqueezeError(f"recipe {p}: cannot parse ({str(e).splitlines()[0]})") from None


def _check_passes(where: str, data) -> list[dict]:
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "pass" in d for d in data):
        raise SqueezeError(f"recipe {where}: expected a non-empty list of {{pass: NAME, ...settings}}")
    return data


def read_recipe_file(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"recipe file {p} does not exist")
    data = _parse(p)
    if not isinstance(data, dict):
        return Recipe(_check_passes(str(p), data), path=p)
    unknown = sorted(set(data) - {"passes", "recover", "calibration", "name", "for", "summary", "reaches", "bench"})
    if unknown:
        raise SqueezeError(f"recipe {p}: unknown key(s) {', '.join(unknown)}; a recipe has passes and optionally "
                           "recover, calibration, name, for, summary, reaches, bench")
    rec = Recipe(_check_passes(str(p), data.get("passes")), path=p, name=data.get("name"), kind=data.get("for"),
                 summary=data.get("summary", ""), reaches=data.get("reaches") or {}, bench=data.get("bench"))
    for key, allowed in (("recover", RECOVER_KEYS), ("calibration", CALIBRATION_KEYS)):
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, dict) or set(section) - set(allowed):
            bad = sorted(set(section) - set(allowed)) if isinstance(section, dict) else section
            raise SqueezeError(f"recipe {p}: {key}: {bad!r} is not allowed there (use {', '.join(allowed)})")
        setattr(rec, key, dict(section))
    if rec.kind is not None and rec.kind not in KINDS:
        raise SqueezeError(f"recipe {p}: for: {rec.kind!r} is not one of {', '.join(KINDS)}")
    return rec


def read_recipe(path: str | Path) -> list[dict]:
    """The passes of a recipe file."""
    return read_recipe_file(path).passes


def shipped_recipes() -> list[Recipe]:
    """Every recipe shipped in ``squeeze.recipes``, in file-name order."""
    from importlib.resources import files

    folder = files("squeeze.recipes")
    return [read_recipe_file(Path(str(f))) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")]


def resolve_recipe(spec: str | Path | list | Recipe, kind: str) -> Recipe:
    """A recipe from a file path, a shipped recipe's name (the variant for ``kind``, "decoder" or
    "encoder"), a list of pass entries, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, list):
        return Recipe(_check_passes("given as a list", spec))
    if Path(spec).is_file():
        return read_recipe_file(spec)
    named = [r for r in shipped_recipes() if r.name == str(spec)]
    if not named:
        names = sorted({r.name for r in shipped_recipes()})
        if Path(spec).suffix in (".yaml", ".yml", ".json") or "/" in str(spec):
            raise SqueezeError(f"recipe file {spec} does not exist")
        raise SqueezeError(f"no recipe file {spec} and no shipped recipe of that name: the shipped ones are "
                           f"{', '.join(names)} (squeeze recipes lists them)")
    fit = [r for r in named if r.kind in (kind, None)]
    if not fit:
        raise SqueezeError(f"recipe {spec} is made for {named[0].kind} models and this is a {kind}: shipped recipes "
                           f"for {kind}s are {', '.join(sorted({r.name for r in shipped_recipes() if r.kind == kind}))}")
    return fit[0]


def reached(rec: Recipe) -> str:
    """What a shipped recipe's ``reaches`` says, as words: "KL 0.143 ... on stories260k, 8 min"."""
    r = rec.reaches or {}
    if not r:
        return "not measured yet"
    if "kl" in r:
        fig = f"KL {r['kl']:.3f} nats/token on {r.get('data', 'held-out data')}"
    elif "cosine_mean" in r:
        fig = f"mean embedding cosine {r['cosine_mean']:.3f} to the dense model on {r.get('data', 'held-out data')}"
    else:
        fig = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("model", "seconds", "data"))
    secs = r.get("seconds")
    took = "" if secs is None else f", {secs / 60:.0f} min" if secs >= 90 else f", {secs:.0f} s"
    return f"{fig} ({r.get('model', '?')}{took} here)"


def next_step(done: str | None, kind: str) -> dict | None:
    """After the quick default recipe: the shipped recipe that goes further for this kind of model."""
    from squeeze.defaults import DEFAULT_RECIPE, NEXT_RECIPE

    if done != DEFAULT_RECIPE:
        return None
    better = [r for r in shipped_recipes() if r.name == NEXT_RECIPE and r.kind in (kind, None)]
    if not better:
        return None
    return {"recipe": NEXT_RECIPE, "summary": better[0].summary, "reaches": reached(better[0])}


def build_passes(entries: list[dict], defaults: dict | None = None) -> list[Method]:
    """Instantiate methods; a preset name (e.g. ``dass``) expands to its configured method first;
    ``defaults`` (e.g. --targets/--ignore) fill settings a method accepts and the entry does not set."""
    import dataclasses

    import squeeze.passes  # noqa: F401  (registers the built-in methods and presets)

    passes = []
    for entry in entries:
        entry = dict(entry)
        name = str(entry.pop("pass"))
        if name in PRESETS:
            entry = PRESETS[name](entry)
            name = str(entry.pop("pass"))
        cls = get_pass(name)

        accepted = {f.name for f in dataclasses.fields(cls.Settings)}
        for k, v in (defaults or {}).items():
            if v is not None and k in accepted and k not in entry:
                entry[k] = v
        passes.append(cls(**entry))
    return passes


def flags_recipe(method: str | None, pattern: str | None, sparsity: float | None, **extra) -> list[dict]:
    if method is None:
        raise SqueezeError("no method: give --method (e.g. wanda) or --recipe FILE")
    entry = {"pass": method}
    if pattern is not None:
        entry["pattern"] = pattern
    if sparsity is not None:
        entry["sparsity"] = sparsity
    entry.update({k: v for k, v in extra.items() if v is not None})
    return [entry]
