"""DSnoT: a hand-made swap, exact sparsity and N:M validity after repair, error reduction, and
the pass / --repair wiring."""

import pytest
import torch

from squeeze.algorithms.dsnot import dsnot_repair
from squeeze.sparsity import nm_mask, satisfies_nm, unstructured_mask, wanda_scores


def test_one_swap_by_hand():
    # one row, channels with mean 1: pruned weights 2 and 0.5 leave r = 2.5; DSnoT grows the
    # weight 2 (largest W mu / Var) and prunes the kept weight of opposite sign with the smallest
    # Wanda score (-0.1), so r = 2.5 - 2 - 0.1 = 0.4, then stops (no candidate shrinks |r|).
    w_dense = torch.tensor([[2.0, 0.5, 1.0, -0.1, -3.0, 4.0]])
    w = torch.tensor([[0.0, 0.0, 1.0, -0.1, -3.0, 4.0]])
    ones = torch.ones(6)
    new, info = dsnot_repair(w_dense, w, mean=ones, var=ones, sq_norm=ones, threshold=0.01)
    torch.testing.assert_close(new, torch.tensor([[2.0, 0.0, 1.0, 0.0, -3.0, 4.0]]))
    assert info["swaps"] == 1


def test_stops_below_threshold():
    w_dense = torch.tensor([[0.05, 1.0, 1.0, 1.0]])
    w = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    new, info = dsnot_repair(w_dense, w, torch.ones(4), torch.ones(4), torch.ones(4), threshold=0.1)
    assert torch.equal(new, w) and info["swaps"] == 0


def _problem(rows=32, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g) * 2 + torch.randn(cols, generator=g)
    mean, var, sq = X.mean(0), X.var(0, unbiased=False), (X * X).mean(0)
    return W, X, mean, var, sq


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_repair_keeps_exact_sparsity_and_pattern_and_reduces_mean_error(nm):
    W, _, mean, var, sq = _problem()
    scores = wanda_scores(W, sq)
    mask = nm_mask(scores, *nm) if nm else unstructured_mask(scores, 0.6)
    w0 = W * mask
    new, info = dsnot_repair(W, w0, mean, var, sq, nm=nm, threshold=0.0)
    assert info["swaps"] > 0
    assert torch.equal((new == 0).sum(1), (w0 == 0).sum(1))  # every row keeps its count of zeros
    if nm:
        assert satisfies_nm(new, *nm)
    kept = new != 0
    assert torch.equal(new[kept], W[kept])  # no weight takes a value it did not have
    r0 = ((W - w0) @ mean).abs()
    r1 = ((W - new) @ mean).abs()
    assert (r1 <= r0 + 1e-5).all() and r1.sum() < r0.sum()


def test_follows_previous_pass_pattern_and_repair_flag(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    r = squeeze.compress(tiny_dir("llama"), tmp_path / "a", method="wanda", pattern="2:4", calib=str(tiny_calib),
                         nsamples=8, seqlen=32, repair="dsnot")
    assert [p["pass"] for p in r.report["passes"]] == ["wanda", "dsnot"]
    assert r.report["summary"]["pattern_ok"] and r.report["summary"]["sparsity"] == 0.5
    assert r.report["pass_reports"]["dsnot"]["linears"] == 14
    # the tiny random weights are ~0.02, so each row's error is already under the default 0.1
    r = squeeze.compress(tiny_dir("llama"), tmp_path / "t", recipe=[{"pass": "wanda", "pattern": "2:4"},
                         {"pass": "dsnot", "threshold": 0.0}], calib=str(tiny_calib), nsamples=8, seqlen=32)
    assert r.report["pass_reports"]["dsnot"]["swaps"] > 0
    assert r.report["summary"]["pattern_ok"]
    base = squeeze.compress(tiny_dir("llama"), tmp_path / "b", method="wanda", pattern="2:4", calib=str(tiny_calib),
                            nsamples=8, seqlen=32)
    assert base.model is not None and r.model is not None
    w_a = dict(r.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    w_b = dict(base.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(w_a != 0, w_b != 0)  # the mask moved
    assert torch.equal((w_a == 0).sum(1), (w_b == 0).sum(1))


def test_repair_after_sparsegpt_unstructured_keeps_sparsity(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    recipe = [{"pass": "sparsegpt", "sparsity": 0.5}, {"pass": "dsnot"}]
    r = squeeze.compress(tiny_dir("qwen2"), tmp_path / "a", recipe=recipe, calib=str(tiny_calib), nsamples=8,
                         seqlen=32)
    for rec in r.report["linears"].values():
        assert rec["pass"] == "sparsegpt" and rec["sparsity"] >= 0.5


def test_cli_repair_flag(tiny_dir, tiny_calib, tmp_path):
    from click.testing import CliRunner
    from squeeze.cli.main import cli

    res = CliRunner().invoke(cli, ["compress", str(tiny_dir("llama")), "--out", str(tmp_path / "c"), "--method",
                                   "wanda", "--sparsity", "0.5", "--repair", "dsnot", "--calib", str(tiny_calib),
                                   "--nsamples", "4", "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    import json

    rec = json.loads((tmp_path / "c" / "squeeze.json").read_text())
    assert [p["pass"] for p in rec["passes"]] == ["wanda", "dsnot"]
