"""Streaming statistics: the float32-per-batch Hessian and its sharing between linears fed one input."""

import torch

from squeeze.calib.stats import HESSIAN_TEMP_BYTES, Hessian, hessian_for


def _batches(n=3, tokens=500, channels=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, channels, generator=g) * torch.linspace(0.1, 5, channels) for _ in range(n)]


def test_hessian_is_xtx_within_the_float32_batch_bound():
    batches = _batches()
    h = Hessian(24)
    for x in batches:
        h.update(x)
    xs = torch.cat(batches).double()
    want = xs.t() @ xs
    # each entry: a float32 dot product of one batch's 500 tokens, then float64 sums of the batches
    bound = 500 * 2.0 ** -24 * (xs.abs().t() @ xs.abs())
    assert h.n == 1500
    assert ((h.xtx - want).abs() <= bound).all()
    assert torch.equal(h.matrix(), h.xtx * (2.0 / 1500))


def test_wide_inputs_are_summed_in_column_chunks_exactly_as_one_product():
    x = torch.randn(64, 1500, dtype=torch.float32)  # 1500 x 12 x 932 = 16 MiB: two slices, the last partial
    assert HESSIAN_TEMP_BYTES // (12 * 1500) == 932
    h = Hessian(x.shape[1])
    h.update(x)
    ref = x.double().t() @ x.double()
    assert h.xtx.shape == ref.shape
    assert torch.allclose(h.xtx, ref, rtol=1e-4, atol=1e-3)


def test_linears_fed_one_tensor_share_one_hessian_that_adds_each_batch_once():
    scratch: dict = {}
    for x_attn, x_o in zip(_batches(seed=1), _batches(seed=2)):
        for name in ("q", "k", "v"):  # the same object, as BlockContext.watch hands it
            hessian_for(scratch, name, x_attn).update(x_attn)
        hessian_for(scratch, "o", x_o).update(x_o)
    assert scratch["q"] is scratch["k"] is scratch["v"] and scratch["o"] is not scratch["q"]
    alone = Hessian(24)
    for x in _batches(seed=1):
        alone.update(x)
    assert scratch["q"].n == alone.n == 1500
    assert torch.equal(scratch["q"].xtx, alone.xtx)


def test_equal_but_distinct_tensors_are_not_shared():
    scratch: dict = {}
    x = _batches(n=1)[0]
    hessian_for(scratch, "a", x).update(x)
    y = x.clone()
    hessian_for(scratch, "b", y).update(y)
    assert scratch["a"] is not scratch["b"] and scratch["a"].n == scratch["b"].n == 500


def test_a_popped_hessian_is_freed():
    """Solvers pop each Hessian as they solve it: nothing else may keep the last one alive."""
    import gc
    import weakref

    scratch: dict = {}
    x = _batches(n=1)[0]
    hessian_for(scratch, "down", x).update(x)
    gone = weakref.ref(scratch.pop("down"))
    gc.collect()
    assert gone() is None
