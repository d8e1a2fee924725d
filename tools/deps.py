"""Read squeeze's dependency ranges from pyproject.toml, for the install targets of the Makefile.

    python tools/deps.py floors   every dependency pinned at the lowest version its range allows
                                  (``make test-oldest`` installs these)
    python tools/deps.py latest   every dependency by name, without bounds, except torch
                                  (``make test-latest`` installs the newest of each)
    python tools/deps.py check    the lock (requirements.lock) pins every dependency inside its range

Dependencies are the core ones plus the ``test`` and ``bench`` extras. Environment markers are kept.
Needs only the standard library and ``packaging`` (a dependency of pip's environment and ours).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs, seen = [], set()
    for line in project["dependencies"] + [r for extra in ("test", "bench")
                                           for r in project["optional-dependencies"][extra]]:
        req = Requirement(line)
        if req.name not in seen:
            seen.add(req.name)
            reqs.append(req)
    return reqs


def _marker(req: Requirement) -> str:
    return f"; {req.marker}" if req.marker else ""


def floors() -> list[str]:
    out = []
    for req in requirements():
        low = [s.version for s in req.specifier if s.operator in (">=", "==")]
        if not low:
            raise SystemExit(f"pyproject.toml: {req} has no lower bound (a range starts at the lowest "
                             "version tested)")
        out.append(f"{req.name}=={low[0]}{_marker(req)}")
    return out


def latest() -> list[str]:
    # torch stays at the lock's version: the newest torch on PyPI is a multi-GB CUDA build
    return [f"{req.name}{_marker(req)}" for req in requirements() if req.name != "torch"]


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def check() -> list[str]:
    """Problems: a dependency missing from the lock, or locked outside its range."""
    pins, problems = locked(), []
    for req in requirements():
        if req.marker and not req.marker.evaluate():
            continue
        version = pins.get(req.name.lower().replace("_", "-"))
        if version is None:
            problems.append(f"{req.name} is not in {LOCK.name}")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} in {LOCK.name} is outside pyproject's {req.specifier}")
    return problems


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "floors":
        print("\n".join(floors()))
    elif cmd == "latest":
        print("\n".join(latest()))
    elif cmd == "check":
        problems = check()
        print("\n".join(problems) or f"{LOCK.name} agrees with pyproject.toml")
        return 1 if problems else 0
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
