"""squeeze.kernels.quant_cpu: torch's int8 / int4 weight-only CPU ops on our layout, against
x @ dequantize(...).T in float64, within error bounds derived from the dtypes and K; layouts the
ops cannot run come back as None; x of any leading shape, misaligned x, padding of N and K."""

import dataclasses

import pytest
import torch

from squeeze.algorithms.quant import QuantSpec, rtn
from squeeze.kernels import cpu_native, quant_cpu
from squeeze.kernels import (
    int4_linear_cpu,
    int4_rows_linear_cpu,
    int8_linear_cpu,
    int8_rows_linear_cpu,
    quant_rows_supported,
    prepare_int4_cpu,
    prepare_int4_rows_cpu,
    prepare_int8_cpu,
    prepare_int8_rows_cpu,
)

UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _weight(spec, n, k, seed=0, keep=None, positive=False):
    """(W_hat fp32, codes, scale, zero, P): P [n, k] bounds what rounding a scale (and an int4 zero
    term) to x's dtype can move each weight by, in units of that dtype's roundoff."""
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    if positive:  # asymmetric groups then have z = 0, far from the op's offset 8
        W = W.abs()
    W_hat, codes, s, z = rtn(W, spec, keep)
    g = spec.group_size or k
    s_k = s.repeat_interleave(g, 1)[:, :k]
    if spec.bits == 8:
        P = codes.float().abs() * s_k
    else:  # the op computes (u - 8) * s + zero_term, zero_term = (8 - z) * s, each rounded on its own
        z_k = torch.full((n, k), 8.0) if z is None else z.float().repeat_interleave(g, 1)[:, :k]
        P = ((codes.float() - 8).abs() + (8 - z_k).abs()) * s_k
    return W_hat, codes, s, z, P


def _check(y, x, W_hat, P, bias=None):
    """|y - ref| <= u·|ref| (output rounding) + 2u·|x|P (scales and zero terms in x's dtype, two
    roundings) + (K + 4)·2^-24·|x|(|W| + 2uP) (fp32 products and sums of K terms), per output."""
    dtype, k = x.dtype, x.shape[-1]
    u = UNIT[dtype]
    x2 = x.reshape(-1, k).double()
    ref = x2 @ W_hat.double().T
    if bias is not None:
        ref = ref + bias.double()  # bias in x's dtype: one more rounding, inside u·|ref|
    xa = x2.abs()
    slack = 2 * u * (xa @ P.double().T)
    bound = u * ref.abs() + slack + (k + 4) * 2.0**-24 * (xa @ W_hat.double().abs().T + slack)
    if bias is not None:
        bound = bound + u * bias.double().abs()
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], W_hat.shape[0])
    err = (y.reshape(-1, W_hat.shape[0]).double() - ref).abs()
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"error exceeds the bound by {worst:.3e} (largest error {float(err.max()):.3e})"


@pytest.fixture(params=["native", "torch op"])
def int8_path(request, monkeypatch):
    """Each int8 test through our kernels (squeeze.kernels.cpu_native) and through torch's ops;
    the names of the native calls made ("gemv", "decode"; none on the ops' path) and of the
    decoded panels ("panel", on both)."""
    calls = []
    if request.param == "native":
        if cpu_native.library() is None:
            pytest.skip(f"our native kernels are unavailable here: {cpu_native.unavailable_reason()}")
        for name in ("gemv", "decode"):
            f = getattr(cpu_native, f"int8_{name}")
            monkeypatch.setattr(cpu_native, f"int8_{name}", lambda *a, f=f, name=name: calls.append(name) or f(*a))
    else:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    panel = quant_cpu._panel
    monkeypatch.setattr(quant_cpu, "_panel", lambda *a: calls.append("panel") or panel(*a))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(40, 172), (48, 256), (3, 7)])  # K % 16 != 0 is padded
