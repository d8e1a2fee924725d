"""Chunk-level sparse FFN: Triton kernels (interpreter) vs torch reference, custom ops, compile."""

import pytest
import torch
import torch.nn.functional as F
from squeeze.kernels import (
    act_mul,
    active_neurons,
    chunk_sparse_ffn,
    chunk_sparse_ffn_reference,
    dense_ffn_reference,
    sparse_ffn_from_indices,
    sparse_ffn_reference,
)

from tests.kernels.helpers import assert_close, f32, ffn_weights, gap_threshold, needs_triton

H, I = 72, 100  # H not a multiple of the 128-wide H tile, I not a multiple of the 64-neuron block
TOKENS = [1, 3, 8, 64]


def _rule_cases(x, wg, wu):
    """(act, threshold, threshold_on) cases with thresholds placed in gaps of the scores."""
    gate, up = F.linear(x.float(), wg.float()), F.linear(x.float(), wu.float())
    t_h = gap_threshold(act_mul(gate, up, "swiglu").abs().amax(0))
    t_gate = gap_threshold(F.silu(gate).abs().amax(0))
    return [("relu", None, "h"), ("drelu", None, "h"), ("swiglu", t_h, "h"), ("swiglu", t_gate, "gate")]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", TOKENS)
def test_chunk_triton_matches_reference(dtype, tokens):
    from squeeze.kernels._chunk_ffn_triton import chunk_sparse_ffn_triton

    x, wg, wu, wd = ffn_weights(tokens, H, I, dtype, seed=tokens)
    gate, up = F.linear(x.float(), wg.float()), F.linear(x.float(), wu.float())
    for act, thr, on in _rule_cases(x, wg, wu):
        y, idx, count = chunk_sparse_ffn_triton(x, wg, wu, wd, act, thr, on, split=2, return_active=True)
        expect_active = active_neurons(gate, up, act, thr, on)
        n = int(count)
        # the union is a strict, nonempty subset, and exactly the reference's (ascending ids)
        assert 0 < n < I, (act, thr, on, n)
        assert torch.equal(idx[:n].long(), expect_active.nonzero().squeeze(1)), (act, thr, on)
        ref = chunk_sparse_ffn_reference(*f32(x, wg, wu, wd), act, thr, on)
        assert_close(y, ref, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_from_indices_triton_matches_reference(dtype, tokens):
    x, wg, wu, wd = ffn_weights(tokens, H, I, dtype, seed=100 + tokens)
    idx = torch.randperm(I, generator=torch.Generator().manual_seed(tokens))[:37]  # unsorted ids
    for act in ("swiglu", "drelu"):
        y = sparse_ffn_from_indices(x, wg, wu, wd, idx, act, backend="triton")
        assert_close(y, sparse_ffn_reference(*f32(x, wg, wu, wd), idx, act), dtype)


@needs_triton
def test_from_indices_device_count_uses_prefix_only():
    from squeeze.kernels._chunk_ffn_triton import sparse_ffn_from_indices_triton

    x, wg, wu, wd = ffn_weights(3, H, I, torch.float32, seed=5)
    buf = torch.arange(I, dtype=torch.int32).flip(0)  # max-sized buffer, only a prefix is valid
    count = torch.tensor([29], dtype=torch.int32)
    for split in (1, 4):  # device-side balancing of the active rows over the splits
        y = sparse_ffn_from_indices_triton(x, wg, wu, wd, buf, count, "relu", split=split)
        assert_close(y, sparse_ffn_reference(*f32(x, wg, wu, wd), buf[:29], "relu"), torch.float32)
    zero = sparse_ffn_from_indices_triton(x, wg, wu, wd, buf, torch.tensor([0], dtype=torch.int32), "relu")
    assert torch.equal(zero, torch.zeros_like(zero))  # every program exits early; partials are zeros


@needs_triton
def test_compaction_kernel_orders_and_counts():
    from squeeze.kernels._chunk_ffn_triton import active_index_triton

    flags = (torch.rand(2500, generator=torch.Generator().manual_seed(0)) < 0.3).to(torch.int32)
    idx, count = active_index_triton(flags)  # 2500 > one 1024 block: carries the running count
    expect = flags.nonzero().squeeze(1)
    assert int(count) == expect.numel()
    assert torch.equal(idx[: int(count)].long(), expect)


@needs_triton
def test_swiglu_without_threshold_is_dense_and_bf16_runs():
    x, wg, wu, wd = ffn_weights(3, H, I, torch.float32, seed=9)
    y = chunk_sparse_ffn(x, wg, wu, wd, "swiglu", backend="triton")
    assert_close(y, dense_ffn_reference(x, wg, wu, wd, "swiglu"), torch.float32)
    xb, wgb, wub, wdb = (t.bfloat16() for t in (x, wg, wu, wd))
    yb = chunk_sparse_ffn(xb, wgb, wub, wdb, "relu", backend="triton")
    assert_close(yb, chunk_sparse_ffn_reference(*f32(xb, wgb, wub, wdb), "relu"), torch.bfloat16)


def test_reference_semantics():
    x, wg, wu, wd = ffn_weights(4, 16, 40, torch.float64, seed=2)
    # relu kinds without threshold: skipping gate <= 0 neurons is exact
    for act in ("relu", "drelu"):
        assert torch.allclose(chunk_sparse_ffn_reference(x, wg, wu, wd, act), dense_ffn_reference(x, wg, wu, wd, act))
    # thresholded: equals the dense FFN with the non-union neurons zeroed
    gate, up = F.linear(x, wg), F.linear(x, wu)
    h = act_mul(gate, up, "swiglu")
    t = gap_threshold(h.abs().amax(0))
    union = (h.abs() > t).any(0)
    assert 0 < int(union.sum()) < 40
    expect = h.masked_fill(~union, 0) @ wd
    assert torch.allclose(chunk_sparse_ffn_reference(x, wg, wu, wd, "swiglu", t, "h"), expect)


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunk_path_matches_reference(tokens, dtype):
    x, wg, wu, wd = ffn_weights(tokens, 64, 300, dtype, seed=tokens, dead=0.6)
    gate, up = F.linear(x.float(), wg.float()), F.linear(x.float(), wu.float())
    cases = [("relu", None, "h"), ("drelu", None, "h"),
             ("swiglu", gap_threshold(act_mul(gate, up, "swiglu").abs().amax(0)), "h"),
             ("swiglu", gap_threshold(F.silu(gate).abs().amax(0)), "gate")]
    for act, thr, on in cases:
        y = chunk_sparse_ffn(x, wg, wu, wd, act, thr, threshold_on=on)  # custom op -> CPU fast path
        assert_close(y, chunk_sparse_ffn_reference(*f32(x, wg, wu, wd), act, thr, on), dtype)


def test_argument_errors():
    x, wg, wu, wd = ffn_weights(2, 16, 40, torch.float32)
    with pytest.raises(ValueError, match="act"):
        chunk_sparse_ffn(x, wg, wu, wd, "gelu")
    with pytest.raises(ValueError, match="threshold_on"):
        chunk_sparse_ffn(x, wg, wu, wd, "relu", 0.1, threshold_on="up")
    with pytest.raises(ValueError, match="w_downT"):
        chunk_sparse_ffn(x, wg, wu, wd.t(), "relu")
    with pytest.raises(ValueError, match="integer"):
        sparse_ffn_from_indices(x, wg, wu, wd, torch.ones(40, dtype=torch.bool), "relu")


def test_custom_ops_opcheck_and_fake():
    x, wg, wu, wd = ffn_weights(3, 16, 40, torch.float32, seed=1)
    idx = torch.tensor([3, 1, 7, 30])
    torch.library.opcheck(torch.ops.squeeze.chunk_sparse_ffn.default, (x, wg, wu, wd, "relu", None, "h"))
    torch.library.opcheck(torch.ops.squeeze.chunk_sparse_ffn.default, (x, wg, wu, wd, "swiglu", torch.tensor(0.05), "gate"))
    torch.library.opcheck(torch.ops.squeeze.sparse_ffn_from_indices.default, (x, wg, wu, wd, idx, None, "swiglu"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    halves = [t.half() for t in (x, wg, wu, wd)]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in halves]
        out = torch.ops.squeeze.chunk_sparse_ffn(*fake, "relu", None, "h")
        out2 = torch.ops.squeeze.sparse_ffn_from_indices(*fake, mode.from_tensor(idx), None, "relu")
    assert out.shape == out2.shape == (3, 16) and out.dtype == out2.dtype == torch.float16


def test_custom_ops_compile_fullgraph():
    x, wg, wu, wd = ffn_weights(3, 16, 40, torch.float32, seed=4)
    idx = torch.tensor([0, 5, 9, 21, 39])

    def f(x):
        a = chunk_sparse_ffn(x, wg, wu, wd, "relu")
        b = sparse_ffn_from_indices(x, wg, wu, wd, idx, "swiglu")
        return a + 2 * b

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expect = chunk_sparse_ffn_reference(x, wg, wu, wd, "relu") + 2 * sparse_ffn_reference(x, wg, wu, wd, idx, "swiglu")
    assert_close(compiled(x), expect, torch.float32)


@needs_triton
def test_kernels_mask_hidden_tail():
    # weights as views with NaN beyond column H: an unmasked load past H would poison the sums
    x, wg, wu, wd = ffn_weights(3, H, I, torch.float32, seed=12)

    def poison(w):
        big = torch.full((w.shape[0], w.shape[1] + 56), float("nan"))
        big[:, : w.shape[1]] = w
        return big[:, : w.shape[1]]

    pg, pu, pd = poison(wg), poison(wu), poison(wd)
    for act, thr, on in _rule_cases(x, wg, wu):
        y = chunk_sparse_ffn(x, pg, pu, pd, act, thr, threshold_on=on, backend="triton")
        assert not torch.isnan(y).any(), (act, thr, on)
        assert_close(y, chunk_sparse_ffn_reference(x, wg, wu, wd, act, thr, on), torch.float32)
    idx = torch.tensor([5, 77, 3, 99, 0])
    y = sparse_ffn_from_indices(x, pg, pu, pd, idx, "swiglu", backend="triton")
    assert_close(y, sparse_ffn_reference(x, wg, wu, wd, idx, "swiglu"), torch.float32)


@needs_triton
def test_threshold_as_device_tensor_is_read_by_the_kernel():
    x, wg, wu, wd = ffn_weights(3, H, I, torch.float32, seed=21)
    gate, up = F.linear(x, wg), F.linear(x, wu)
    t = gap_threshold(act_mul(gate, up, "swiglu").abs().amax(0))
    ref = chunk_sparse_ffn_reference(x, wg, wu, wd, "swiglu", t, "h")
    for thr in (t, torch.tensor([t]), torch.tensor(t, dtype=torch.float64)):
        y = chunk_sparse_ffn(x, wg, wu, wd, "swiglu", thr, backend="triton")
        assert_close(y, ref, torch.float32)
        assert_close(chunk_sparse_ffn(x, wg, wu, wd, "swiglu", thr), ref, torch.float32)  # CPU op path
