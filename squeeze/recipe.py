"""Recipes: an ordered list of ``{pass: NAME, ...settings}`` (YAML or JSON file, or built from
CLI flags). Passes run in order within one calibration sweep."""

from __future__ import annotations

import json
from pathlib import Path

from squeeze.errors import SqueezeError
from squeeze.passes.base import PRESETS, Method, get_pass


def read_recipe(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise SqueezeError(f"recipe file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise SqueezeError(f"recipe {p}: cannot parse ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "passes" in data:
        data = data["passes"]
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "pass" in d for d in data):
        raise SqueezeError(f"recipe {p}: expected a non-empty list of {{pass: NAME, ...settings}}")
    return data


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
