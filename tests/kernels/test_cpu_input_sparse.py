"""squeeze.kernels.cpu_input_sparse: bag and gather input-sparse linears against F.linear, and the
plan's dispatch (bag / gather / the caller's dense). The bag runs our C kernel where it is built
and torch's embedding bags otherwise: every test here runs both."""

import pytest
import torch
import torch.nn.functional as F

from squeeze.kernels import cpu_native

from squeeze.kernels.cpu_input_sparse import (
    InputSparsePlan,
    input_sparse_linear_cpu,
    linear_rows_bag,
    linear_rows_gather,
    plan_for,
)


@pytest.fixture(autouse=True, params=["native", "torch bags"])
def bag_kernel(request, monkeypatch):
    """Which kernel the bags run on; the list of native row-sum calls made (none on torch's)."""
    calls = []
    if request.param == "native":
        if cpu_native.library() is None:
            pytest.skip(f"our native kernels are unavailable here: {cpu_native.unavailable_reason()}")
        f = cpu_native.rows_mv
        monkeypatch.setattr(cpu_native, "rows_mv", lambda *a, **k: calls.append(1) or f(*a, **k))
    else:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    return request.param, calls


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
def test_bag_and_gather_match_dense(dtype, tokens, shared, bag_kernel):
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
    assert len(bag_kernel[1]) == (bag_kernel[0] == "native")  # the bag ran the kernel it was meant to


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_threads, tokens, blocks", [(4, 1, 4), (4, 2, 2), (4, 3, 1), (3, 1, 2), (1, 1, 1)])
def test_bag_splits_columns_across_threads(threads, dtype, n_threads, tokens, blocks):
    """With fewer tokens than threads a token's bag is split into column blocks (torch gives a bag
    one thread): one per thread when that divides the outputs into blocks of >= 256 (1024 into 3
    does not: 2 blocks), and the product is the one-block product."""
    from squeeze.kernels.cpu_input_sparse import bag_blocks, nonzero_entries

    threads(n_threads)
    g = torch.Generator().manual_seed(1)
    wt = torch.randn(300, 1024, generator=g).to(dtype)
    x = (torch.randn(tokens, 300, generator=g) * (torch.rand(tokens, 300, generator=g) < 0.3)).to(dtype)
    x[-1] = 0  # a token with no active input
    assert bag_blocks(tokens, 1024) == blocks
    got = linear_rows_bag(x, wt)
    threads(1)
    want = linear_rows_bag(x, wt)  # one block
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), x.float() @ wt.float(), rtol=tol * 4, atol=tol * 4)
    torch.testing.assert_close(linear_rows_bag(x, wt, entries=nonzero_entries(x)), want, rtol=0, atol=0)


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
