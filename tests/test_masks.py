"""Hand-computed Wanda and magnitude masks on tiny tensors."""

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.sparsity import (
    check_sparsity,
    nm_mask,
    parse_pattern,
    satisfies_nm,
    unstructured_mask,
    wanda_scores,
)

W = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 6.0, -7.0, 8.0],
                  [-8.0, 7.0, 0.1, 5.0, 4.0, -3.0, 2.0, -1.0]])
# per-input-channel mean of x^2; Wanda compares |W| * sqrt(this)
SQ = torch.tensor([16.0, 1.0, 1.0, 1.0, 100.0, 1.0, 0.25, 0.01])


def test_magnitude_24_by_hand():
    keep = nm_mask(W.abs(), 2, 4)
    expected = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1],
                             [1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep, expected)


def test_wanda_24_by_hand():
    # scores row 0: [4, 2, 3, 4 | 5, 6, 3.5, 0.8] -> keep {0,3} and {4,5}
    # scores row 1: [32, 7, .1, 5 | 40, 3, 1, .1] -> keep {0,1} and {4,5}
    s = wanda_scores(W, SQ)
    assert torch.allclose(s[0], torch.tensor([4.0, 2.0, 3.0, 4.0, 5.0, 6.0, 3.5, 0.8]))
    keep = nm_mask(s, 2, 4)
    expected = torch.tensor([[1, 0, 0, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep, expected)


def test_wanda_48_by_hand():
    keep = nm_mask(wanda_scores(W, SQ), 4, 8)
    # row 0 scores [4,2,3,4,5,6,3.5,.8]: top-4 = cols 4,5,0,3 ; row 1 [32,7,.1,5,40,3,1,.1]: 4,0,1,3
    expected = torch.tensor([[1, 0, 0, 1, 1, 1, 0, 0],
                             [1, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep, expected)


def test_unstructured_50_by_hand():
    keep = unstructured_mask(wanda_scores(W, SQ), 0.5)
    assert torch.equal(keep, nm_mask(wanda_scores(W, SQ), 4, 8))  # one group of 8 == per-row 50%
    keep_mag = unstructured_mask(W.abs(), 0.25)  # drop the 2 smallest |w| per row
    expected = torch.ones_like(W, dtype=torch.bool)
    expected[0, [0, 4]] = False
    expected[1, [2, 7]] = False
    assert torch.equal(keep_mag, expected)


def test_nm_trailing_partial_group_stays_dense():
    w = torch.arange(1.0, 11.0)[None]  # 10 columns, 2:4 -> groups [0:4],[4:8], tail [8:10]
    keep = nm_mask(w, 2, 4)
    assert keep[0, 8:].all() and keep[0, :8].sum() == 4
    assert satisfies_nm(w * keep, 2, 4)


def test_nm_along_output_dim():
    s = torch.tensor([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 6.0]])
    keep = nm_mask(s, 2, 4, dim=0)
    assert torch.equal(keep[:, 0], torch.tensor([False, False, True, True]))
    assert torch.equal(keep[:, 1], torch.tensor([True, True, False, False]))


def test_satisfies_nm_detects_violation():
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not satisfies_nm(w, 2, 4)
    assert satisfies_nm(w, 3, 4)


@pytest.mark.parametrize("bad", ["3:2", "2:0", "a:b", "2:2", "0:4", "24", ""])
def test_bad_patterns(bad):
    with pytest.raises(SqueezeError):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "x"])
def test_bad_sparsity(bad):
    with pytest.raises(SqueezeError):
        check_sparsity(bad)


def test_large_random_nm_is_exact():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(64, 256, generator=g)
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 8)]:
        keep = nm_mask(s, n, m)
        assert (keep.reshape(64, -1, m).sum(-1) == n).all()
        # the kept ones are the group's largest
        grp = s.reshape(64, -1, m)
        kept_min = torch.where(keep.reshape(64, -1, m), grp, torch.inf).min(-1).values
        dropped_max = torch.where(keep.reshape(64, -1, m), -torch.inf, grp).max(-1).values
        assert (kept_min >= dropped_max).all()
