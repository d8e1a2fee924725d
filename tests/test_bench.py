"""bench/: the harness runs a case in a child process and appends rows in the one schema; README
tables are regenerated from the results without touching the prose around them."""

from __future__ import annotations

import json
import os

import pytest

from bench import harness
from bench.run import all_cases, all_tables, select


def trivial(n: int) -> list[dict]:
    """A case: a slow and a fast variant measured side by side, the fast one as a ratio to the slow."""
    return [{"row": "slow", "metrics": {"seconds": 2.0 * n, "threads": int(os.environ["OMP_NUM_THREADS"])}},
            {"row": "fast", "metrics": {"seconds": 0.5 * n, "label": "x"}, "ratio_to": "slow"}]


def skipping() -> dict:
    raise harness.Skip("no model here")


CASE = harness.Case("toy", "trivial", "tests.test_bench:trivial", {"n": 3}, quick={"n": 1})


def toy_table(records) -> str:
    return harness.md_table(["row", "seconds", "vs slow"],
                            [[r["row"], r["metrics"]["seconds"], (r["ratio_to"] or {}).get("metrics", {}).get("seconds", "")]
                             for r in harness.latest(records, "toy", "trivial")])


def test_a_case_runs_in_a_child_and_appends_rows_in_the_schema(tmp_path):
    rows = harness.run_case(CASE, "quick", tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "toy.jsonl").read_text().splitlines()]
    assert lines == rows and len(lines) == 2
    for r in lines:
        assert tuple(r) == harness.SCHEMA_KEYS
        assert (r["suite"], r["case"], r["mode"], r["imported"]) == ("toy", "trivial", "quick", False)
        assert r["params"] == {"n": 1}  # the quick override reached the child
        assert r["process"]["peak_rss_mb"] > 0 and r["process"]["wall_s"] > 0
        assert r["machine"]["threads"] == 1 and r["versions"]["torch"]
        assert r["command"].endswith("--quick --only toy/trivial")
    slow, fast = lines
    assert slow["metrics"]["threads"] == 1  # the child's environment pins the thread count
    assert slow["ratio_to"] is None
    assert fast["ratio_to"] == {"row": "slow", "metrics": {"seconds": 0.25}}  # non-numbers get no ratio
    assert slow["run"] == fast["run"]  # one invocation: the rows stay together


def test_a_second_run_appends_and_tables_use_only_the_newest_full_run(tmp_path):
    harness.run_case(CASE, "full", tmp_path)
    harness.run_case(CASE, "quick", tmp_path)  # quick runs never reach the README's tables
    records = harness.load(tmp_path)
    assert len(records) == 4
    text = "intro\n<!-- bench:table toy -->\nstale\n<!-- bench:end -->\nprose *kept*\n"
    out = harness.render(text, {"toy": toy_table}, records)
    assert out == ("intro\n<!-- bench:table toy -->\n| row | seconds | vs slow |\n|---|---|---|\n"
                   "| slow | 6.0 |  |\n| fast | 1.5 | 0.25 |\n<!-- bench:end -->\nprose *kept*\n")
    assert harness.render(out, {"toy": toy_table}, records) == out  # idempotent


def test_a_skipped_case_records_nothing(tmp_path):
    case = harness.Case("toy", "skip", "tests.test_bench:skipping")
    assert harness.run_case(case, "full", tmp_path, log=lambda _: None) == []
    assert not (tmp_path / "toy.jsonl").exists()


def test_unknown_table_marker_and_unknown_baseline_are_errors():
    with pytest.raises(KeyError, match="nope"):
        harness.render("<!-- bench:table nope -->\n<!-- bench:end -->\n", {}, [])
    with pytest.raises(ValueError, match="ratio_to"):
        harness.with_ratios([{"row": "a", "metrics": {"s": 1}, "ratio_to": "missing"}])


def test_the_readme_is_in_sync_with_the_results():
    """Every marked table renders from bench/results/ exactly as committed, and every table
    function has a marker (no table is computed and never shown)."""
    text = harness.README.read_text()
    tables = all_tables()
    assert harness.render(text, tables, harness.load()) == text
    assert set(tables) == {m["name"] for m in harness.MARK.finditer(text)}


def test_case_names_are_unique_and_the_quick_suite_is_small():
    cases = all_cases()
    assert len({c.id for c in cases}) == len(cases)
    quick = select(cases, "quick", None)
    assert 0 < len(quick) < 20 and {c.suite for c in quick} == {c.suite for c in cases}
