"""squeeze.kernels.cpu_native: our C kernels, compiled on first use. The int8 product against
float64 within the fp32 bound for K terms, the same bits at any thread count and token count, one
build per source in the cache, and a clear None (with the reason) where it cannot be built."""

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
            "      t._decodes_exactly(41, 172))")
    env = {**os.environ, "SQUEEZE_CACHE": str(tmp_path), "SQUEEZE_NATIVE": "avx2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["avx2", "True", "True"]


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
        assert _fresh({"CC": str(failing)}, tmp_path) == "none could not build or load csrc/qgemv.c: " \
            f"{failing} failed: cc: error: broken"
    assert not (tmp_path / "native").exists() or not list((tmp_path / "native").glob("*.so"))
