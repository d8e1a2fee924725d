"""The install is reproducible and the declared ranges are honest (see README "Dependencies")."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _deps():
    spec = importlib.util.spec_from_file_location("deps", ROOT / "tools" / "deps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lock_pins_every_dependency_inside_its_range():
    assert _deps().check() == []


def test_every_range_has_a_floor_and_a_ceiling():
    deps = _deps()
    for req in deps.requirements():
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops and "<" in ops, f"{req}: needs a tested floor (>=) and a tested ceiling (<)"
    floors = deps.floors()
    assert any(f.startswith("transformers==") for f in floors) and any(f.startswith("torch==") for f in floors)
    assert "torch" not in " ".join(deps.latest())  # test-latest keeps the lock's torch (see the Makefile)
