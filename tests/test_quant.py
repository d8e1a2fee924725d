"""Weight-only quantization math: the layout on hand-computed rows, partial and per-channel groups,
masked entries, codes recovered exactly from a weight cast to the model dtype, nibble packing; the
mse observer (a hand-computed clipping, a brute-force reference); the OBS sweep (GPTQ against a
column-by-column reference, joint SparseGPT 2:4 + int4, the fixed-mask mode, act-order against the
sweep of the reordered problem, bit-identical pruning without quant); and the error messages."""

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
from squeeze.algorithms.sparsegpt import (
    _block_mask_unstructured,
    act_order,
    inverse_cholesky_upper,
    obs_quantize,
    prepare_hessian,
    reconstruction_loss,
    sparsegpt_prune,
)
from squeeze.errors import SqueezeError
from squeeze.sparsity import satisfies_nm

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


def _problem(rows=64, cols=256, tokens=512, seed=0):
    """W [rows, cols] and the Hessian 2/n X Xᵀ of correlated inputs (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = (torch.randn(tokens, cols, generator=g) @ mix).T.double()
    return W, 2.0 / tokens * X @ X.T


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
    # symmetric int: s = absmax / (levels + 0.5), codes down to -(levels + 1) (compressed-tensors' grid)
    (QuantSpec(8), [-127.5, -64, 2.5, 3.5, -2.5, 0], 1.0, None, [-128, -64, 2, 4, -2, 0]),
    (QuantSpec(8), [127.5, -64, 0], 1.0, None, [127, -64, 0]),  # +127.5 clips to 127
    (QuantSpec(4), [-7.5, -3, 2.5, 0], 1.0, None, [0, 5, 10, 8]),
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


# ---------------------------------------------------------------------------------------------
# the mse observer


@pytest.mark.parametrize("unit", [1.0, 2.0**-6])
def test_mse_observer_clips_by_hand(unit):
    # int4 symmetric, group [-1, 0.376]: minmax s = 1/7.5 rounds -1 to -8 s = -1.0667 and 0.376 to 3 s = 0.4;
    # shrinking the range to p = 0.94 puts 0.376 on the grid (3 s) and -1 within 0.0027 of -8 s
    W = torch.tensor([[-1.0, 0.376]]) * unit
    s_mm, _ = qparams(W, QuantSpec(4))
    s_mse, _ = qparams(W, QuantSpec(4), observer="mse")
    assert torch.equal(s_mm, torch.tensor([[1 / 7.5]]) * unit)
    assert torch.allclose(s_mse, torch.tensor([[0.94 / 7.5]]) * unit, rtol=1e-6, atol=0)
    # maxshrink 0.05 stops the search at p = 0.96: the best of 1, 0.99 .. 0.96
    s_short, _ = qparams(W, QuantSpec(4), observer="mse", maxshrink=0.05)
    assert s_short[0, 0] > s_mse[0, 0]


def _mse_by_brute_force(W, spec, keep, grid=100, maxshrink=0.2, norm=2.4):
    """For each group separately: every shrink p of the minmax range, scored with the public layout."""
    g = spec.group_size or W.shape[1]
    one = dataclasses.replace(spec, group_size=None)
    Wk = W * keep if keep is not None else W
    out_s, out_z = [], []
    for r in range(W.shape[0]):
        srow, zrow = [], []
        for c in range(0, W.shape[1], g):
            w = Wk[r:r + 1, c:c + g]
            k = None if keep is None else keep[r:r + 1, c:c + g]
            s1, z1 = qparams(w, one, k)
            best = None
            for i in range(int(maxshrink * grid + 1e-9)):
                p = 1 - i / grid
                if one.symmetric:
                    s_p = qparams(w * p, one, k)[0]  # a shrunk range is the range of the shrunk weights
                    z_p = None
                else:
                    s_p, z_p = qparams(w * p, one, k)
                err = float((w - dequantize(quantize(w, one, s_p, z_p, k), one, s_p, z_p)).abs().pow(norm).sum())
                if best is None or err < best[0]:
                    best = (err, s_p, z_p)
            srow.append(best[1])
            zrow.append(best[2])
        out_s.append(torch.cat(srow, 1))
        out_z.append(None if spec.symmetric else torch.cat(zrow, 1))
    return torch.cat(out_s), None if spec.symmetric else torch.cat(out_z)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, group_size=24), QuantSpec(8, group_size=32),
                                  QuantSpec(4, symmetric=False, group_size=32), QuantSpec(8, "fp8", group_size=32)],
                         ids=ids)
def test_mse_observer_is_the_best_shrink_of_each_group(spec, masked):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 72, generator=g) ** 3  # heavy tails: clipping pays somewhere
    keep = torch.rand(3, 72, generator=g) > 0.4 if masked else None
    s, z = qparams(W, spec, keep, observer="mse")
    s_ref, z_ref = _mse_by_brute_force(W, spec, keep)
    assert torch.allclose(s, s_ref, rtol=1e-6, atol=0) and (z is None or torch.equal(z, z_ref))
    s_mm, _ = qparams(W, spec, keep)
    assert (s <= s_mm).all()  # only ever shrinks
    if spec.bits == 4:
        assert (s < s_mm).any()  # and at 4 bits it does here (8-bit grids are fine enough for these tails)
    W_hat, codes, s2, z2 = rtn(W, spec, keep, observer="mse")
    assert torch.equal(s2, s) and torch.equal(dequantize(codes, spec, s2, z2), W_hat)
    if keep is not None:
        assert (W_hat[~keep] == 0).all()


def test_observer_settings_are_checked():
    W = torch.ones(2, 4)
    for kw, match in [({"observer": "max"}, "unknown observer 'max': use one of minmax, mse"),
                      ({"observer": "mse", "grid": 0}, "grid must be a whole number >= 1"),
                      ({"observer": "mse", "maxshrink": 1.0}, r"maxshrink must be in \[0, 1\)"),
                      ({"observer": "mse", "norm": 0}, "norm must be > 0")]:
        with pytest.raises(SqueezeError, match=match):
            qparams(W, QuantSpec(4), **kw)


# ---------------------------------------------------------------------------------------------
# the OBS sweep


def _prune_as_before(W, H, sparsity=None, nm=None, blocksize=128, dampening=0.01, mask=None):
    """``sparsegpt_prune`` as it was before quantization joined the sweep (commit 55a6bd2), verbatim
    but for the docstring: the reference for bit-identical results with quant=None."""
    if sum(x is not None for x in (sparsity, nm, mask)) != 1:
        raise ValueError("give exactly one of sparsity, nm, mask")
    rows, cols = W.shape
    assert H.shape == (cols, cols), (H.shape, W.shape)
    H, W = prepare_hessian(H, W, dampening)
    U = inverse_cholesky_upper(H).float()  # (in, in)
    del H
    if nm is not None:
        n_keep, m = nm
        blocksize = max(m, blocksize - blocksize % m)
        full = cols - cols % m  # columns in complete groups
    pruned_all = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B), updated in place as columns are fixed
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        if mask is not None:
            pruned1 = ~mask[:, i1:i2]
        elif nm is None:
            pruned1 = _block_mask_unstructured(W1, d, sparsity)
        else:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):  # the OBS sweep: one column at a time, as the algorithm requires
            if nm is not None and i % m == 0 and i1 + i + m <= full:
                score = (W1[:, i:i + m] / d[None, i:i + m]) ** 2  # (rows, M), on updated weights
                idx = score.topk(m - n_keep, dim=1, largest=False).indices
                pruned1[:, i:i + m].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(pruned1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exact zero (the update above leaves q up to rounding)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of everything right of the block
        pruned_all[:, i1:i2] = pruned1
    W[pruned_all] = 0.0
    return W, ~pruned_all


@pytest.mark.parametrize("kw", [
    {"sparsity": 0.5}, {"sparsity": 0.7, "blocksize": 8}, {"nm": (2, 4)}, {"nm": (2, 4), "blocksize": 6},
    {"nm": (1, 4), "blocksize": 20}, {"mask": "random"}, {"mask": "random", "blocksize": 7},
], ids=str)
def test_without_quant_the_sweep_is_bit_identical_to_before(kw):
    W, H = _problem(rows=12, cols=90, tokens=128, seed=7)
    H[3, :] = H[:, 3] = 0.0  # a dead input channel
    if kw.get("mask") == "random":
        kw = {**kw, "mask": torch.rand(12, 90, generator=torch.Generator().manual_seed(8)) > 0.4}
    got_w, got_kept = sparsegpt_prune(W, H, **kw)
    want_w, want_kept = _prune_as_before(W, H, **kw)
    assert torch.equal(got_w, want_w) and torch.equal(got_kept, want_kept)


def _gptq_column_by_column(W, H, spec, dampening=0.01):
    """Plain GPTQ without lazy batching: a group's qparams are fixed when the sweep enters it, from
    its current weights; each column is rounded and its error spread with row i of U."""
    H, W = prepare_hessian(H, W, dampening)
    U = inverse_cholesky_upper(H).float()
    g = spec.group_size or W.shape[1]
    one = dataclasses.replace(spec, group_size=None)
    for i in range(W.shape[1]):
        if i % g == 0:
            s, z = qparams(W[:, i:i + g], one)
        q = dequantize(quantize(W[:, i:i + 1], one, s, z), one, s, z)[:, 0]
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i] = q
    return W


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=32), QuantSpec(8, symmetric=False),
                                  QuantSpec(8, "fp8")], ids=ids)
def test_without_a_mask_it_is_gptq(spec):
    W, H = _problem(rows=16, cols=72, tokens=128, seed=9)
    want = _gptq_column_by_column(W, H, spec)
    W_1, _, _ = obs_quantize(W, H, spec, blocksize=1)  # blocks of one column: the same arithmetic
    assert torch.equal(W_1, want)
    W_b, _, _ = obs_quantize(W, H, spec, blocksize=16)
    assert torch.equal(W_b[:, :16], want[:, :16])  # the first block sees no lazy update
    # later blocks get their updates summed in another order: a scale may move by an ulp, a code flip
    assert abs(reconstruction_loss(W, W_b, H) / reconstruction_loss(W, want, H) - 1) < 1e-3


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("blocksize", [8, 128])  # groups of 32 wider / narrower than a block
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_a_diagonal_hessian_makes_obs_exactly_rtn(spec, blocksize, keep):
    # uncorrelated inputs: U is diagonal, so no error reaches another column
    g = torch.Generator().manual_seed(10)
    W = torch.randn(8, 80, generator=g)
    mask = torch.rand(8, 80, generator=g) > 0.5 if keep else None
    H = torch.diag(torch.rand(80, generator=g, dtype=torch.float64) + 0.5)
    got = obs_quantize(W, H, spec, keep=mask, blocksize=blocksize)
    want = rtn(W, spec, mask)
    for a, b in zip(got, (want[0], want[2], want[3])):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=32), QuantSpec(4, symmetric=False), QuantSpec(8),
                                  QuantSpec(8, "fp8", group_size=64)], ids=ids)
def test_obs_beats_rtn_on_correlated_inputs_and_lands_on_the_grid(spec):
    W, H = _problem(rows=32, cols=172, tokens=384, seed=11)
    W_hat, s, z = obs_quantize(W, H, spec, blocksize=64)
    codes = quantize(W_hat, spec, s, z)
    assert torch.equal(dequantize(codes, spec, s, z), W_hat)  # the exporter rebuilds these codes
    loss_obs = reconstruction_loss(W, W_hat, H)
    loss_rtn = reconstruction_loss(W, rtn(W, spec)[0], H)
    assert loss_obs < 0.8 * loss_rtn, (loss_obs, loss_rtn)  # GPTQ's gain here is about 2x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=128), QuantSpec(4, symmetric=False)], ids=ids)
def test_joint_24_int4_keeps_an_exact_pattern_and_beats_prune_then_rtn(spec, seed):
    W, H = _problem(seed=seed)
    W_hat, kept, s, z = sparsegpt_prune(W, H, nm=(2, 4), quant=spec, blocksize=64)
    assert torch.equal(kept.view(64, -1, 4).sum(-1), torch.full((64, 64), 2))  # exactly 2 of every 4
    assert (W_hat[~kept] == 0).all() and satisfies_nm(W_hat, 2, 4)
    codes = quantize(W_hat, spec, s, z, kept)
    assert torch.equal(dequantize(codes, spec, s, z), W_hat)
    assert torch.equal(codes.float()[~kept], _zero_code(spec, z, W.shape)[~kept])
    W_p, kept_p = sparsegpt_prune(W, H, nm=(2, 4), blocksize=64)
    loss_joint = reconstruction_loss(W, W_hat, H)
    loss_prune_rtn = reconstruction_loss(W, rtn(W_p, spec, kept_p)[0], H)
    assert loss_joint < loss_prune_rtn, (loss_joint, loss_prune_rtn)


@pytest.mark.parametrize("kw", [{"sparsity": 0.5, "blocksize": 48}, {"nm": (2, 4), "blocksize": 48},
                                {"nm": (2, 4), "blocksize": 256}], ids=str)
@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=128), QuantSpec(8, symmetric=False),
                                  QuantSpec(8, "fp8")], ids=ids)
def test_joint_mode_with_partial_groups_and_groups_wider_than_blocks(spec, kw):
    W, H = _problem(rows=16, cols=172, tokens=256, seed=12)
    W_hat, kept, s, z = sparsegpt_prune(W, H, quant=spec, **kw)
    assert s.shape == (16, spec.groups(172))
    assert (W_hat[~kept] == 0).all()
    if "nm" in kw:
        assert satisfies_nm(W_hat, 2, 4) and kept[:, 172 - 172 % 4:].all()
    else:
        assert (~kept[:, :48]).float().mean() >= 0.5
    assert torch.equal(dequantize(quantize(W_hat, spec, s, z, kept), spec, s, z), W_hat)


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=32), QuantSpec(8), QuantSpec(8, "fp8")], ids=ids)
def test_fixed_mask_mode_keeps_exactly_that_mask(spec):
    W, H = _problem(rows=32, cols=128, tokens=384, seed=13)
    keep = torch.zeros(32, 32, 4, dtype=torch.bool)  # a magnitude 2:4 mask, as Wanda-style pruning leaves
    keep.scatter_(-1, W.abs().view(32, 32, 4).topk(2, dim=-1).indices, True)
    keep = keep.view(32, 128)
    W_pruned = W * keep
    W_hat, s, z = obs_quantize(W_pruned, H, spec, keep=keep, blocksize=32)
    assert (W_hat[~keep] == 0).all() and satisfies_nm(W_hat, 2, 4)
    codes = quantize(W_hat, spec, s, z, keep)
    assert torch.equal(codes.float()[~keep], _zero_code(spec, z, W.shape)[~keep])
    loss_obs = reconstruction_loss(W_pruned, W_hat, H)
    loss_rtn = reconstruction_loss(W_pruned, rtn(W_pruned, spec, keep)[0], H)
    assert loss_obs < loss_rtn, (loss_obs, loss_rtn)
    W_hat2, _, _ = obs_quantize(W, H, spec, keep=keep, blocksize=32)  # dense input: pruned inside the sweep
    assert (W_hat2[~keep] == 0).all()


# act-order


def _energetic_problem(rows=32, cols=128, tokens=512, seed=0):
    """As _problem, with the 8 last input channels 10x louder: GPTQ's case for act-order."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(tokens, cols, generator=g) @ mix
    X[:, -8:] *= 10
    X = X.T.double()
    return W, 2.0 / tokens * X @ X.T


