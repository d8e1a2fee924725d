"""OWL: outlier ratios and the allocation by hand, and the per-layer promise on a tiny model."""

import json

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.algorithms.owl import allocate, outlier_ratio


def test_outlier_ratio_by_hand():
    # mean of [1]*9 + [11] = 2; threshold 5 x 2 = 10: one score of ten is an outlier
    assert outlier_ratio([torch.ones(3, 3), torch.tensor([11.0])], m=5) == pytest.approx(0.1)
    assert outlier_ratio([torch.ones(4)], m=5) == 0.0


def test_allocation_keeps_the_mean_and_favours_outlier_layers():
    s = allocate([0.01, 0.03, 0.02, 0.05], 0.5, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.5)
    assert s[3] == min(s) and s[0] == max(s)
    assert max(s) - min(s) == pytest.approx(0.16)  # the spread is exactly 2 lambda
    assert allocate([0.02, 0.02], 0.7) == [0.7, 0.7]
    with pytest.raises(SqueezeError, match="owl_lambda"):
        allocate([0.0, 1.0], 0.05, lam=0.2)


def test_owl_is_unstructured_only():
    from squeeze.passes import get_pass

    with pytest.raises(SqueezeError, match="unstructured"):
        get_pass("wanda")(pattern="2:4", sparsity_profile="owl")
    with pytest.raises(SqueezeError, match="sparsity_profile"):
        get_pass("wanda")(sparsity=0.5, sparsity_profile="lumpy")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_records_per_layer_targets_and_keeps_the_total(method, tiny_dir, tiny_calib, tmp_path):
    import squeeze

    out = tmp_path / "o"
    r = squeeze.compress(tiny_dir("llama"), out, method=method, sparsity=0.5, sparsity_profile="owl",
                         calib=str(tiny_calib), nsamples=8, seqlen=32)
    layer = r.report["pass_reports"][method]["owl_layer_sparsity"]
    assert len(layer) == 2 and layer[0] != layer[1] and sum(layer) / 2 == pytest.approx(0.5, abs=1e-6)
    recs = r.report["linears"]
    for name, rec in recs.items():
        i = int(name.split(".")[2])
        assert rec["sparsity_target"] == pytest.approx(layer[i], abs=1e-6)
        assert rec["sparsity_profile"] == "owl"
    assert r.report["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    info = squeeze.info(out)
    assert all(v["promise_ok"] for v in info["linears"].values())
    # measured per-linear sparsity follows its own target, not the global one
    lo = min(range(2), key=lambda i: layer[i])
    measured = [v["sparsity"] for k, v in info["linears"].items() if k.startswith(f"model.layers.{lo}.")]
    assert max(measured) < 0.5
    assert json.loads((out / "squeeze.json").read_text())["passes"][0]["sparsity_profile"] == "owl"


def test_cli_sparsity_profile_flag(tiny_dir, tiny_calib, tmp_path):
    from click.testing import CliRunner
    from squeeze.cli.main import cli

    res = CliRunner().invoke(cli, ["compress", str(tiny_dir("llama")), "--out", str(tmp_path / "c"), "--method",
                                   "magnitude", "--sparsity", "0.6", "--sparsity-profile", "owl", "--calib",
                                   str(tiny_calib), "--nsamples", "4", "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "c" / "squeeze.json").read_text())
    targets = {v["sparsity_target"] for v in rec["linears"].values()}
    assert len(targets) == 2
