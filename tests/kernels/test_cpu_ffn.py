"""CPU fast path: SparseFFNWorkspace methods vs reference, the dense fallback decision, calibration."""

import pytest
import torch
from squeeze.kernels import (
    FFNPlan,
    SparseFFNWorkspace,
    default_plan,
    sparse_ffn_from_indices,
    sparse_ffn_reference,
)
from squeeze.kernels.cpu_ffn import measure_plan

from tests.kernels.helpers import assert_close, f32, ffn_weights

H, I = 64, 300
METHODS = [FFNPlan(gu, dn, 1.0) for gu in ("dot", "gather", "dense") for dn in ("bag", "gather")]


def _ws(dtype, act="swiglu", with_down=False, **kw):
    x, wg, wu, wd = ffn_weights(8, H, I, dtype, seed=3)
    w_down = wd.t().contiguous() if with_down else None
    return x, SparseFFNWorkspace(wg, wu, wd, act, w_down=w_down, max_tokens=8, block_rows=32, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["swiglu", "relu", "drelu"])
def test_every_method_matches_reference(dtype, act):
    x, ws = _ws(dtype, act)
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 8):
        # 100 active neurons: several 32-row blocks plus a ragged one; unsorted ids
        idx = torch.randperm(I, generator=gen)[:100]
        ref = sparse_ffn_reference(*f32(x[:tokens], ws.w_gate, ws.w_up, ws.w_downT), idx, act)
        for plan in METHODS:
            y = ws.sparse(x[:tokens], idx, plan)
            assert y.shape == (tokens, H)
            assert_close(y, ref, dtype)


def test_fp32_is_tight():
    x, ws = _ws(torch.float32)
    idx = torch.arange(0, I, 3)
    ref = sparse_ffn_reference(x[:2].double(), ws.w_gate.double(), ws.w_up.double(), ws.w_downT.double(), idx, "swiglu")
    for plan in METHODS:
        torch.testing.assert_close(ws.sparse(x[:2], idx, plan).double(), ref, rtol=1e-5, atol=1e-6)


def test_buffers_are_reused_across_calls():
    x, ws = _ws(torch.float32)
    ptrs = (ws._row_buf.data_ptr(), ws._gu.data_ptr(), ws._h.data_ptr())
    outs = []
    for n in (10, 250, 40):
        idx = torch.arange(n)
        for plan in METHODS:
            outs.append(ws.sparse(x[:4], idx, plan))
            ref = sparse_ffn_reference(x[:4], ws.w_gate, ws.w_up, ws.w_downT, idx, "swiglu")
            assert_close(outs[-1], ref, torch.float32)
    assert (ws._row_buf.data_ptr(), ws._gu.data_ptr(), ws._h.data_ptr()) == ptrs
    # results returned earlier must not be overwritten by later calls on the same buffers
    idx = torch.arange(10)
    assert_close(outs[0], sparse_ffn_reference(x[:4], ws.w_gate, ws.w_up, ws.w_downT, idx, "swiglu"), torch.float32)


@pytest.mark.parametrize("with_down", [False, True])
def test_fallback_decision_and_equivalence(with_down):
    x, ws = _ws(torch.float32, with_down=with_down, plans={1: FFNPlan("dot", "bag", 0.5)})
    calls = []
    real_sparse, real_dense = ws.sparse, ws.dense
    ws.sparse = lambda *a, **k: calls.append("sparse") or real_sparse(*a, **k)
    ws.dense = lambda *a, **k: calls.append("dense") or real_dense(*a, **k)
    few, many = torch.arange(0, 150), torch.arange(0, 151)  # 50% of 300 is the break-even
    assert ws.use_sparse(150, 1) and not ws.use_sparse(151, 1)
    y_few = ws(x[:1], few)
    y_many = ws(x[:1], many)
    assert calls == ["sparse", "dense"]
    # the dense fallback zeroes the neurons outside the active set: same function either way
    assert_close(y_many, sparse_ffn_reference(x[:1], ws.w_gate, ws.w_up, ws.w_downT, many, "swiglu"), torch.float32)
    assert_close(y_few, sparse_ffn_reference(x[:1], ws.w_gate, ws.w_up, ws.w_downT, few, "swiglu"), torch.float32)
    assert_close(ws(x[:1], many, force="sparse"), y_many, torch.float32)
    mask = torch.zeros(I, dtype=torch.bool)
    mask[few] = True
    assert torch.equal(ws(x[:1], mask=mask), y_few)


def test_default_plans_cover_measured_cases():
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 2, 3, 8, 16, 64):
            plan = default_plan(dtype, tokens)
            assert plan.gate_up in ("dot", "gather", "dense") and plan.down in ("bag", "gather")
            assert 0.0 <= plan.max_active <= 1.0
    assert default_plan(torch.float32, 65).max_active == 0.0  # more than 64 tokens: dense
    # one token is where sparsity pays most: its break-even is at least as high as 64 tokens'
    assert default_plan(torch.bfloat16, 1).max_active >= default_plan(torch.bfloat16, 64).max_active


def test_calibrate_produces_plans():
    _, ws = _ws(torch.float32)
    plan, rows = measure_plan(ws, 2, (0.1, 0.5, 0.9), repeats=1)
    assert len(rows) == 3 and all(len(r[2]) == 6 for r in rows)
    assert plan.max_active in (0.0, 0.1, 0.5, 0.9)
    plans = ws.calibrate(tokens=(1,), fractions=(0.2, 0.6), repeats=1)
    assert 1 in plans and ws.plan(1) is plans[1]


def test_workspace_argument_errors():
    x, ws = _ws(torch.float32)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        ws(torch.randn(9, H), torch.arange(3))
    with pytest.raises(ValueError, match="exactly one"):
        ws(x[:1])
    with pytest.raises(ValueError, match="w_up"):
        SparseFFNWorkspace(ws.w_gate, ws.w_up[:10], ws.w_downT)


def test_op_cpu_path_with_count():
    x, wg, wu, wd = ffn_weights(2, H, I, torch.float32, seed=8)
    idx = torch.randperm(I)
    y = sparse_ffn_from_indices(x, wg, wu, wd, idx, "relu", torch.tensor([17]))
    assert_close(y, sparse_ffn_reference(x, wg, wu, wd, idx[:17], "relu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_workspace_chunk_matches_reference_and_keeps_leading_dims(dtype):
    from squeeze.kernels import chunk_sparse_ffn_reference

    x, ws = _ws(dtype, act="relu")
    xb = x.view(2, 4, H)
    for plans in ({8: FFNPlan("gather", "gather", 1.0)}, {8: FFNPlan("dot", "bag", 1.0)},
                  {8: FFNPlan("gather", "bag", 0.0)}):  # the last one always falls back to dense
        ws.plans = plans
        for thr, on in ((None, "h"), (0.05, "gate"), (0.02, "h")):
            y = ws.chunk(xb, thr, on)
            assert y.shape == (2, 4, H)
            ref = chunk_sparse_ffn_reference(*f32(x, ws.w_gate, ws.w_up, ws.w_downT), "relu", thr, on)
            assert_close(y.reshape(8, H), ref, dtype)