def test_act_order_is_by_decreasing_hessian_diagonal_ties_in_column_order():
    H = torch.diag(torch.tensor([1.0, 3.0, 0.0, 3.0, 2.0], dtype=torch.float64))
    assert act_order(H).tolist() == [1, 3, 4, 0, 2]  # a dead channel (0) last


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(8, symmetric=False), QuantSpec(8, "fp8")], ids=ids)
def test_act_order_is_the_sweep_of_the_reordered_problem_put_back(spec, observer):
    # per-channel scales do not depend on the column order, so act-order must equal quantizing the
    # reordered weight and Hessian left to right, then undoing the order (dampening 0: nothing is summed
    # in another order)
    W, H = _energetic_problem(seed=1)
    H[5, :] = H[:, 5] = 0.0  # a dead input channel
    perm = act_order(H)
    got, s, z = obs_quantize(W, H, spec, actorder=True, observer=observer, dampening=0.0, blocksize=32)
    ref, s_ref, z_ref = obs_quantize(W[:, perm], H[perm][:, perm], spec, observer=observer, dampening=0.0,
                                     blocksize=32)
    assert torch.equal(got, ref[:, torch.argsort(perm)])
    assert torch.equal(s, s_ref) and (z is None or torch.equal(z, z_ref))
    assert (got[:, 5] == 0).all()


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=32), QuantSpec(4, symmetric=False, group_size=48)],
                         ids=ids)
