"""Weight-only quantized linear: format helpers, Triton kernels (interpreter) vs the fp32 reference,
the torch path, the custom op.

Shapes are small with ragged edges: N = 40 is not a multiple of the 64-row tile, K = 200 is not a
multiple of the 64-column tile, and the groups cover three cases for the interpreter's BLOCK_K = 64:
g = 64 (scale once per tile; the last group has 200 - 192 = 8 columns), g = K (per-channel) and
g = 48 (groups straddle tiles: every column gathers its own scale and zero).
"""

import pytest
import torch
import torch.nn.functional as F
from squeeze.kernels import (
    dequantize_24_reference,
    dequantize_reference,
    pack_24,
    pack_int4,
    quant_bytes,
    quant_linear,
    quant_linear_24,
    quant_linear_reference,
    unpack_int4,
)
from squeeze.kernels import quant_matmul

from tests.kernels.helpers import needs_triton, rand_24

FORMATS = [("int8", True), ("int8", False), ("int4", True), ("int4", False)]
GROUPS = {"g64_partial": (200, 64), "per_channel": (200, 200), "g48_straddling": (200, 48)}


def _quant_case(fmt: str, symmetric: bool, n: int, k: int, group_size: int, seed: int = 0):
    """Random codes over each format's whole range, scales as a quantizer would make them."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    zero = None
    if fmt == "fp8":
        codes = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = torch.rand(n, groups, generator=g) / 448 + 1e-3
        return codes, scale, zero, 8
    if fmt == "int8":
        if symmetric:
            codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        else:
            codes = torch.randint(0, 256, (n, k), generator=g).to(torch.uint8)
            zero = torch.randint(0, 256, (n, groups), generator=g).to(torch.uint8)
        scale = torch.rand(n, groups, generator=g) / 127 + 1e-3
        return codes, scale, zero, 8
    u = torch.randint(1 if symmetric else 0, 16, (n, k), generator=g)
    if not symmetric:
        zero = torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8)
    scale = torch.rand(n, groups, generator=g) / 7 + 1e-2
    return pack_int4(u), scale, zero, 4


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


def assert_within_bound(y, x, w, bias, ref, dtype):
    """|y - ref| <= (2 eps_d + K eps_32) * (|x| @ |W|^T + |bias|), element-wise.

    eps_d (one ulp of x's dtype at 1, twice the unit roundoff) covers rounding a dequantized weight
    to x's dtype before a 16-bit tl.dot and rounding y to x's dtype (the interpreter's truncating
    fp32 -> bf16 cast included); K eps_32 covers fp32 accumulation over K terms (the classic
    gamma_K bound with a factor 2 to spare). x is already in its dtype, so the reference sees the
    same x. Nothing here is fitted to observed errors.
    """
    k = x.shape[-1]
    mag = x.float().abs() @ w.abs().T
    if bias is not None:
        mag = mag + bias.float().abs()
    bound = (2 * torch.finfo(dtype).eps + k * torch.finfo(torch.float32).eps) * mag + 1e-30
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {float(err.max()):.3e} exceeds the derived bound ({worst:.2f}x of it)"


def _run_and_check(fmt, symmetric, m, n, k, group_size, dtype, seed=0, bias=True, **kw):
    from squeeze.kernels._quant_triton import quant_linear_triton

    codes, scale, zero, bits = _quant_case(fmt, symmetric, n, k, group_size, seed)
    x, b = _inputs(m, n, k, dtype, seed)
    b = b if bias else None
    w = dequantize_reference(codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size, K=k)
    ref = quant_linear_reference(x, codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size, bias=b)
    y = quant_linear_triton(x, codes, scale, zero, b, fmt=fmt, symmetric=symmetric, group_size=group_size, **kw)
    assert_within_bound(y, x, w, b, ref, dtype)
    return y


# ---------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 8, 17])  # CUDA-core decode, CUDA-core decode, tl.dot decode, prefill
@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
@pytest.mark.parametrize("fmt,symmetric", FORMATS, ids=[f"{f}_{'sym' if s else 'asym'}" for f, s in FORMATS])
def test_kernel_matches_reference(fmt, symmetric, groups, m, dtype):
    k, group_size = GROUPS[groups]
    _run_and_check(fmt, symmetric, m, 40, k, group_size, dtype, seed=m, bias=m != 3)
    if m <= 16:
        # split-K over 3 slices: with BLOCK_K 64 and K 200 the slices are [0, 128), [128, 200) and an
        # empty one, which must still write its (zero) partial tile
        _run_and_check(fmt, symmetric, m, 40, k, group_size, dtype, seed=m, split_k=3)


@needs_triton
@pytest.mark.parametrize("k,group_size", [(201, 64), (45, 15), (1, 1)])
@pytest.mark.parametrize("m", [1, 8, 17])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_odd_k(symmetric, m, k, group_size):
    # (45, 15): K is a multiple of g, so the pad nibble's column K would name group G, one past the
    # scales; the per-column scale loads must mask it
    _run_and_check("int4", symmetric, m, 24, k, group_size, torch.float32, seed=k + m)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 8, 17])
def test_fp8_e4m3(m, dtype):
    # the interpreter loads float8_e4m3fn exactly (all 254 finite codes checked by hand; NaN codes
    # are not preserved, and a quantizer never writes them)
    _run_and_check("fp8", True, m, 40, 200, 64, dtype, seed=m)
    _run_and_check("fp8", True, m, 40, 200, 48, dtype, seed=m)


@needs_triton
@pytest.mark.parametrize("m", [2, 8, 17])
@pytest.mark.parametrize("fmt,symmetric", [("int4", False), ("int8", True)], ids=["int4_asym", "int8_sym"])
def test_bf16_upcast_under_interpreter(fmt, symmetric, m):
    # the interpreter's bf16 arithmetic is wrong; the kernel upcasts x right after loading
    _run_and_check(fmt, symmetric, m, 40, 200, 64, torch.bfloat16, seed=m)


@needs_triton
def test_paths_agree_on_every_row_count():
    # the three launches (CUDA-core decode, tl.dot decode, prefill) on the same rows
    from squeeze.kernels._quant_triton import quant_linear_triton

    codes, scale, zero, _ = _quant_case("int4", False, 40, 200, 64, seed=3)
    x, b = _inputs(5, 40, 200, torch.float32, seed=3)
    ys = [quant_linear_triton(x, codes, scale, zero, b, fmt="int4", symmetric=False, group_size=64, path=p)
          for p in ("gemv", "splitk", "prefill")]
    ref = quant_linear_reference(x, codes, scale, zero, bits=4, symmetric=False, group_size=64, bias=b)
    w = dequantize_reference(codes, scale, zero, bits=4, symmetric=False, group_size=64, K=200)
    for y in ys:
        assert_within_bound(y, x, w, b, ref, torch.float32)


def _poisoned(t: torch.Tensor, pad_rows: int, pad_cols: int, fill) -> torch.Tensor:
    """``t`` as a view into a larger buffer whose extra rows and columns hold ``fill``: a read past the
    last row or column (which the interpreter does not fault on) pulls the poison in."""
    big = torch.full((t.shape[0] + pad_rows, t.shape[1] + pad_cols), fill, dtype=t.dtype)
    big[: t.shape[0], : t.shape[1]] = t
    return big[: t.shape[0], : t.shape[1]]


@needs_triton
@pytest.mark.parametrize(
    "fmt,symmetric,m,k,group_size,path",
    [
        ("int4", False, 2, 45, 15, "gemv"),  # per-column scales, pad nibble column names group G
        ("int4", True, 8, 201, 64, "splitk"),
        ("int8", False, 17, 200, 48, "prefill"),
        ("int8", True, 3, 200, 64, "gemv"),
    ],
)
def test_loads_are_masked(fmt, symmetric, m, k, group_size, path):
    from squeeze.kernels._quant_triton import quant_linear_triton

    codes, scale, zero, bits = _quant_case(fmt, symmetric, 40, k, group_size, seed=k)
    x, b = _inputs(m, 40, k, torch.float32, seed=k)
    ref = quant_linear_reference(x, codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size, bias=b)
    w = dequantize_reference(codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size, K=k)
    xp = _poisoned(x, 16, 64, float("nan"))
    sp = _poisoned(scale, 8, 4, float("nan"))
    cp = _poisoned(codes, 8, 64, 127 if codes.dtype == torch.int8 else 255)
    zp = None if zero is None else _poisoned(zero, 8, 4, 255)
    assert not xp.is_contiguous() and not sp.is_contiguous() and sp.stride(1) == 1
    y = quant_linear_triton(xp, cp, sp, zp, b, fmt=fmt, symmetric=symmetric, group_size=group_size, path=path,
                            split_k=3 if path != "prefill" else None)
    assert not torch.isnan(y).any()
    assert_within_bound(y, x, w, b, ref, torch.float32)


@needs_triton
def test_triton_backend_leading_dims_and_empty():
    codes, scale, zero, _ = _quant_case("int4", True, 24, 64, 32, seed=5)
    x = torch.randn(2, 3, 64)
    y = quant_linear(x, codes, scale, bits=4, symmetric=True, group_size=32, backend="triton")
    assert y.shape == (2, 3, 24)
    w = dequantize_reference(codes, scale, bits=4, symmetric=True, group_size=32, K=64)
    assert_within_bound(y, x, w, None, F.linear(x, w), torch.float32)
    empty = quant_linear(x[:0], codes, scale, bits=4, symmetric=True, group_size=32, backend="triton")
    assert empty.shape == (0, 3, 24)


# ---------------------------------------------------------------------------------------------------
# Format helpers and the torch path


@pytest.mark.parametrize("k", [1, 2, 7, 64, 201])
def test_unpack_pack_roundtrip_is_exact(k):
    u = torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), u)
    if k % 2:
        assert int((packed[:, -1] >> 4).max()) == 0  # the pad high nibble is zero


def test_pack_int4_byte_layout():
    u = torch.tensor([[1, 2, 3], [15, 0, 9]])
    assert pack_int4(u).tolist() == [[0x21, 0x03], [0x0F, 0x09]]  # low nibble = even column
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[16, 0]]))
    with pytest.raises(ValueError, match="ceil"):
        unpack_int4(pack_int4(u), 5)


def test_dequantize_reference_by_hand():
    # int4 symmetric, K = 3, g = 2: groups {0, 1} and the partial {2}
    w = dequantize_reference(pack_int4(torch.tensor([[9, 7, 15]])), torch.tensor([[0.5, 2.0]]),
                             bits=4, symmetric=True, group_size=2, K=3)
    assert w.tolist() == [[0.5, -0.5, 14.0]]
    # int4 asymmetric
    w = dequantize_reference(pack_int4(torch.tensor([[0, 15, 4]])), torch.tensor([[0.25, 1.0]]),
                             torch.tensor([[3, 4]], dtype=torch.uint8), bits=4, symmetric=False, group_size=2, K=3)
    assert w.tolist() == [[-0.75, 3.0, 0.0]]
    # int8 symmetric, per-channel
    w = dequantize_reference(torch.tensor([[-127, 0, 127]], dtype=torch.int8), torch.tensor([[0.5]]),
                             bits=8, symmetric=True, group_size=3)
    assert w.tolist() == [[-63.5, 0.0, 63.5]]
    # int8 asymmetric, two groups
    w = dequantize_reference(torch.tensor([[0, 255, 128, 130]], dtype=torch.uint8), torch.tensor([[1.0, 0.5]]),
                             torch.tensor([[128, 128]], dtype=torch.uint8), bits=8, symmetric=False, group_size=2)
    assert w.tolist() == [[-128.0, 127.0, 0.0, 1.0]]
    # fp8 e4m3
    q = torch.tensor([[1.5, -448.0]]).to(torch.float8_e4m3fn)
    w = dequantize_reference(q, torch.tensor([[2.0]]), bits=8, symmetric=True, group_size=2)
    assert w.tolist() == [[3.0, -896.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,symmetric", FORMATS + [("fp8", True)])
def test_torch_backend_is_dequantize_then_f_linear(fmt, symmetric, dtype):
    codes, scale, zero, bits = _quant_case(fmt, symmetric, 24, 72, 32, seed=2)
    x, b = _inputs(5, 24, 72, dtype, seed=2)
    w = dequantize_reference(codes, scale, zero, bits=bits, symmetric=symmetric, group_size=32, K=72)
    expect = F.linear(x, w.to(dtype), b)
    kw = dict(bits=bits, symmetric=symmetric, group_size=32, bias=b)
    for backend in ("torch", "auto"):  # auto on CPU tensors is the torch path
        y = quant_linear(x, codes, scale, zero, backend=backend, **kw)
        assert torch.equal(y, expect), backend
    ref = quant_linear_reference(x, codes, scale, zero, **kw)
    assert_within_bound(expect, x, w, b, ref, dtype)


def test_leading_dims_torch_backend():
    codes, scale, zero, _ = _quant_case("int8", False, 16, 32, 8, seed=4)
    x = torch.randn(2, 3, 4, 32)
    y = quant_linear(x, codes, scale, zero, bits=8, symmetric=False, group_size=8)
    assert y.shape == (2, 3, 4, 16)
    ref = quant_linear_reference(x, codes, scale, zero, bits=8, symmetric=False, group_size=8)
    w = dequantize_reference(codes, scale, zero, bits=8, symmetric=False, group_size=8)
    assert_within_bound(y, x, w, None, ref, torch.float32)


def test_argument_errors():
    codes, scale, zero, _ = _quant_case("int4", False, 16, 64, 32)
    x = torch.randn(3, 64)
    kw = dict(bits=4, symmetric=False, group_size=32)
    with pytest.raises(ValueError, match="K=60"):
        quant_linear(x[:, :60], codes, scale, zero, **kw)
    with pytest.raises(ValueError, match="zero"):
        quant_linear(x, codes, scale, None, **kw)
    with pytest.raises(ValueError, match="no zero"):
        quant_linear(x, codes, scale, zero, bits=4, symmetric=True, group_size=32)
    with pytest.raises(ValueError, match="scale"):
        quant_linear(x, codes, scale[:, :1], zero, **kw)
    with pytest.raises(ValueError, match="scale"):
        quant_linear(x, codes, scale.half(), zero, **kw)
    with pytest.raises(ValueError, match="torch.int8"):
        quant_linear(x, codes, scale, None, bits=8, symmetric=True, group_size=32)
    with pytest.raises(ValueError, match="bits"):
        quant_linear(x, codes, scale, zero, bits=3, symmetric=False, group_size=32)
    with pytest.raises(ValueError, match="bias"):
        quant_linear(x, codes, scale, zero, bias=torch.zeros(5), **kw)
    with pytest.raises(ValueError, match="x must be"):
        quant_linear(x.double(), codes, scale, zero, **kw)
    with pytest.raises(ValueError, match="backend"):
        quant_linear(x, codes, scale, zero, backend="cuda", **kw)
    with pytest.raises(ValueError, match="K is needed"):
        dequantize_reference(codes, scale, zero, **kw)


def test_custom_op_opcheck_and_fake_shapes():
    codes, scale, zero, _ = _quant_case("int4", False, 16, 64, 32)
    x, b = _inputs(3, 16, 64, torch.float32)
    torch.library.opcheck(torch.ops.squeeze.quant_linear.default, (x, codes, scale, zero, b, 4, False, 32))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.empty(2, 5, 64, dtype=torch.bfloat16))
        fc = mode.from_tensor(codes)
        fs = mode.from_tensor(scale)
        out = torch.ops.squeeze.quant_linear(fx, fc, fs, None, None, 4, True, 32)
    assert out.shape == (2, 5, 16) and out.dtype == torch.bfloat16


def test_compiles_fullgraph():
    codes, scale, zero, _ = _quant_case("int8", True, 16, 64, 64, seed=9)
    x, b = _inputs(4, 16, 64, torch.float32, seed=9)

    def f(x):
        return torch.relu(quant_linear(x, codes, scale, bits=8, symmetric=True, group_size=64, bias=b)) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_documented_byte_bound():
    # the table in quant_matmul's docstring (4096 x 11008 layer, H100 at 3.35 TB/s)
    n, k = 11008, 4096
    cases = {
        "90.18 MB": quant_bytes(n, k, bits=16),
        "45.13 MB": quant_bytes(n, k, bits=8),
        "46.50 MB": quant_bytes(n, k, bits=8, group_size=128),
        "46.85 MB": quant_bytes(n, k, bits=8, group_size=128, symmetric=False),
        "23.95 MB": quant_bytes(n, k, bits=4, group_size=128),
        "24.31 MB": quant_bytes(n, k, bits=4, group_size=128, symmetric=False),
    }
    doc = quant_matmul.__doc__
    for text, nbytes in cases.items():
        assert f"{nbytes / 1e6:.2f} MB" == text and text in doc
    assert quant_bytes(k, n, bits=4, group_size=128, symmetric=False) == cases["24.31 MB"]  # down proj: same
    assert f"{cases['24.31 MB'] / 3.35e12 * 1e6:.2f} us" == "7.26 us" and "7.26 us" in doc
    sparse = quant_bytes(n, k, bits=8, group_size=128, sparse24=True)
    assert f"{sparse / 1e6:.2f} MB" == "29.59 MB" and "29.59 MB" in doc


# ---------------------------------------------------------------------------------------------------
# 2:4 + int8

GROUPS_24 = {"g64_partial": (200, 64), "per_channel": (200, 200), "g48_straddling": (200, 48),
             "k_mod8_4_g16": (68, 16)}  # K % 8 == 4: the last meta byte holds one group


def _q24_case(n: int, k: int, group_size: int, seed: int = 0):
    """pack_24 of a 2:4 int8 code matrix (groups with 0-2 nonzeros, codes over [-127, 127])."""
    g = torch.Generator().manual_seed(seed)
    keep = rand_24(n, k, torch.float32, seed=seed, fill="mixed") != 0
    codes = torch.where(keep, torch.randint(-127, 128, (n, k), generator=g), 0).to(torch.int8)
    values, meta = pack_24(codes)
    scale = torch.rand(n, -(-k // group_size), generator=g) / 127 + 1e-3
    return values, meta, scale


def _run_and_check_24(m, n, k, group_size, dtype, seed=0, bias=True, **kw):
    from squeeze.kernels._quant_triton import quant_linear_24_triton

    values, meta, scale = _q24_case(n, k, group_size, seed)
    x, b = _inputs(m, n, k, dtype, seed)
    b = b if bias else None
    w = dequantize_24_reference(values, meta, scale, group_size=group_size, K=k)
    ref = F.linear(x.float(), w, None if b is None else b.float())
    y = quant_linear_24_triton(x, values, meta, scale, b, group_size=group_size, **kw)
    assert_within_bound(y, x, w, b, ref, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("groups", list(GROUPS_24), ids=list(GROUPS_24))
def test_24_kernel_matches_reference(groups, m, dtype):
    k, group_size = GROUPS_24[groups]
    _run_and_check_24(m, 40, k, group_size, dtype, seed=m + k, bias=m != 3)
    if m <= 16:
        _run_and_check_24(m, 40, k, group_size, dtype, seed=m + k, split_k=3)


@needs_triton
@pytest.mark.parametrize("m", [2, 17])
def test_24_bf16(m):
    _run_and_check_24(m, 40, 200, 64, torch.bfloat16, seed=m)


@needs_triton
@pytest.mark.parametrize("m,path", [(2, "gemv"), (8, "splitk"), (17, "prefill")])
def test_24_loads_are_masked(m, path):
    from squeeze.kernels._quant_triton import quant_linear_24_triton

    values, meta, scale = _q24_case(40, 68, 16, seed=m)
    x, b = _inputs(m, 40, 68, torch.float32, seed=m)
    w = dequantize_24_reference(values, meta, scale, group_size=16, K=68)
    ref = F.linear(x, w, b)
    y = quant_linear_24_triton(
        _poisoned(x, 16, 64, float("nan")), _poisoned(values, 8, 64, 127), _poisoned(meta, 8, 16, 0xFF),
        _poisoned(scale, 8, 4, float("nan")), b, group_size=16, path=path, split_k=None if m > 16 else 3,
    )
    assert not torch.isnan(y).any()
    assert_within_bound(y, x, w, b, ref, torch.float32)


def test_dequantize_24_reference_by_hand():
    codes = torch.tensor([[0, 5, 0, -3, 7, 0, 0, 0]], dtype=torch.int8)
    values, meta = pack_24(codes)
    w = dequantize_24_reference(values, meta, torch.tensor([[0.5, 2.0]]), group_size=4)
    assert w.tolist() == [[0.0, 2.5, 0.0, -1.5, 14.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_24_torch_backend_is_dequantize_then_f_linear(dtype):
    values, meta, scale = _q24_case(24, 72, 32, seed=2)
    x, b = _inputs(2, 24, 72, dtype, seed=2)
    x = x.reshape(2, 1, 72)  # any leading shape
    expect = F.linear(x, dequantize_24_reference(values, meta, scale, group_size=32).to(dtype), b)
    for backend in ("torch", "auto"):
        y = quant_linear_24(x, values, meta, scale, group_size=32, bias=b, backend=backend)
        assert y.shape == (2, 1, 24) and torch.equal(y, expect), backend


def test_24_argument_errors():
    values, meta, scale = _q24_case(16, 64, 32)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        quant_linear_24(x, values, meta, torch.rand(16, 7), group_size=10)
    with pytest.raises(ValueError, match="int8"):
        quant_linear_24(x, values.to(torch.uint8), meta, scale, group_size=32)
    with pytest.raises(ValueError, match="meta"):
        quant_linear_24(x, values, meta[:, :3], scale, group_size=32)
    with pytest.raises(ValueError, match="K=60"):
        quant_linear_24(x[:, :60], values, meta, scale, group_size=32)


def test_24_custom_op_opcheck_and_compile():
    values, meta, scale = _q24_case(16, 64, 32, seed=3)
    x, b = _inputs(3, 16, 64, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.squeeze.quant_linear_24.default, (x, values, meta, scale, b, 32))

    def f(x):
        return quant_linear_24(x, values, meta, scale, group_size=32, bias=b) * 2

    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x))


@needs_triton
@pytest.mark.parametrize("kw", [{"quantize": "int8"}, {"quantize": "int4", "group_size": 32},
                                {"method": "wanda", "pattern": "2:4", "quantize": "int8", "group_size": 32}])
def test_load_swaps_in_the_triton_kernels(kw, tiny_dir, tiny_calib, tmp_path):
    """What squeeze.load installs on CUDA, run here through the interpreter (fp16: the interpreter's
    bf16 is wrong): whole-weight codes through quant_linear, 2:4 values stored as int8 codes through
    quant_linear_24, both reading the stored tensors; outputs within fp16 rounding of the exact
    decoded model."""
    import squeeze
    from squeeze.formats import open_dense
    from squeeze.runtime.quant import install

    out = squeeze.compress(tiny_dir("llama"), tmp_path / "q", calib=str(tiny_calib), nsamples=4, seqlen=32,
                           dtype="float16", **kw).out
    exact = squeeze.load(out, quant_kernels=False)
    fast = squeeze.load(out, quant_kernels=False)
    ckpt = open_dense(out)
    swapped = install(fast, ckpt.raw, ckpt.packed, "cpu", backend="triton")
    assert swapped == len(ckpt.packed) > 0
    labels = {m.label for m in fast.modules() if type(m).__name__ == "QuantLinear"}
    assert labels == ({"int8-g32 2:4"} if "pattern" in kw else {"int8"} if kw["quantize"] == "int8" else {"int4-g32"})
    eps = torch.finfo(torch.float16).eps
    for name, q in ((n, m) for n, m in fast.named_modules() if type(m).__name__ == "QuantLinear"):
        w = exact.get_submodule(name).weight.float()
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.float16)
        want = x.float() @ w.T
        bound = 2 * eps * (x.float().abs() @ w.abs().T) + 1e-4  # fp16 output rounding + fp32 reordering
        assert ((q(x).float() - want).abs() <= bound).all(), name