@pytest.mark.parametrize("lead", [(), (1,), (2, 3), (0,), (2, 20)])  # 40 tokens: the decoded panels' GEMM
def test_int8_matches_the_dequantized_weight(n, k, dtype, lead, int8_path, monkeypatch):
    W_hat, codes, s, _, P = _weight(QuantSpec(8), n, k)
    prepared = prepare_int8_cpu(codes, s)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    monkeypatch.setattr(quant_cpu, "_PANEL_BYTES", 16 * k * x.element_size())  # two or more panels
    _check(int8_linear_cpu(x, prepared), x, W_hat, P)
    _check(int8_linear_cpu(x, prepared, bias), x, W_hat, P, bias)
    native = cpu_native.library() is not None
    prefill = x.numel() >= quant_cpu.INT8_GEMM_TOKENS * k
    decode = 0 < x.numel() and not prefill
    panels = 2 * -(-n // 16) if prefill else 0
    assert int8_path.count("panel") == panels  # prefill-sized calls ran the GEMM, a panel at a time
    assert int8_path.count("decode") == (panels if native and dtype != torch.float16 else 0)
    assert int8_path.count("gemv") == (2 if decode and native else 0)  # bf16 too


ROWS_LAYOUTS = [pytest.param("native", None, marks=pytest.mark.skipif(cpu_native.library() is None,
                                                                     reason="squeeze's C kernels not built here")),
                pytest.param("bags", 1, marks=pytest.mark.skipif(not quant_rows_supported(),
                                                                 reason="torch without the quantized embedding bag")),
                pytest.param("bags", 4, marks=pytest.mark.skipif(not quant_rows_supported(),
                                                                 reason="torch without the quantized embedding bag"))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, active", [(1, 0.3), (1, 1.0), (3, 0.5), (2, 0.0)])
@pytest.mark.parametrize("layout, blocks", ROWS_LAYOUTS)
def test_int8_rows_reads_the_codes_of_nonzero_inputs(dtype, tokens, active, layout, blocks):
    """The activation-sparse int8 path (our row kernel over the codes by input row, or torch's
    quantized embedding bag in column blocks: a bag per thread): the dequantized product within
    the same bound as the int8 op (it rounds less: fp32 scales); an input that is zero everywhere
    gives the bias; with our kernel a token in a batch gives the same bits as alone."""
    n, k = 40, 172
    W_hat, codes, s, _, P = _weight(QuantSpec(8), n, k, seed=4)
    rows = prepare_int8_rows_cpu(prepare_int8_cpu(codes, s), blocks, native=layout == "native")
    assert rows.native == (layout == "native") and rows.in_features == k and rows.out_features == n
    assert rows.rows.shape == ((k, n) if rows.native else (k * blocks, n // blocks + 8))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, k, generator=g) * (torch.rand(tokens, k, generator=g) < active)
    x = x.to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    _check(int8_rows_linear_cpu(x, rows), x, W_hat, P)
    y = int8_rows_linear_cpu(x, rows, bias)
    _check(y, x, W_hat, P, bias)
    if active == 0.0:
        assert torch.equal(y, bias.expand(tokens, n))
    if rows.native:
        assert all(torch.equal(int8_rows_linear_cpu(x[i:i + 1], rows, bias), y[i:i + 1]) for i in range(tokens))


@pytest.mark.parametrize("kernel", [
    pytest.param("native", marks=pytest.mark.skipif(cpu_native.library() is None,
                                                    reason="our C kernels not built here")),
    pytest.param("bags", marks=pytest.mark.skipif(not quant_rows_supported(), reason="torch without the 4-bit bags"))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=32), QuantSpec(4, symmetric=False, group_size=64),
                                  QuantSpec(4)], ids=lambda s: s.name)
@pytest.mark.parametrize("n, tokens, active", [(40, 1, 0.3), (39, 3, 0.5), (40, 2, 0.0)])  # odd N pads a column
def test_int4_rows_reads_the_codes_of_nonzero_inputs(spec, dtype, n, tokens, active, kernel, monkeypatch):
    """int4 by input row (our kernel, or one bag per (token, group of K)), weighed by the group's
    scales (and zero terms times the group's input sum): the dequantized product within the int4
    op's bound; with our kernel a token batched gives the bits it gives alone."""
    if kernel == "bags":
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    k = 256
    W_hat, codes, s, z, P = _weight(spec, n, k, seed=6, positive=not spec.symmetric)
    prepared = prepare_int4_cpu(codes, s, z, spec.group_size)
    rows = prepare_int4_rows_cpu(codes, prepared)
    assert rows.in_features == k and rows.out_features == n and (rows.zero_term is None) == spec.symmetric
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(tokens, k, generator=g) * (torch.rand(tokens, k, generator=g) < active)).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    _check(int4_rows_linear_cpu(x, rows), x, W_hat, P)
    y = int4_rows_linear_cpu(x, rows, bias)
    _check(y, x, W_hat, P, bias)
    if kernel == "native":
        assert all(torch.equal(int4_rows_linear_cpu(x[i:i + 1], rows, bias), y[i:i + 1]) for i in range(tokens))


INT4 = [QuantSpec(4, group_size=32), QuantSpec(4, group_size=64), QuantSpec(4, group_size=128),
        QuantSpec(4, group_size=96), QuantSpec(4), QuantSpec(4, symmetric=False, group_size=128),
        QuantSpec(4, symmetric=False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(64, 256), (40, 172), (16, 100)])  # N % 16 and K % group are padded
@pytest.mark.parametrize("spec", INT4, ids=lambda s: s.name)
def test_int4_matches_the_dequantized_weight(spec, n, k, dtype):
    W_hat, codes, s, z, P = _weight(spec, n, k, seed=3)
    prepared = prepare_int4_cpu(codes, s, z, spec.group_size)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype)
    _check(int4_linear_cpu(x, prepared), x, W_hat, P)
    _check(int4_linear_cpu(x[0, 0], prepared, bias), x[0, 0], W_hat, P, bias)
    _check(int4_linear_cpu(x[:0], prepared), x[:0], W_hat, P)


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=64), QuantSpec(4, symmetric=False, group_size=64)],
                         ids=lambda s: s.name)
