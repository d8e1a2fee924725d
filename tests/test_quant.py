"""Weight-only quantization math: the layout on hand-computed rows, partial and per-channel groups,
masked entries, codes recovered exactly from a weight cast to the model dtype, nibble packing; and
the error messages."""

import dataclasses

import pytest
import torch

from squeeze.algorithms.quant import (
    QuantSpec,
    codes_from_weight,
    dequantize,
    pack_int4,
    qparams,
    quantize,
    rtn,
    unpack_int4,
)
from squeeze.errors import SqueezeError

BASE = [QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(4), QuantSpec(4, symmetric=False),
        QuantSpec(8, "fp8")]


def _with_group(specs, g):
    return [dataclasses.replace(s, group_size=g) for s in specs]


SPECS = BASE + _with_group(BASE, 32)  # per-channel and grouped, every format


def ids(spec):
    return spec.name


def _zero_code(spec, zero, shape):
    """The code each entry decodes to 0 with, as float, expanded to ``shape``."""
    if not spec.symmetric:
        g = spec.group_size or shape[1]
        return zero.float().repeat_interleave(g, 1)[:, :shape[1]]
    return torch.full(shape, 8.0 if (spec.format == "int" and spec.bits == 4) else 0.0)


def _bits(codes):
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


# ---------------------------------------------------------------------------------------------
# the spec


def test_parse_gives_the_specs_and_their_code_dtypes():
    assert QuantSpec.parse("int8") == QuantSpec(8)
    assert QuantSpec.parse(" INT4 ", symmetric=False, group_size=128) == QuantSpec(4, "int", False, 128)
    assert QuantSpec.parse("fp8") == QuantSpec(8, "fp8")
    dtypes = [torch.int8, torch.uint8, torch.uint8, torch.uint8, torch.float8_e4m3fn]
    assert [s.code_dtype for s in BASE] == dtypes
    assert QuantSpec(4, group_size=128).groups(172) == 2 and QuantSpec(4).groups(172) == 1