def test_act_order_with_groups_fixes_the_scales_first_in_the_original_layout(spec):
    W, H = _energetic_problem(seed=2)
    W_hat, s, z = obs_quantize(W, H, spec, actorder=True, observer="mse")
    s_ref, z_ref = qparams(W, spec, observer="mse")  # from the weight before the sweep, original groups
    assert torch.equal(s, s_ref) and (z is None or torch.equal(z, z_ref))
    codes = quantize(W_hat, spec, s, z)
    assert torch.equal(dequantize(codes, spec, s, z), W_hat)  # the same codes layout as without act-order


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, group_size=32), QuantSpec(8)], ids=ids)
def test_act_order_pays_when_a_few_inputs_dominate(spec, seed):
    W, H = _energetic_problem(seed=seed)
    loss_act = reconstruction_loss(W, obs_quantize(W, H, spec, actorder=True)[0], H)
    loss_ltr = reconstruction_loss(W, obs_quantize(W, H, spec)[0], H)
    assert loss_act < 0.5 * loss_ltr, (loss_act, loss_ltr)  # about 5x here


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=32), QuantSpec(4), QuantSpec(8, symmetric=False)],
                         ids=ids)
def test_act_order_keeps_a_fixed_24_mask_exact(spec):
    W, H = _energetic_problem(seed=3)
    keep = torch.zeros(32, 32, 4, dtype=torch.bool)
    keep.scatter_(-1, W.abs().view(32, 32, 4).topk(2, dim=-1).indices, True)
    keep = keep.view(32, 128)
    W_pruned = W * keep
    W_hat, s, z = obs_quantize(W_pruned, H, spec, keep=keep, actorder=True, observer="mse")
    assert (W_hat[~keep] == 0).all() and satisfies_nm(W_hat, 2, 4)
    s_ref, z_ref = qparams(W_pruned, spec, keep, observer="mse")
    assert torch.equal(s, s_ref) and (z is None or torch.equal(z, z_ref))
    codes = quantize(W_hat, spec, s, z, keep)
    assert torch.equal(codes.float()[~keep], _zero_code(spec, z, W.shape)[~keep])
    assert torch.equal(dequantize(codes, spec, s, z), W_hat)
    loss_act = reconstruction_loss(W_pruned, W_hat, H)
    loss_rtn = reconstruction_loss(W_pruned, rtn(W_pruned, spec, keep, observer="mse")[0], H)
    assert loss_act < loss_rtn, (loss_act, loss_rtn)