def test_int4_with_a_24_mask_stays_within_the_bound(spec):
    n, k = 32, 128
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    keep = keep.view(n, k)
    W_hat, codes, s, z, P = _weight(spec, n, k, seed=6, keep=keep)
    assert (W_hat[~keep] == 0).all()
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    _check(int4_linear_cpu(x, prepare_int4_cpu(codes, s, z, spec.group_size)), x, W_hat, P)


def test_the_bound_catches_a_wrong_zero_convention():
    spec = QuantSpec(4, symmetric=False, group_size=64)
    W_hat, codes, s, z, P = _weight(spec, 32, 128, seed=8, positive=True)
    assert (z == 0).all()
    prepared = prepare_int4_cpu(codes, s, z, 64)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    _check(int4_linear_cpu(x, prepared), x, W_hat, P)
    flipped = prepared.scales_and_zeros * torch.tensor([1.0, -1.0])  # zero_term = (z - 8) s
    wrong = dataclasses.replace(prepared, scales_and_zeros=flipped)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        _check(int4_linear_cpu(x, wrong), x, W_hat, P)


def test_a_misaligned_x_is_copied_before_the_aligned_loads(int8_path):
    W_hat, codes, s, _, P = _weight(QuantSpec(8), 40, 256, seed=10)
    prepared = prepare_int8_cpu(codes, s)
    buf = torch.randn(3 * 256 + 1, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    x = buf[1:].view(3, 256)  # rows 2 bytes off a 16-byte boundary: the op faults on this as is
    assert x.data_ptr() % 16
    _check(int8_linear_cpu(x, prepared), x, W_hat, P)


def test_scales_cached_per_dtype_do_not_leak_between_dtypes():
    W_hat, codes, s, z, P = _weight(QuantSpec(4, symmetric=False, group_size=32), 16, 64, seed=12)
    prepared = prepare_int4_cpu(codes, s, z, 32)
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(13)).to(dtype)
        _check(int4_linear_cpu(x, prepared), x, W_hat, P)
    assert prepared.scales_and_zeros.dtype == torch.float32


def test_layouts_the_ops_cannot_run_come_back_as_none():
    _, codes, s, _, _ = _weight(QuantSpec(8, group_size=64), 16, 128)
    assert prepare_int8_cpu(codes, s) is None  # grouped int8
    _, codes, s, _, _ = _weight(QuantSpec(8, symmetric=False), 16, 128)
    assert prepare_int8_cpu(codes, s) is None  # asymmetric int8 (uint8 codes)
    for g in (16, 100):  # no op group size (32, 64, 128, 256) divides these
        _, codes, s, z, _ = _weight(QuantSpec(4, group_size=g), 16, 256)
        assert prepare_int4_cpu(codes, s, z, g) is None


@pytest.mark.parametrize("call, match", [
    (lambda p8, p4: int8_linear_cpu(torch.randn(2, 63), p8), r"\[\.\.\., K\] with K=64"),
    (lambda p8, p4: int4_linear_cpu(torch.ones(2, 64, dtype=torch.int32), p4),
     "bfloat16, float16 or float32"),
    (lambda p8, p4: prepare_int8_cpu(torch.zeros(4, 64, dtype=torch.int8), torch.ones(5, 1)), "N=4 rows"),
    (lambda p8, p4: prepare_int4_cpu(torch.full((4, 64), 16, dtype=torch.uint8), torch.ones(4, 2), None, 32),
     "must be 0..15"),
    (lambda p8, p4: prepare_int4_cpu(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), None, 32),
     "has 2 groups, but scale has 3"),
    (lambda p8, p4: prepare_int4_cpu(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), None, 32),
     "uint8 nibbles"),
])
def test_bad_input_raises_value_error(call, match):
    _, c8, s8, _, _ = _weight(QuantSpec(8), 16, 64)
    _, c4, s4, z4, _ = _weight(QuantSpec(4, group_size=32), 16, 64)
    with pytest.raises(ValueError, match=match):
        call(prepare_int8_cpu(c8, s8), prepare_int4_cpu(c4, s4, z4, 32))
