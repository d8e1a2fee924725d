"""SparseGPT math on hand-made layers: the OBS sweep against a direct least-squares re-solve,
lazy batching, masks, and the pass's settings checks."""

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.algorithms.sparsegpt import prepare_hessian, reconstruction_loss, sparsegpt_prune
from squeeze.sparsity import satisfies_nm


def _layer(rows=4, cols=8, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    X = torch.randn(cols, tokens, generator=g, dtype=torch.float64)
    X[1] *= 3.0  # uneven channel scales make the problem non-trivial
    H = 2.0 / tokens * X @ X.T
    return W, X, H


def _ls_resolve(W, X, kept):
    """min over W' restricted to ``kept`` of ||W X - W' X||, row by row, with lstsq on X."""
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        k = kept[i]
        sol = torch.linalg.lstsq(X[k].T, (W[i:i + 1] @ X).T).solution  # (|k|, 1)
        out[i, k] = sol[:, 0]
    return out


def test_sparsegpt_equals_least_squares_resolve_when_pruned_columns_come_first():
    # SparseGPT only updates weights to the right of the column it prunes, so it is exactly the
    # least-squares re-solve when every pruned weight of a row precedes every kept one.
    W, X, H = _layer()
    kept = torch.zeros(4, 8, dtype=torch.bool)
    kept[:, 3:] = True
    kept[0, 3] = False  # rows may differ in how many they prune
    kept[2, 2] = True
    W_sg, mask = sparsegpt_prune(W.float(), H, mask=kept, dampening=1e-9)
    assert torch.equal(mask, kept)
    W_ls = _ls_resolve(W, X, kept)
    torch.testing.assert_close(W_sg.double(), W_ls, atol=2e-4, rtol=1e-4)


def test_least_squares_resolve_never_worse_than_sparsegpt_and_sparsegpt_beats_plain_masking():
    W, X, H = _layer(rows=6, cols=16, tokens=128, seed=1)
    for kw in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        W_sg, kept = sparsegpt_prune(W.float(), H, dampening=1e-9, **kw)
        loss_sg = reconstruction_loss(W, W_sg, H)
        loss_ls = reconstruction_loss(W, _ls_resolve(W, X, kept), H)
        loss_mask = reconstruction_loss(W, W * kept, H)
        assert loss_ls <= loss_sg * (1 + 1e-5) + 1e-9
        assert loss_sg < loss_mask


def test_lazy_batch_updates_equal_the_column_by_column_sweep():
    W, _, H = _layer(rows=5, cols=24, tokens=96, seed=2)
    kept = torch.rand(5, 24, generator=torch.Generator().manual_seed(3)) > 0.5
    results = [sparsegpt_prune(W.float(), H, mask=kept, blocksize=b)[0] for b in (1, 5, 8, 128)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-5)


def test_masks_hold_their_pattern_and_sparsity():
    W, _, H = _layer(rows=8, cols=22, tokens=96, seed=4)
    W_nm, kept = sparsegpt_prune(W.float(), H, nm=(2, 4), blocksize=6)  # blocksize rounds to 4
    assert satisfies_nm(W_nm, 2, 4)
    assert kept[:, 20:].all()  # trailing partial group stays dense
    assert torch.equal(W_nm != 0, kept)
    W_u, kept_u = sparsegpt_prune(W.float(), H, sparsity=0.7, blocksize=8)
    assert (W_u == 0).float().mean() >= 0.7
    for i1 in range(0, 22, 8):  # one threshold per block over rows x columns: each block >= 70%
        assert (~kept_u[:, i1:i1 + 8]).float().mean() >= 0.7 - 1e-6


def test_dead_input_channels_are_pruned_and_zeroed():
    W, X, _ = _layer(rows=3, cols=8, tokens=32, seed=5)
    X[2] = 0.0
    H = 2.0 / 32 * X @ X.T
    H2, W2 = prepare_hessian(H, W, 0.01)
    assert (W2[:, 2] == 0).all() and H2[2, 2] > 0
    _, kept = sparsegpt_prune(W.float(), H, nm=(2, 4))
    assert not kept[:, 2].any()


def test_settings_are_checked():
    from squeeze.passes import get_pass

    cls = get_pass("sparsegpt")
    with pytest.raises(SqueezeError, match="blocksize"):
        cls(pattern="2:4", blocksize=0)
    with pytest.raises(SqueezeError, match="dampening"):
        cls(pattern="2:4", dampening=-1)
    with pytest.raises(SqueezeError, match="exactly one"):
        cls()
