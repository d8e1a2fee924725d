"""Recipe files and the shipped recipes: named lookup by model kind, recover: sections (one command =
compress then recover), YAML as recipes mean it, the figures the shipped files state vs the bench."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from squeeze.cli.main import cli
from squeeze.errors import SqueezeError
from squeeze.recipe import read_recipe_file, resolve_recipe, shipped_recipes, yaml_load


# -- the shipped recipes ---------------------------------------------------------------------------
def test_every_shipped_recipe_builds_and_has_a_bench_case():
    from bench.cases.recipes import CASES
    from squeeze.recipe import build_passes

    recipes = shipped_recipes()
    names = {(r.name, r.kind) for r in recipes}
    assert {("best-2:4", "decoder"), ("best-2:4", "encoder"), ("best-50%", "decoder"), ("quick-2:4", None)} <= names
    assert len(names) == len(recipes), "two shipped files share a name and kind"
    cases = {c.id for c in CASES}
    for r in recipes:
        assert build_passes(r.passes) and r.summary, r.path
        assert r.bench in cases, f"{r.path.name}: bench case {r.bench} does not exist"


def test_shipped_figures_are_the_bench_results():
    """What a recipe file says it reaches is the latest full run of its bench case (the CLI command)."""
    from bench.harness import latest, load

    records = load()
    for r in shipped_recipes():
        suite, case = r.bench.split("/", 1)
        rows = latest(records, suite, case)
        assert rows, f"{r.path.name}: no full bench run of {r.bench} (python -m bench.run --full --only '{r.bench}')"
        m = rows[-1]["metrics"]
        for key, value in r.reaches.items():
            if key in ("model", "data"):
                continue
            want = round(m[key]) if key == "seconds" else round(m[key], 4)
            assert value == want, f"{r.path.name}: reaches {key} {value}, the bench measured {want}"
        assert {k for k in m if k in ("kl", "cosine_mean")} <= set(r.reaches), f"{r.path.name}: figure missing"


def test_a_name_resolves_to_the_variant_for_the_model_kind():
    assert resolve_recipe("best-2:4", "decoder").recover["steps"] == 100
    assert resolve_recipe("best-2:4", "encoder").recover["rows"] == "sentences"
    assert resolve_recipe("quick-2:4", "encoder").name == "quick-2:4"  # for any kind
    with pytest.raises(SqueezeError, match="made for decoder models and this is a encoder"):
        resolve_recipe("best-50%", "encoder")
    with pytest.raises(SqueezeError, match="no shipped recipe of that name: the shipped ones are .*best-2:4"):
        resolve_recipe("best-3:4", "decoder")


def test_the_recipes_command_lists_every_shipped_recipe():
    res = CliRunner().invoke(cli, ["recipes"])
    assert res.exit_code == 0, res.output
    for r in shipped_recipes():
        assert r.name in res.output
    shown = CliRunner().invoke(cli, ["recipes", "--show", "best-2:4"])
    assert shown.exit_code == 0 and shown.output.count("name: best-2:4") == 2


# -- reading recipe files ------------------------------------------------------------------------------
def test_unquoted_n_m_stays_a_pattern():
    """YAML 1.1 reads 2:4 as the base-60 integer 124; recipes and --set mean the pattern."""
    assert yaml.safe_load("pattern: 2:4") == {"pattern": 124}  # why the recipe loader exists
    assert yaml_load("pattern: 2:4") == {"pattern": "2:4"}
    assert yaml_load("[8:16, 12, 0x1f, 1.5, true]") == ["8:16", 12, 31, 1.5, True]


def test_bad_indentation_names_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- pass: wanda\n  pattern: 2:4\n ignore: x\n")
    with pytest.raises(SqueezeError, match=r"r.yaml line 3: cannot parse .*indentation"):
        read_recipe_file(p)
    p.write_text("passes: [{pass: wanda}]\nrecover: {steps: 2, colour: red}\n")
    with pytest.raises(SqueezeError, match="recover: \\['colour'\\] is not allowed"):
        read_recipe_file(p)


# -- a recipe that recovers: one command = compress, then recover ------------------------------------
def _tensors(path):
    from squeeze.formats import open_dense

    ck = open_dense(path)
    return {k: ck.get(k) for k in ck.keys()}


def test_recover_section_equals_compress_then_recover(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    src = tiny_dir("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - pass: wanda\n    pattern: 2:4\nrecover: {steps: 3, batch_size: 4, lr: 1.0e-3}\n")
    kw = dict(calib=str(tiny_calib), nsamples=8, seqlen=16)
    one = squeeze.compress(src, tmp_path / "one", recipe=str(recipe), **kw)
    squeeze.compress(src, tmp_path / "a", method="wanda", pattern="2:4", **kw)
    squeeze.recover(tmp_path / "a", tmp_path / "two", reference=src, steps=3, batch_size=4, lr=1e-3, **kw)

    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = _tensors(tmp_path / "a")
    assert any(not torch.equal(before[k], a[k]) for k in a), "recovery changed nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "one", "r.yaml", "two"], "work folders were left"
    record = json.loads((tmp_path / "one" / "squeeze.json").read_text())
    assert [e["pass"] for e in record["passes"]] == ["wanda", "recover"]
    assert all(i["promise_ok"] for i in squeeze.info(tmp_path / "one")["linears"].values() if i.get("promised"))
    rep = one.report
    assert rep["recover"]["steps"] == 3 and rep["recover"]["loss_after"] < rep["recover"]["loss_before"]
    # the bytes reported are the final export's, not the one-shot's it was trained from
    assert rep["files"] and all((tmp_path / "one" / f).stat().st_size == n for f, n in rep["files"].items())
    assert rep["size_bytes"]["export"] == sum(rep["files"].values())


def test_a_recovering_recipe_refuses_quantization_and_compressed_tensors(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [{pass: wanda, pattern: '2:4'}]\nrecover: {steps: 1}\n")
    kw = dict(recipe=str(recipe), calib=str(tiny_calib), nsamples=8, seqlen=16)
    with pytest.raises(SqueezeError, match="then quantize the result"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "q", quantize="int8", **kw)
    with pytest.raises(SqueezeError, match="squeeze convert"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "c", format="compressed-tensors", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


# -- calibration length from the data -----------------------------------------------------------------
def test_default_seqlen_prefers_whole_rows():
    from squeeze.calib.packing import auto_seqlen

    assert auto_seqlen([401] * 256, 128, 512) == 401  # stories260k: whole stories, not windows across them
    assert auto_seqlen([401] * 100, 128, 512) == 512  # too few rows that long: windows
    assert auto_seqlen([100] * 256, 128, 512) == 512  # rows too short to calibrate on alone
    assert auto_seqlen([900] * 256, 128, 512) == 512  # long rows are cut to the cap


# -- the embedded default ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_bare_compress_runs_the_quick_recipe_and_points_further(minilm_dir, tmp_path):
    res = CliRunner().invoke(cli, ["compress", "--out", str(tmp_path / "o"), "--nsamples", "8", "--no-verify",
                                   "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["recipe"]["name"] == "quick-2:4" and [p["pass"] for p in rep["passes"]] == ["sparsegpt"]
    assert rep["next"]["recipe"] == "best-2:4"
    assert "further: squeeze compress --recipe best-2:4 --out OUT" in " ".join(res.output.split())


@pytest.mark.slow
def test_bare_compress_with_quantize_quantizes_alone(minilm_dir, tmp_path):
    import squeeze

    res = squeeze.compress(None, tmp_path / "q", quantize="int8", nsamples=8)
    assert [p["pass"] for p in res.report["passes"]] == ["quantize"] and "next" not in res.report
