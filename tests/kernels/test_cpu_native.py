"""squeeze.kernels.cpu_native: our C kernels, compiled on first use. The int8 product and the
input-sparse row sums against float64 within the fp32 bound for their number of terms, the same
bits at any thread count and token count, one build per source in the cache, and a clear None
(with the reason) where it cannot be built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeeze.kernels import cpu_native

needs_native = pytest.mark.skipif(cpu_native.library() is None,
                                  reason=f"native kernels unavailable here: {cpu_native.unavailable_reason()}")


# rows: whole blocks (of 4 or 8) with and without a tail, and fewer than a block; K with and without
# a 16-code tail; tokens through every tile: 1, 2, 3 = 2 + 1, 7 = 4 + 2 + 1, 8, 9 = 4 + 4 + 1
_SHAPES = [(1, 64, 64), (3, 41, 172), (8, 7, 16), (2, 4, 2048), (1, 1, 16), (9, 19, 48), (7, 24, 160)]


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    kp = -(-k // 16) * 16
    codes = torch.zeros(n, kp, dtype=torch.int8)
    codes[:, :k] = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.zeros(m, kp)
    x[:, :k] = torch.randn(m, k, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    return x, codes, scale


def _check(m, n, k):
    """(worst of |y - ref| - bound, whether each token's row alone gives the same bits as in the
    batch). Bound: (K + 2)·2^-24·|x|·|codes|·scale, fp32 products and sums of K terms and the scale
    applied once."""
    x, codes, scale = _case(m, n, k)
    y = cpu_native.int8_gemv(x, codes, scale)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = (x.double() @ codes.double().T) * scale.double()
    bound = (k + 2) * 2.0**-24 * (x.double().abs() @ codes.double().abs().T) * scale.double()
    alone = torch.cat([cpu_native.int8_gemv(x[t:t + 1].contiguous(), codes, scale) for t in range(m)])
    return float(((y.double() - ref).abs() - bound).max()), torch.equal(alone, y)


def _decodes_exactly(n, k):
    """Whether int8_decode of a slice of rows gives torch's fp32 product, and in bf16 that product
    rounded to nearest even (torch's cast), bit for bit."""
    _, codes, scale = _case(1, n, k)
    rows = slice(n // 3, n)
    ref = codes[rows, :k].float() * scale[rows, None]
    outs = {dt: cpu_native.int8_decode(codes, scale, k, rows, torch.empty(n - n // 3, k, dtype=dt))
            for dt in (torch.float32, torch.bfloat16)}
    return torch.equal(outs[torch.float32], ref) and torch.equal(outs[torch.bfloat16], ref.bfloat16())


# (tokens, K, N): N with a tail of fewer than 16 columns, one of more than a thread's block (4096)
_ROWS_SHAPES = [(1, 64, 48), (3, 300, 37), (2, 40, 4100), (1, 5, 1)]
_WEIGHTS = (torch.float32, torch.bfloat16, torch.int8)


def _rows_case(t, k, n, dtype, seed=0):
    """w [K, N] of ``dtype``; x [t, K] with about 30% non-zeros and its last token all zero; the
    entries (column, value) grouped by token with their [t + 1] offsets; scale (int8) and bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8) if dtype == torch.int8 else \
        torch.randn(k, n, generator=g).to(dtype)
    x = torch.randn(t, k, generator=g) * (torch.rand(t, k, generator=g) < 0.3)
    x[-1] = 0
    tok, col = (x != 0).nonzero(as_tuple=True)
    offsets = torch.zeros(t + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(tok, minlength=t).cumsum(0)
    scale = torch.rand(n, generator=g) * 0.01 if dtype == torch.int8 else None
    return w, x, col, x[tok, col], offsets, scale, torch.randn(n, generator=g)


def _check_rows(t, k, n, dtype, out_dtype=torch.float32):
    """(worst of |y - ref| - bound, whether each token alone gives the batch's bits). Bound: fp32
    sums of a token's non-zeros (nnz + 2)·2^-24·sum |x|·|w| (·scale), plus the bias's rounding,
    plus half a bf16 ulp of the result when written in bf16."""
    w, x, col, val, offsets, scale, bias = _rows_case(t, k, n, dtype)
    y = cpu_native.rows_mv(w, col, val, offsets, torch.empty(t, n, dtype=out_dtype), scale, bias)
    s = torch.ones(n, dtype=torch.float64) if scale is None else scale.double()
    ref = (x.double() @ w.double()) * s + bias.double()
    nnz = (x != 0).sum(1, keepdim=True).double()
    bound = (nnz + 2) * 2.0**-24 * ((x.double().abs() @ w.double().abs()) * s + bias.double().abs())
    if out_dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    alone = [cpu_native.rows_mv(w, col[offsets[i]:offsets[i + 1]], val[offsets[i]:offsets[i + 1]], None,
                                torch.empty(1, n, dtype=out_dtype), scale, bias) for i in range(t)]
    return float(((y.double() - ref).abs() - bound).max()), torch.equal(torch.cat(alone), y)


@needs_native
@pytest.mark.parametrize("t, k, n", _ROWS_SHAPES)
@pytest.mark.parametrize("dtype", _WEIGHTS, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_mv_matches_float64_and_gives_the_same_bits_alone(t, k, n, dtype, out_dtype):
    worst, same = _check_rows(t, k, n, dtype, out_dtype)
    assert worst <= 0, f"error exceeds the bound by {worst:.3e}"
    assert same  # a token batched == that token alone (self-speculative verification relies on it)


@needs_native
def test_rows_mv_gives_the_same_bits_at_any_thread_count_and_the_bias_for_no_inputs():
    """Threads split a token's columns (1, 2, 3 threads: blocks of 3008, 1536 or 1024 columns for
    one token, so the 16-column vector loop ends at other columns): the same bits in every split."""
    w, x, col, val, offsets, scale, bias = _rows_case(2, 200, 3000, torch.bfloat16, seed=2)
    first = slice(0, int(offsets[1]))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(torch.cat([cpu_native.rows_mv(w, col, val, offsets, torch.empty(2, 3000), scale, bias),
                                   cpu_native.rows_mv(w, col[first], val[first], None, torch.empty(1, 3000), scale,
                                                      bias)]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[0][0], outs[0][2]) and torch.equal(outs[0][1], bias)  # token 1 has no non-zero input


@needs_native
@pytest.mark.parametrize("bad", ["weight", "out", "val", "offsets", "scale"])
def test_rows_mv_refuses_what_it_cannot_read(bad):
    w, x, col, val, offsets, scale, bias = _rows_case(2, 16, 32, torch.int8)
    out = torch.empty(2, 32)
    if bad == "weight":
        w = w.to(torch.int16)
    elif bad == "out":
        out = out.half()
    elif bad == "val":
        val = val.double()
    elif bad == "offsets":
        offsets = offsets[:2]  # one token's offsets for two tokens' out
    else:
        scale = scale[:4]
    with pytest.raises(ValueError, match="rows_mv"):
        cpu_native.rows_mv(w, col, val, offsets, out, scale, bias)


def _site_case(t, k, dtype, weighted, seed=0):
    """x [t, K] of ``dtype`` with many entries at the threshold and one step of the dtype either side
    of it (in score, for WINA), the threshold (not a value of the dtype), the score scale or None."""
    g = torch.Generator().manual_seed(seed)
    thr = 0.7021  # rounds up to a bf16 value: a score equal to it is dropped, though above 0.7021
    scale = torch.rand(k, generator=g) + 0.5 if weighted else None
    x = torch.randn(t, k, generator=g)
    edge = torch.tensor(thr).to(dtype)
    near = torch.stack([edge, torch.nextafter(edge, torch.tensor(9.0, dtype=dtype)),
                        torch.nextafter(edge, torch.tensor(0.0, dtype=dtype))]).float()
    pick = torch.rand(t, k, generator=g) < 0.3
    at = near[torch.randint(0, 3, (t, k), generator=g)] * torch.where(torch.rand(t, k, generator=g) < 0.5, -1, 1)
    if weighted:  # the score |x| * s lands near the threshold
        at = at / scale
    return torch.where(pick, at, x).to(dtype), thr, scale


def _torch_kept(x, thr, scale):
    from squeeze.algorithms.actsparse import mask_threshold

    y = mask_threshold(x, thr, scale)
    tok, col = (y != 0).nonzero(as_tuple=True)
    return tok, col, y[tok, col].float()


def _select_args(x, thr, scale):
    """select's threshold and scale for the set torch's mask of x's dtype keeps"""
    return float(torch.tensor(thr, dtype=x.dtype)), None if scale is None else scale.to(x.dtype).float()


_X_DTYPES = (torch.float32, torch.bfloat16)


def _select_matches(t, k, dtype, weighted):
    """Whether select keeps the columns and values ``mask_threshold`` keeps, in its order, with the
    per-token offsets, on :func:`_site_case`'s input (and that the case keeps some, not all)."""
    x, thr, scale = _site_case(t, k, dtype, weighted)
    tok, col, val = _torch_kept(x, thr, scale)
    offsets, idx, got = cpu_native.select(x, *_select_args(x, thr, scale))
    want = torch.zeros(t + 1, dtype=torch.int64)
    want[1:] = torch.bincount(tok, minlength=t).cumsum(0)
    return (torch.equal(idx, col) and torch.equal(got, val) and 0 < col.numel() < t * k
            and ((offsets is None and t == 1) or torch.equal(offsets, want)))


@needs_native
@pytest.mark.parametrize("t, k", [(1, 64), (3, 2061), (2, 7)])
@pytest.mark.parametrize("dtype", _X_DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["teal", "wina"])
def test_select_keeps_exactly_what_torchs_mask_keeps(t, k, dtype, weighted):
    """Entries at the threshold and one step of the dtype either side of it (in score for WINA), a
    threshold that is not a value of the dtype: the same columns and values as
    ``mask_threshold`` (the sites' mask) in the same order, with K through the vector loop and
    its scalar tail."""
    assert _select_matches(t, k, dtype, weighted)


_SITE_WEIGHTS = (torch.float32, torch.bfloat16, torch.int8, "int4")


def _site_rows(kind, k, n, seed=1):
    """(SiteRows, its row sums from given entries): for int4 random nibble bytes, groups of 32."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(n, generator=g)
    if kind == "int4":
        rows = torch.randint(0, 256, (k, n // 2 + 4), generator=g, dtype=torch.uint8)
        groups = -(-k // 32)
        scale, zero = torch.rand(groups, n, generator=g) * 0.1, torch.randn(groups, n, generator=g) * 0.01
        return (cpu_native.SiteRows(rows, scale, bias, n=n, group=32, zero=zero),
                lambda idx, val, off, out: cpu_native.rows4_mv(rows, n, 32, idx, val, off, out, scale, zero, bias))
    w, _, _, _, _, scale, _ = _rows_case(1, k, n, kind, seed)
    return cpu_native.SiteRows(w, scale, bias), lambda idx, val, off, out: cpu_native.rows_mv(w, idx, val, off, out,
                                                                                              scale, bias)


@needs_native
@pytest.mark.parametrize("t, k, n", [(1, 300, 64), (3, 2061, 40), (8, 64, 4100)])
@pytest.mark.parametrize("kind", _SITE_WEIGHTS, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["teal", "wina"])
def test_site_rows_is_select_then_the_row_sums_bit_for_bit(t, k, n, kind, weighted):
    """One C call from the unmasked input == select, then rows_mv / rows4_mv on its entries, bit
    for bit, in fp32 and bf16 out; over ``max_entries`` it says no and leaves out untouched."""
    x, thr, scale = _site_case(t, k, torch.bfloat16, weighted)
    args = _select_args(x, thr, scale)
    site, sums = _site_rows(kind, k, n)
    offsets, idx, val = cpu_native.select(x, *args)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.full((t, n), 7.0, dtype=out_dtype)
        assert site(x, *args, idx.numel(), out)
        assert torch.equal(out, sums(idx, val, offsets, torch.empty(t, n, dtype=out_dtype)))
        out.fill_(7.0)
        assert not site(x, *args, idx.numel() - 1, out) and bool((out == 7.0).all())


@needs_native
@pytest.mark.parametrize("bad", ["x dtype", "x width", "out shape", "scale", "weight"])
def test_site_rows_refuses_what_it_cannot_read(bad):
    x, thr, scale = _site_case(1, 64, torch.bfloat16, True)
    w, out = torch.randn(64, 32), torch.empty(1, 32)
    if bad == "weight":
        with pytest.raises(ValueError, match="SiteRows"):
            cpu_native.SiteRows(w.half())
        return
    site = cpu_native.SiteRows(w)
    scale = scale.float()
    if bad == "x dtype":
        x = x.half()
    elif bad == "x width":
        x = x[:, :63]
    elif bad == "out shape":
        out = out[:, :31]
    else:
        scale = scale[:5]
    with pytest.raises(ValueError, match="SiteRows"):
        site(x, thr, scale, 64, out)


@needs_native
@pytest.mark.parametrize("n, k", [(41, 172), (8, 16), (3, 2048), (1, 7)])
def test_int8_decode_is_torchs_product_bit_for_bit(n, k):
    assert _decodes_exactly(n, k)


@needs_native
@pytest.mark.parametrize("m, n, k", _SHAPES)
def test_int8_gemv_matches_float64_and_gives_the_same_bits_at_any_token_count(m, n, k):
    """A token batched with others == that token alone: self-speculative verification runs several
    tokens through the kernel and compares them with decoding one at a time."""
    worst, same = _check(m, n, k)
    assert worst <= 0 and same


@needs_native
def test_it_is_built_for_the_widest_vectors_torch_reports():
    assert cpu_native.isa() == ("avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the AVX2 build is the default build on this CPU, tested above")
@needs_native
def test_the_avx2_build_on_an_avx512_cpu_meets_the_same_bound_and_bits(tmp_path):
    """SQUEEZE_NATIVE=avx2 builds the other variant, so one AVX-512 machine tests both."""
    code = ("import tests.kernels.test_cpu_native as t; from squeeze.kernels import cpu_native as m\n"
            "print(m.isa(), all(w <= 0 and same for w, same in map(lambda s: t._check(*s), t._SHAPES)),\n"
            "      t._decodes_exactly(41, 172),\n"
            "      all(w <= 0 and same for d in t._WEIGHTS\n"
            "          for w, same in (t._check_rows(*s, d) for s in t._ROWS_SHAPES)),\n"
            "      all(t._select_matches(*s) for s in ((3, 2061, d, w) for d in t._X_DTYPES for w in (0, 1))))")
    env = {**os.environ, "SQUEEZE_CACHE": str(tmp_path), "SQUEEZE_NATIVE": "avx2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["avx2"] + ["True"] * 4


@needs_native
def test_int8_gemv_gives_the_same_bits_at_any_thread_count():
    x, codes, scale = _case(3, 1000, 512, seed=1)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert cpu_native.library().sq_threads() == t  # torch's OpenMP runtime is the kernel's
            outs.append(cpu_native.int8_gemv(x, codes, scale))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_native
@pytest.mark.parametrize("bad", ["codes", "out", "rows"])
def test_int8_decode_refuses_what_it_cannot_write(bad):
    _, codes, scale = _case(1, 8, 32)
    out = torch.empty(8, 32)
    if bad == "codes":
        codes = codes.to(torch.uint8)
    elif bad == "out":
        out = out.half()
    with pytest.raises(ValueError, match="int8_decode"):
        cpu_native.int8_decode(codes, scale, 32, slice(0, 4 if bad == "rows" else 8), out)


@needs_native
@pytest.mark.parametrize("bad", ["dtype", "kp", "scale"])
def test_int8_gemv_refuses_what_it_cannot_read(bad):
    x, codes, scale = _case(1, 8, 32)
    if bad == "dtype":
        x = x.bfloat16()
    elif bad == "kp":
        x, codes = x[:, :24].contiguous(), codes[:, :24].contiguous()
    else:
        scale = scale[:4]
    with pytest.raises(ValueError, match="int8_gemv"):
        cpu_native.int8_gemv(x, codes, scale)


def _fresh(env: dict, tmp_path) -> str:
    """What a new process's library() and unavailable_reason() say, with ``env`` set."""
    code = ("from squeeze.kernels import cpu_native as m; lib = m.library(); "
            "print('built' if lib else 'none', m.unavailable_reason())")
    full = {**os.environ, "SQUEEZE_CACHE": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@needs_native
def test_one_build_per_source_in_the_cache(tmp_path):
    assert _fresh({}, tmp_path) == "built None"
    built = sorted((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
    stamp = built[0].stat().st_mtime_ns
    assert _fresh({}, tmp_path) == "built None"
    assert sorted((tmp_path / "native").iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # reused


def test_without_a_compiler_or_when_switched_off_it_says_why(tmp_path):
    none = _fresh({"CC": str(tmp_path / "no-such-cc")}, tmp_path)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert none == "none no C compiler (cc, or $CC) on PATH"
    assert _fresh({"SQUEEZE_NATIVE": "0"}, tmp_path) == "none SQUEEZE_NATIVE=0"
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc: error: broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert _fresh({"CC": str(failing)}, tmp_path) == "none could not build or load csrc/*.c: " \
            f"{failing} failed: cc: error: broken"
    assert not (tmp_path / "native").exists() or not list((tmp_path / "native").glob("*.so"))
