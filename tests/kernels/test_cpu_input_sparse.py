"""squeeze.kernels.cpu_input_sparse: bag and gather input-sparse linears against F.linear, and the
plan's dispatch (bag / gather / the caller's dense)."""

import pytest
import torch
import torch.nn.functional as F

from squeeze.kernels.cpu_input_sparse import (
    InputSparsePlan,
    input_sparse_linear_cpu,
    linear_rows_bag,
    linear_rows_gather,
    plan_for,
)


def _case(dtype, tokens, active, shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 300, generator=g).to(dtype)  # 300 inputs: gather runs 3 blocks of 128
    b = torch.randn(40, generator=g).to(dtype)
    x = torch.randn(tokens, 300, generator=g).to(dtype)
    keep = torch.rand(1 if shared else tokens, 300, generator=g) < active
    x = x * keep.to(dtype)
    x[0] = 0  # a token with no active input
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("shared", [True, False])
def test_bag_and_gather_match_dense(dtype, tokens, shared):
    x, w, b = _case(dtype, tokens, 0.3, shared)
    want = F.linear(x.float(), w.float(), b.float())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    wt = w.t().contiguous()
    got_bag = linear_rows_bag(x, wt, b)
    idx = (x != 0).any(0).nonzero().flatten()
    got_gather = linear_rows_gather(x, wt, idx, b, block_rows=128)
    for got in (got_bag, got_gather):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_dispatch_follows_the_plan(monkeypatch):
    import squeeze.kernels.cpu_input_sparse as mod

    x, w, b = _case(torch.float32, 4, 0.2, shared=True)
    wt = w.t().contiguous()
    seen = []
    for name in ("linear_rows_bag", "linear_rows_gather"):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: seen.append(_n) or _o(*a, **k))
    dense_calls = []

    def dense(x_):
        dense_calls.append(1)
        return F.linear(x_, w, b)

    nnz_rows = float((x != 0).sum()) / x.shape[1]  # about 4 x 0.2
    union = float((x != 0).any(0).sum()) / x.shape[1]
    want = F.linear(x, w, b)
    for plan, expect in ((InputSparsePlan(nnz_rows + 0.01, 0.0), "linear_rows_bag"),
                         (InputSparsePlan(nnz_rows - 0.01, union + 0.01), "linear_rows_gather"),
                         (InputSparsePlan(nnz_rows - 0.01, union - 0.01), "dense")):
        seen.clear(), dense_calls.clear()
        got = input_sparse_linear_cpu(x, wt, b, dense=dense, plan=plan)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (seen == [expect]) if expect != "dense" else (not seen and dense_calls == [1])


def test_plan_buckets():
    assert plan_for(torch.float32, 9) is None  # prefill-sized: dense
    assert plan_for(torch.float32, 3) == plan_for(torch.float32, 4)
    assert plan_for(torch.float16, 1).bag_rows <= plan_for(torch.float32, 1).bag_rows  # unmeasured: careful