@pytest.mark.parametrize("make, match", [
    (lambda: QuantSpec(3), "bits 3: use 4 or 8"),
    (lambda: QuantSpec(True), "bits True"),
    (lambda: QuantSpec(4, "fp8"), "fp8 is 8 bits"),
    (lambda: QuantSpec(8, "fp8", symmetric=False), "no zero point"),
    (lambda: QuantSpec(8, "float"), "format 'float'"),
    (lambda: QuantSpec(8, group_size=0), "group size 0"),
    (lambda: QuantSpec(8, group_size=1.5), "group size 1.5"),
    (lambda: QuantSpec.parse("int2"), "unknown quantization 'int2': use one of int8, int4, fp8"),
])
def test_bad_specs_say_what_was_wrong_and_what_to_do(make, match):
    with pytest.raises(SqueezeError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the layout


@pytest.mark.parametrize("spec, row, scale, zero, codes", [
    # scales that are powers of two keep every step exact; x.5 rounds to even
    (QuantSpec(8), [127, -64, 2.5, 3.5, -2.5, 0], 1.0, None, [127, -64, 2, 4, -2, 0]),
    (QuantSpec(4), [7, -3, 2.5, 0], 1.0, None, [15, 5, 10, 8]),
    (QuantSpec(8, symmetric=False), [-2, 253, 0, 100.5], 1.0, 2, [0, 255, 2, 102]),
    (QuantSpec(4, symmetric=False), [-5, 10, 2, 0], 1.0, 5, [0, 15, 7, 5]),
    (QuantSpec(4, symmetric=False), [1, 15, 3], 1.0, 0, [1, 15, 3]),  # range extended to include 0
    (QuantSpec(8, "fp8"), [448, -224, 1.5, 17 / 16, 0], 1.0, None, [448, -224, 1.5, 1.0, 0]),
])
@pytest.mark.parametrize("unit", [0.25, 2.0**-7])
def test_hand_computed_codes(spec, row, scale, zero, codes, unit):
    W = torch.tensor([row]) * unit
    W_hat, got, s, z = rtn(W, spec)
    assert torch.equal(s, torch.tensor([[scale * unit]]))
    assert z is None if zero is None else torch.equal(z, torch.tensor([[zero]], dtype=torch.uint8))
    assert got.dtype == spec.code_dtype and torch.equal(got.float(), torch.tensor([codes]))
    offset = 8 if (spec.format == "int" and spec.bits == 4 and spec.symmetric) else (zero or 0)
    assert torch.equal(W_hat, (torch.tensor([codes]) - offset) * scale * unit)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_all_zero_group_has_scale_one_and_zero_codes(spec):
    W = torch.zeros(2, 64)
    W[1, :32] = torch.linspace(-1, 2, 32)  # row 1: a live first group, a zero second group
    W_hat, codes, s, z = rtn(W, spec)
    dead = torch.zeros(2, 64, dtype=torch.bool)
    dead[0] = True
    dead[1, 32:] = True
    if spec.group_size:  # 32: the dead groups are (0, 0), (0, 1), (1, 1)
        assert torch.equal(s == 1.0, torch.tensor([[True, True], [False, True]]))
    else:
        assert s[0, 0] == 1.0
    if z is not None:
        assert (z[s == 1.0] == 0).all()
    assert torch.equal(codes.float()[dead], _zero_code(spec, z, (2, 64))[dead])
    assert (W_hat[dead] == 0).all()


@pytest.mark.parametrize("spec", _with_group(BASE, 128) + BASE, ids=ids)
def test_partial_last_group_and_per_channel_groups(spec):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 172, generator=g) * 0.02
    W_hat, codes, s, z = rtn(W, spec)
    bounds = [(0, 128), (128, 172)] if spec.group_size else [(0, 172)]
    assert s.shape == (5, len(bounds)) and (z is None or z.shape == s.shape)
    one = dataclasses.replace(spec, group_size=None)
    for j, (a, b) in enumerate(bounds):  # each group's qparams are those of its columns alone
        s_j, z_j = qparams(W[:, a:b], one)
        assert torch.equal(s[:, j:j + 1], s_j) and (z is None or torch.equal(z[:, j:j + 1], z_j))
    step = torch.cat([s[:, j:j + 1].expand(-1, b - a) for j, (a, b) in enumerate(bounds)], 1)
    if spec.format == "fp8":  # 3 mantissa bits: half an ulp is 2^-4 relative; subnormal steps are 2^-9 s
        assert ((W - W_hat).abs() <= W.abs() * 2.0**-4 + step * 2.0**-10).all()
    else:  # nothing clips (the range covers the group): within half a step, plus fp32 rounding
        assert ((W - W_hat).abs() <= step * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_masked_entries_are_exact_zeros_and_do_not_shape_the_scales(spec):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(6, 96, generator=g)
    keep = torch.rand(6, 96, generator=g) > 0.5
    W_big = torch.where(keep, W, torch.full_like(W, 100.0))  # masked entries far outside the kept range
    W_hat, codes, s, z = rtn(W_big, spec, keep)
    s_ref, z_ref = qparams(W * keep, spec)
    assert torch.equal(s, s_ref) and (z is None or torch.equal(z, z_ref))
    assert torch.equal(codes.float()[~keep], _zero_code(spec, z, W.shape)[~keep])
    assert (W_hat[~keep] == 0).all() and not torch.signbit(W_hat[~keep]).any()
    assert torch.equal(dequantize(codes, spec, s, z), W_hat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_codes_survive_dequantize_cast_and_recovery(spec, dtype):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 200, generator=g) * 0.02  # the scale of real weights
    keep = torch.rand(16, 200, generator=g) > 0.3
    _, codes, s, z = rtn(W, spec, keep)
    W_model = dequantize(codes, spec, s, z).to(dtype)  # what the model holds after compression
    got = codes_from_weight(W_model, spec, s, z)
    assert torch.equal(dequantize(got, spec, s, z).to(dtype), W_model)
    if spec.bits == 8 and not spec.symmetric and dtype == torch.bfloat16:
        # bf16 keeps 8 significant bits; |u - z| up to 255 needs 9, so neighbours may merge
        assert ((got.float() - codes.float()).abs() <= 1).all()
    else:
        assert torch.equal(_bits(got), _bits(codes))


def test_bf16_cannot_tell_some_asymmetric_int8_codes_apart():
    spec = QuantSpec(8, symmetric=False)
    s, z = torch.tensor([[0.01]]), torch.tensor([[0]], dtype=torch.uint8)
    codes = torch.tensor([[201, 202]], dtype=torch.uint8)
    W_model = dequantize(codes, spec, s, z).to(torch.bfloat16)
    assert W_model[0, 0] == W_model[0, 1]  # 2.01 and 2.02 both round to 2.015625
    got = codes_from_weight(W_model, spec, s, z)
    assert torch.equal(dequantize(got, spec, s, z).to(torch.bfloat16), W_model)


def test_codes_from_weight_refuses_a_weight_off_the_grid():
    spec = QuantSpec(4, group_size=32)
    W_hat, _, s, z = rtn(torch.randn(4, 64, generator=torch.Generator().manual_seed(4)), spec)
    W_hat[2, 5] += 0.3 * s[2, 0]
    with pytest.raises(SqueezeError, match=r"1 of 256 weight entries are not on the int4-g32 grid"):
        codes_from_weight(W_hat, spec, s, z)


def test_int4_packing_by_hand_and_round_trips():
    u = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    packed = pack_int4(u)
    assert torch.equal(packed, torch.tensor([[0x21, 0x03], [0x0F, 0x07]], dtype=torch.uint8))
    assert torch.equal(unpack_int4(packed, 3), u)
    for k in (1, 2, 171, 172):
        v = torch.randint(0, 16, (5, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        assert torch.equal(unpack_int4(pack_int4(v), k), v)
    spec = QuantSpec(4, symmetric=False, group_size=128)
    W = torch.randn(3, 171, generator=torch.Generator().manual_seed(5))
    W_hat, codes, s, z = rtn(W, spec)
    assert torch.equal(dequantize(pack_int4(codes), spec, s, z, K=171), W_hat)


@pytest.mark.parametrize("call, match", [
    (lambda: pack_int4(torch.tensor([[16]], dtype=torch.uint8)), "values must be 0..15"),
    (lambda: pack_int4(torch.tensor([[1]], dtype=torch.int8)), "uint8 nibbles"),
    (lambda: unpack_int4(torch.tensor([[0x10]], dtype=torch.uint8), 1), "high nibble"),
    (lambda: unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8), r"\[N, 4\] for K=8"),
])
def test_packing_errors(call, match):
    with pytest.raises(SqueezeError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda W, s, z: quantize(W, QuantSpec(4, group_size=32), s),
     r"scale must be float32 \[N, G\] = \(4, 3\)"),
    (lambda W, s, z: quantize(W, QuantSpec(8), s[:, :1], z[:, :1]), "symmetric and has no zero points"),
    (lambda W, s, z: quantize(W, QuantSpec(8, symmetric=False), s[:, :1]), "zero must be uint8"),
    (lambda W, s, z: dequantize(torch.zeros(4, 80, dtype=torch.int8), QuantSpec(4), s[:, :1]),
     "must be torch.uint8"),
    (lambda W, s, z: dequantize(torch.full((4, 80), 16, dtype=torch.uint8), QuantSpec(4), s[:, :1]),
     "nibbles"),
    (lambda W, s, z: rtn(W[0], QuantSpec(8)), r"2-D \[out, in\]"),
    (lambda W, s, z: rtn(W.int(), QuantSpec(8)), "floating point"),
    (lambda W, s, z: rtn(W / 0, QuantSpec(8)), "NaN or inf"),
    (lambda W, s, z: rtn(W, QuantSpec(8), keep=(W > 0).int()), "bool mask"),
])
def test_layout_errors(call, match):
    W = torch.randn(4, 80, generator=torch.Generator().manual_seed(6))
    s, z = torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(SqueezeError, match=match) as e:
        call(W, s, z)
    assert "\n" not in str(e.value)