@pytest.mark.parametrize("call, match", [
    (lambda W, H: obs_quantize(W, H[:5, :5], QuantSpec(8)), r"Hessian must be \[in, in\] = \(8, 8\)"),
    (lambda W, H: obs_quantize(W, H, QuantSpec(8), keep=torch.ones(4, 8)), "kept mask must be bool"),
    (lambda W, H: obs_quantize(W, H, QuantSpec(8), blocksize=0), "blocksize must be"),
    (lambda W, H: obs_quantize(W, H, QuantSpec(8), dampening=-1.0), "dampening must be >= 0"),
    (lambda W, H: obs_quantize(W, H, "int8"), r"QuantSpec \(e.g. QuantSpec.parse\('int4'\)\)"),
    (lambda W, H: obs_quantize(W * float("nan"), H, QuantSpec(8)), "NaN or inf"),
    (lambda W, H: sparsegpt_prune(W, H, nm=(2, 4), quant=QuantSpec(4, group_size=6)),
     "group size 6 must be a multiple of 4"),
    (lambda W, H: sparsegpt_prune(W, H, nm=(2, 4), quant=QuantSpec(4), actorder=True),
     "act-order reorders the columns, so it cannot choose an N:M or per-block mask in the same sweep"),
    (lambda W, H: sparsegpt_prune(W, H, sparsity=0.5, quant=QuantSpec(4), actorder=True),
     "prune first"),
    (lambda W, H: obs_quantize(W, H, QuantSpec(8), actorder="static"), "actorder must be True or False"),
    (lambda W, H: obs_quantize(W, H, QuantSpec(8), observer="absmax"), "unknown observer 'absmax'"),
])
def test_obs_settings_are_checked(call, match):
    W, H = _problem(rows=4, cols=8, tokens=32, seed=14)
    with pytest.raises(SqueezeError, match=match) as e:
        call(W, H)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="exactly one of"):
        sparsegpt_prune(W, H, sparsity=0.5, nm=(2, 4), quant=QuantSpec(8))
    with pytest.raises(ValueError, match="quantization settings: pass quant"):
        sparsegpt_prune(W, H, sparsity=0.5, actorder=True)
