"""2:4 linear: Triton kernels (interpreter) vs reference, exact CPU path, custom op under compile."""

import pytest
import torch
import torch.nn.functional as F
from squeeze.kernels import DenseWeightCache, linear_24, linear_24_reference, pack_24, unpack_24

from tests.kernels.helpers import assert_close, needs_triton, rand_24

# (M, N, K): ragged K (not a multiple of the 64/256-wide tiles, K % 8 == 4), N and M not multiples of blocks
DECODE_SHAPES = [(1, 40, 36), (3, 70, 100), (8, 64, 256), (5, 33, 300)]
PREFILL_SHAPES = [(9, 50, 68), (33, 130, 200), (64, 64, 128)]


def _case(m, n, k, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = rand_24(n, k, dtype, seed=seed, fill="two")
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    values, meta = pack_24(w)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    return x, values, meta, b, ref


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_kernel_matches_reference(dtype, shape):
    from squeeze.kernels._sparse24_triton import linear_24_triton

    x, values, meta, b, ref = _case(*shape, dtype, seed=sum(shape))
    for split in (1, 3):  # one split, and split-K with a ragged last split
        y = linear_24_triton(x, values, meta, b, split_k=split, path="decode")
        assert_close(y, ref, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", PREFILL_SHAPES + [(4, 40, 36)])
def test_prefill_kernel_matches_reference(dtype, shape):
    from squeeze.kernels._sparse24_triton import linear_24_triton

    x, values, meta, b, ref = _case(*shape, dtype, seed=sum(shape), bias=shape[0] % 2 == 1)
    y = linear_24_triton(x, values, meta, b, path="prefill")
    assert_close(y, ref, dtype)


@needs_triton
def test_bf16_upcast_under_interpreter():
    # the interpreter's bf16 arithmetic is wrong; the kernels upcast right after loading
    x, values, meta, b, ref = _case(3, 48, 64, torch.bfloat16, seed=7)
    assert_close(linear_24(x, values, meta, b, backend="triton"), ref, torch.bfloat16)
    x, values, meta, b, ref = _case(17, 48, 64, torch.bfloat16, seed=8)
    assert_close(linear_24(x, values, meta, b, backend="triton"), ref, torch.bfloat16)


@needs_triton
def test_triton_backend_handles_leading_dims_and_mixed_groups():
    w = rand_24(24, 40, torch.float32, seed=3, fill="mixed")  # groups with 0/1 nonzeros too
    values, meta = pack_24(w)
    x = torch.randn(2, 3, 40)
    y = linear_24(x, values, meta, backend="triton")
    assert y.shape == (2, 3, 24)
    assert_close(y, F.linear(x, w), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_is_exactly_f_linear(dtype):
    x, values, meta, b, _ = _case(5, 48, 68, dtype, seed=11)
    expect = F.linear(x, unpack_24(values, meta), b)
    for backend in ("auto", "cpu", "torch"):
        y = linear_24(x, values, meta, b, backend=backend)
        assert y.dtype == dtype
        assert torch.equal(y, expect), backend


def test_dense_weight_cache_reuses_and_invalidates():
    x, values, meta, b, _ = _case(2, 32, 64, torch.float32, seed=5)
    cache = DenseWeightCache()
    y1 = linear_24(x, values, meta, b, cache=cache)
    first = cache.get(values, meta)
    assert cache.get(values, meta) is first  # reused
    assert torch.equal(y1, F.linear(x, unpack_24(values, meta), b))
    values.mul_(2)  # in-place edit bumps the version counter -> rebuilt
    y2 = linear_24(x, values, meta, b, cache=cache)
    assert cache.get(values, meta) is not first
    assert torch.equal(y2, F.linear(x, unpack_24(values, meta), b))


def test_argument_errors():
    x, values, meta, b, _ = _case(2, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="K=60"):
        linear_24(x[:, :60], values, meta)
    with pytest.raises(ValueError, match="dtype"):
        linear_24(x.half(), values, meta)
    with pytest.raises(ValueError, match="bias"):
        linear_24(x, values, meta, b[:5])
    with pytest.raises(ValueError, match="backend"):
        linear_24(x, values, meta, backend="cuda")


def test_custom_op_opcheck_and_fake_shapes():
    x, values, meta, b, _ = _case(3, 32, 64, torch.float32)
    torch.library.opcheck(torch.ops.squeeze.linear_24.default, (x, values, meta, b))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.empty(2, 5, 64, dtype=torch.bfloat16))
        fv = mode.from_tensor(torch.empty(32, 32, dtype=torch.bfloat16))
        fm = mode.from_tensor(torch.empty(32, 8, dtype=torch.uint8))
        out = torch.ops.squeeze.linear_24(fx, fv, fm, None)
    assert out.shape == (2, 5, 32) and out.dtype == torch.bfloat16


def test_compiles_fullgraph():
    x, values, meta, b, _ = _case(4, 32, 64, torch.float32, seed=9)

    def f(x, values, meta, b):
        return torch.relu(linear_24(x, values, meta, b)) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, values, meta, b), f(x, values, meta, b))


def test_reference_matches_dense_linear():
    x, values, meta, b, ref = _case(3, 16, 32, torch.float32)
    assert_close(linear_24_reference(x, values, meta, b), ref, torch.float32)


def _poisoned_view(t: torch.Tensor, pad_cols: int, fill) -> torch.Tensor:
    """``t`` as a view into a wider buffer whose extra columns hold ``fill``: an unmasked read past
    the last column (which the interpreter would not fault on) pulls the poison into the result."""
    big = torch.full((t.shape[0], t.shape[1] + pad_cols), fill, dtype=t.dtype)
    big[:, : t.shape[1]] = t
    return big[:, : t.shape[1]]


@needs_triton
@pytest.mark.parametrize("shape", [(2, 40, 36), (12, 40, 36)])
def test_kernels_mask_reduction_tail(shape):
    x, values, meta, b, ref = _case(*shape, torch.float32, seed=1)
    xp = _poisoned_view(x, 64, float("nan"))
    vp = _poisoned_view(values, 64, float("nan"))
    mp = _poisoned_view(meta, 16, 0xFF)
    assert not xp.is_contiguous()
    y = linear_24(xp, vp, mp, b, backend="triton")
    assert not torch.isnan(y).any()
    assert_close(y, ref, torch.float32)
