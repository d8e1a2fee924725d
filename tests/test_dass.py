"""DaSS: hand-computed scores and masks, fused gate_up, and the pass on tiny models."""

import json

import pytest
import torch

from squeeze.algorithms.dass import down_mask, up_mask, up_scores
from squeeze.sparsity import satisfies_nm

# intermediate channel mean squares; their 4th roots (||X_int,i||^(1/2)) are 2,1,1,2,1,2,2,1
INT_SQ = torch.tensor([16.0, 1, 1, 16, 1, 16, 16, 1])
UP = torch.tensor([[1.0, 1.0], [1, 3], [1, 1], [1, 0.9], [1, 0.5], [1, 0.5], [1, 0.6], [1, 3]])  # [I=8, d=2]
DOWN = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 1], [0.1, 2, 1, 0.2, 5, 0.1, 1, 1]])  # [d=2, I=8]


def _rows_kept(mask, col):
    return set(torch.nonzero(mask[:, col]).flatten().tolist())


def test_up_scores_by_hand():
    s = up_scores(UP, INT_SQ)
    torch.testing.assert_close(s[:, 1], torch.tensor([2.0, 3, 1, 1.8, 0.5, 1, 1.2, 3]))


def test_up_mask_2_4_groups_along_output_rows():
    m = up_mask(UP, INT_SQ, (2, 4), None)
    assert _rows_kept(m, 0) == {0, 3, 5, 6}
    assert _rows_kept(m, 1) == {0, 1, 6, 7}
    assert satisfies_nm(m.float(), 2, 4, dim=0)


def test_up_mask_unstructured_within_each_input_column():
    m = up_mask(UP, INT_SQ, None, 0.5)
    assert _rows_kept(m, 0) == {0, 3, 5, 6}
    assert _rows_kept(m, 1) == {0, 1, 3, 7}


def test_down_mask_is_wanda_with_intermediate_norms():
    m = down_mask(DOWN, INT_SQ, (2, 4), None)
    assert set(torch.nonzero(m[0]).flatten().tolist()) == {0, 3, 5, 6}
    assert set(torch.nonzero(m[1]).flatten().tolist()) == {1, 2, 4, 6}


def test_fused_gate_up_masks_each_half_on_its_own():
    fused = torch.cat([UP, UP.flip(1)], 0)  # [gate; up], 16 x 2
    m = up_mask(fused, INT_SQ, (2, 4), None, parts=2)
    assert torch.equal(m[:8], up_mask(UP, INT_SQ, (2, 4), None))
    assert torch.equal(m[8:], up_mask(UP.flip(1), INT_SQ, (2, 4), None))


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
def test_dass_pass_records_output_axis_for_gate_up(arch, tiny_dir, tiny_calib, tmp_path):
    import squeeze

    out = tmp_path / "o"
    r = squeeze.compress(tiny_dir(arch), out, method="dass", pattern="2:4", calib=str(tiny_calib), nsamples=8,
                         seqlen=32)
    recs = r.report["linears"]
    assert all(rec["pattern_ok"] for rec in recs.values())
    ups = {n: rec for n, rec in recs.items() if rec["role"] in ("gate", "up", "gate_up")}
    assert ups and all(rec.get("pattern_axis") == "out" for rec in ups.values())
    assert all("pattern_axis" not in rec for rec in recs.values() if rec["role"] not in ("gate", "up", "gate_up"))
    info = squeeze.info(out) if hasattr(squeeze, "info") else None
    if info is not None:
        assert all(v.get("promise_ok") for v in info["linears"].values())
    record = json.loads((out / "squeeze.json").read_text())  # dass = wanda with DaSS scoring of the MLP
    assert record["passes"][0]["pass"] == "wanda" and record["passes"][0]["mlp_scoring"] == "dass"


def test_dass_rejects_a_non_pruning_attn_method():
    from squeeze.errors import SqueezeError
    from squeeze.recipe import build_passes

    with pytest.raises(SqueezeError, match="attn_method"):
        build_passes([{"pass": "dass", "pattern": "2:4", "attn_method": "dsnot"}])
    with pytest.raises(SqueezeError, match="unknown method"):
        build_passes([{"pass": "dass", "pattern": "2:4", "attn_method": "nope"}])
