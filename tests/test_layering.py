"""The import layering, read from the source with ``ast`` (no import runs): kernels stand alone,
the run-time side never imports the compress side, and private names stay inside their package.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency). ``tests/`` and ``bench/`` are not checked: tests may reach private helpers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {"squeeze": "squeeze", "calib": "squeeze.calib", "cli": "squeeze.cli", "kernels": "squeeze.kernels"}
# what inference code runs must not pull in compression, calibration or training
COMPRESS_SIDE = ("squeeze.passes", "squeeze.calib", "squeeze.train", "squeeze.stages", "squeeze.compressor",
                 "squeeze.recovery", "squeeze.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out.setdefault(name, path)  # squeeze/ lists no calib/cli/kernels files: no clash
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of module ``name``."""
    here = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            names = [a.name for a in node.names]
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            out += [(module, names)] + [(s, []) for s in submodules]
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _package(name: str) -> str:
    """The package a module belongs to: ``squeeze.<sub>`` for a subpackage, else ``squeeze``."""
    parts = name.split(".")
    sub = ".".join(parts[:2])
    return sub if len(parts) > 1 and sub in MODULES and _is_package(sub) else "squeeze"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_scan_sees_the_packages():
    # guards the other tests against passing because they found nothing to read
    assert {"squeeze.runtime.stack", "squeeze.calib.runner", "squeeze.kernels", "squeeze.cli.main"} <= set(MODULES)
    assert ("squeeze.runtime.stack", ["Stack"]) in _imports("squeeze.runtime.speculative")
    assert any(m == "squeeze.kernels._triton_utils" for m, _ in _imports("squeeze.kernels"))  # relative import


def test_kernels_import_nothing_of_squeeze():
    bad = [f"{name} imports {m}" for name in MODULES if _under(name, "squeeze.kernels")
           for m, _ in _imports(name) if _under(m, "squeeze") and not _under(m, "squeeze.kernels")]
    assert not bad, bad


RUNTIME = [n for n in MODULES if _under(n, "squeeze.runtime")]


@pytest.mark.parametrize("module", RUNTIME)
def test_runtime_never_imports_the_compress_side(module):
    bad = [m for m, _ in _imports(module) if any(_under(m, c) for c in COMPRESS_SIDE)]
    assert not bad, f"{module} imports {bad}"


def test_only_calib_uses_the_runners_private_names():
    bad = [f"{name}: {names}" for name in MODULES if not _under(name, "squeeze.calib")
           for m, names in _imports(name) if m == "squeeze.calib.runner" and any(map(_private, names))]
    assert not bad, bad


PACKAGES = sorted({_package(n) for n in MODULES})


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_packages(package):
    """Neither a private module (``squeeze.passes._x``) nor a private name (``from m import _f``)
    of another package: what a package shares, it names publicly."""
    bad = []
    for name in (n for n in MODULES if _package(n) == package):
        for m, names in _imports(name):
            if not _under(m, "squeeze") or _package(m) == package:
                continue
            if any(map(_private, m.split("."))) or any(map(_private, names)):
                bad.append(f"{name} imports {m} {[n for n in names if _private(n)]}")
    assert not bad, bad


@pytest.mark.parametrize("module", [n for n in MODULES if _under(n, "squeeze.algorithms")])
def test_algorithms_are_pure_math(module):
    """The math of each method needs tensors, not models: no passes, runner, run-time or transformers."""
    allowed = ("squeeze.algorithms", "squeeze.errors", "squeeze.sparsity", "squeeze.kernels")
    bad = [m for m, _ in _imports(module) if (_under(m, "squeeze") and not any(_under(m, a) for a in allowed))
           or _under(m, "transformers")]
    assert not bad, f"{module} imports {bad}"
