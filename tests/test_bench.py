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


def test_the_e2e_table_sets_each_speedup_beside_its_bound_and_target():
    """bench/cases/e2e.py's README table from hand-made rows: one row per (threads, export), the
    met column from the measured ratio against the issue's target, failed exports with their error."""
    from bench.cases import e2e

    def rec(export, threads, **m):
        return {"suite": "e2e", "case": "llama-1b", "mode": "full", "run": "r1", "row": f"{export} t{threads}",
                "params": {"export": export, "threads": threads}, "metrics": {"threads": threads, **m}}

    fig = dict(decode_tps_b1=30.0, decode_tps_b1_min=29.0, decode_tps_b1_max=31.0, bound_tps=60.0, of_bound=0.5,
               bytes_per_token=1.1e9)  # 1100 MB: no exponent
    records = [rec("dense", 1, method="dense", speedup=1.0, bound_speedup=1.0, target=None, met=None, **fig,
                   parameters=1.1e9, bandwidth_gbps=12.3, bandwidth_how="x.sum()", load_avg=[0.5, 0.7]),
               rec("int8", 1, method="quantize int8", speedup=1.9, bound_speedup=1.88, target=1.8, met=True, **fig),
               rec("teal90", 1, method="teal 0.9", speedup=4.0, bound_speedup=6.4, target=5.0, met=False, **fig),
               rec("teal70-int4", 1, error="load failed: SqueezeError: nope", target=3.0, met=False)]
    lines = e2e.table(records).splitlines()
    assert len(lines) == 2 + 4
    assert lines[3] == "| 1 | int8 | quantize int8 | 30 [29–31] | 1.90x | 1.88x | 60 | 50% | 1100 | ≥ 1.8x | yes |"
    assert lines[4].endswith("| 4.00x | 6.40x | 60 | 50% | 1100 | ≥ 5x | no |")
    assert lines[5] == "| 1 | teal70-int4 | - | - | - | - | - | - | - | ≥ 3x | no (load failed: SqueezeError: nope) |"
    assert e2e.table_machine(records).splitlines()[2] == "| 1 | 1100M | 12.3 | x.sum() | 0.5 / 0.7 |"
    # every export the issue sets a target for is in the full case, the quick case runs a subset
    full, = (c for c in e2e.CASES if c.name == "llama-1b")
    assert set(full.params["exports"]) == set(e2e.EXPORTS) and full.params["threads"] == [1, 2]
    assert set(full.quick["exports"]) < set(e2e.EXPORTS)


def test_decode_anatomy_splits_a_step_and_restores_the_model(tiny_dir, tiny_calib, tmp_path):
    """bench/decode_anatomy.py on a TEAL + int8 export: each of the three step times is measured
    (their order is not promised on a tiny model, where timing noise is larger than the products),
    the rows rates too, and every kernel it replaced is the original again afterwards."""
    import torch
    import torch.nn.functional as F

    import squeeze
    import squeeze.kernels.cpu_input_sparse as bags
    from bench import decode_anatomy

    out = tmp_path / "o"
    squeeze.compress(tiny_dir("llama"), out, method="teal", act_sparsity=0.7, quantize="int8", calib=str(tiny_calib),
                     nsamples=4, seqlen=32)
    linear, bag_f = F.linear, bags.F
    got = decode_anatomy.anatomy(str(out), steps=2)
    assert set(got) == {"step", "no_block_products", "no_products"} and all(v > 0 for v in got.values())
    assert F.linear is linear and bags.F is bag_f
    rates = decode_anatomy.rows(0.3, 64, 256, nbytes=1 << 20)
    assert set(rates) == {"bag", "index_select", "dense"} and all(v > 0 for v in rates.values())
    model = squeeze.load(out, dtype="bfloat16")
    with torch.no_grad():
        logits = model(torch.arange(3, 10).unsqueeze(0)).logits
    assert logits.abs().sum() > 0
