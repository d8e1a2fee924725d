"""Our own CPU kernels in C (``csrc/``), compiled on this machine on first use.

torch's weight-only int8 op runs fp32 and fp16 activations through a scalar loop on x86 (5-10x
slower than dense), and bf16 ones eight codes per instruction even on AVX-512. ``csrc/qgemv.c``
computes the same product for any activation dtype (x in fp32): a tile of rows per load of x and
of tokens per convert of the codes, prefetching; built for AVX-512 where torch reports the CPU so
(sixteen codes per instruction), else for AVX2 + FMA (``python -c "import squeeze.kernels.cpu_native as m;
m._bench_report()"``; numbers in kernels/README.md).

The library is built with the system C compiler (``$CC``, else ``cc``) the first time a process
asks for it, into ``$SQUEEZE_CACHE/native/`` (default ``~/.cache/squeeze/native/``), keyed by the
source, the flags and the compiler, written atomically (a concurrent build of the same key wins or
loses cleanly). Where it cannot be had, :func:`library` returns None and says why in
:func:`unavailable_reason`, and callers keep torch's ops:

- the CPU lacks AVX2 or FMA (``torch.backends.cpu.get_cpu_capability()``), or is not x86-64;
- no C compiler, or the build fails;
- ``SQUEEZE_NATIVE=0`` (the switch for comparing against torch's ops).

``SQUEEZE_NATIVE=avx2`` builds the AVX2 variant on an AVX-512 CPU (to compare the two, and so
that one machine tests both).

It is loaded after torch: it needs libgomp.so.1, and the loader resolves that soname to the copy
torch already loaded, so its OpenMP threads are torch's (``torch.set_num_threads`` applies).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["int8_decode", "int8_gemv", "isa", "library", "rows4_mv", "rows_mv", "select", "SiteRows",
           "unavailable_reason"]

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "qgemv.c", CSRC / "rows.c")  # one library; both include csrc/simd.h
# -ffp-contract=off: the C never fuses a * b + c on its own, so every rounding is the one written
# (the kernels' explicit FMAs), the same in a vector loop and its scalar tail: bits that do not
# depend on where a thread's columns start
FLAGS = ("-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
AVX512_FLAGS = ("-mavx512f", "-mavx512bw")  # torch's "AVX512" capability implies both
ENV_SWITCH = "SQUEEZE_NATIVE"

_lib: ctypes.CDLL | None = None
_why: str | None = None
_tried = False


def _cache_root() -> Path:
    root = os.environ.get("SQUEEZE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "squeeze") / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def _flags() -> tuple[str, ...]:
    wide = torch.backends.cpu.get_cpu_capability() == "AVX512" and os.environ.get(ENV_SWITCH) != "avx2"
    return FLAGS + AVX512_FLAGS if wide else FLAGS


def _build(cc: str) -> Path:
    """The library for this source, flags and compiler: from the cache, or compiled into it."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = _flags()
    text = b"".join(p.read_bytes() for p in (*SOURCES, CSRC / "simd.h"))
    key = hashlib.sha256(text + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    folder = _cache_root()
    path = folder / f"kernels-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then :func:`unavailable_reason` says why). Tried once per
    process."""
    global _lib, _why, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get(ENV_SWITCH) == "0":
        _why = f"{ENV_SWITCH}=0"
    elif platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() not in (
            "AVX2", "AVX512"):
        _why = f"needs an x86-64 CPU with AVX2 and FMA (this one: {platform.machine()}, "
        _why += f"{torch.backends.cpu.get_cpu_capability()})"
    elif (cc := _compiler()) is None:
        _why = "no C compiler (cc, or $CC) on PATH"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, RuntimeError) as e:
            _why = f"could not build or load csrc/*.c: {e}"
        else:
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.sq_int8_gemv.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr]
            lib.sq_int8_gemv.restype = ctypes.c_int
            lib.sq_int8_decode.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
            lib.sq_int8_decode.restype = None
            lib.sq_rows_mv.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr,
                                       ctypes.c_int]
            lib.sq_rows_mv.restype = ctypes.c_int
            lib.sq_rows4_mv.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
            lib.sq_rows4_mv.restype = ctypes.c_int
            lib.sq_select.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ctypes.c_float, ptr, ptr, ptr, ptr]
            lib.sq_select.restype = i64
            site = [ptr, ctypes.c_int, i64, i64, i64, ctypes.c_float, ptr, i64]
            lib.sq_site_mv.argtypes = site + [ptr, ctypes.c_int, i64, i64, ptr, ptr, ptr, ctypes.c_int]
            lib.sq_site_mv.restype = i64
            lib.sq_site4_mv.argtypes = site + [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
            lib.sq_site4_mv.restype = i64
            lib.sq_threads.restype = ctypes.c_int
            lib.sq_isa.restype = ctypes.c_int
            _lib = lib
    return _lib


def isa() -> str | None:
    """What the built library vectorises with ("avx512" or "avx2"), or None where it is not built."""
    lib = library()
    return None if lib is None else {512: "avx512", 256: "avx2"}[lib.sq_isa()]


def unavailable_reason() -> str | None:
    library()
    return _why


def int8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (codes * scale[:, None]).T`` in fp32 for x fp32 [M, Kp], codes int8 [N, Kp] (Kp a
    multiple of 16, padded with zero codes and zero inputs), scale fp32 [N]; all contiguous on
    CPU. The kernel reads the codes once per call whatever M is, and sums each output in a fixed
    order (the same bits at any thread count). Needs :func:`library`."""
    m, kp = x.shape
    n = codes.shape[0]
    if (x.dtype, codes.dtype, scale.dtype) != (torch.float32, torch.int8, torch.float32) or codes.shape[1] != kp \
            or kp % 16 or scale.shape != (n,) or not (x.is_contiguous() and codes.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"int8_gemv: needs x fp32 [M, Kp], codes int8 [N, Kp], scale fp32 [N], Kp % 16 == 0, contiguous; "
                         f"got {x.dtype} {tuple(x.shape)}, {codes.dtype} {tuple(codes.shape)}, {scale.dtype} "
                         f"{tuple(scale.shape)}")
    y = torch.empty(m, n, dtype=torch.float32)
    library().sq_int8_gemv(codes.data_ptr(), n, kp, scale.data_ptr(), x.data_ptr(), m, y.data_ptr())
    return y


def int8_decode(codes: torch.Tensor, scale: torch.Tensor, k: int, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """``out = codes[rows, :k] * scale[rows, None]`` in out's dtype (bf16, rounded to nearest even
    from the fp32 product, or fp32) for codes int8 [N, Kp] and scale fp32 [N], contiguous on CPU;
    out [rows, k] contiguous. Returns out. Needs :func:`library`."""
    r0, r1, _ = rows.indices(codes.shape[0])
    if codes.dtype != torch.int8 or scale.dtype != torch.float32 or out.dtype not in (torch.bfloat16, torch.float32) \
            or out.shape != (r1 - r0, k) or not 0 < k <= codes.shape[1] or scale.shape != codes.shape[:1] \
            or not (codes.is_contiguous() and scale.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"int8_decode: needs codes int8 [N, Kp], scale fp32 [N], out bf16 or fp32 [rows, K <= Kp], "
                         f"contiguous; got {codes.dtype} {tuple(codes.shape)}, {scale.dtype} {tuple(scale.shape)}, "
                         f"{out.dtype} {tuple(out.shape)} for rows {r0}:{r1}, K {k}")
    library().sq_int8_decode(codes.data_ptr(), codes.shape[1], k, scale.data_ptr(), r0, r1, out.data_ptr(),
                             int(out.dtype == torch.bfloat16))
    return out


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _ptr(v: torch.Tensor | None) -> int | None:
    return None if v is None else v.data_ptr()


def _rows_ok(w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return (w.dim() == 2 and w.dtype in _KINDS and w.is_contiguous()
            and all(v is None or (v.dtype == torch.float32 and v.shape == w.shape[1:] and v.is_contiguous())
                    for v in (scale, bias)))


def _rows4_ok(rows: torch.Tensor, n: int, group: int, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None) -> bool:
    groups = -(-rows.shape[0] // group) if group > 0 else 0
    return (rows.dim() == 2 and rows.dtype == torch.uint8 and rows.shape[1] * 2 >= n and group > 0
            and rows.is_contiguous()
            and all(v is None or (v.dtype == torch.float32 and v.shape[0] >= groups and v.shape[1:] == (n,)
                                  and v.is_contiguous()) for v in (scale, zero))
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (n,) and bias.is_contiguous())))


def _entries_ok(idx: torch.Tensor, val: torch.Tensor, offsets: torch.Tensor | None, out: torch.Tensor, t: int,
                n: int) -> bool:
    return (idx.dtype == torch.int64 and val.dtype == torch.float32 and idx.shape == val.shape and idx.dim() == 1
            and out.dtype in (torch.float32, torch.bfloat16) and out.shape == (t, n)
            and (offsets is None or offsets.dtype == torch.int64)
            and all(v is None or v.is_contiguous() for v in (idx, val, offsets, out)))


def rows_mv(w: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, offsets: torch.Tensor | None, out: torch.Tensor,
            scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = (sum_j val[j] * w[idx[j]]) * scale + bias`` over each token t's entries
    ``offsets[t]:offsets[t + 1]`` (an embedding bag's layout, ``offsets`` [T + 1]; None: one token,
    all entries): the rows of w (fp32, bf16 or int8 [K, N], e.g. a linear's weight by input row)
    that a token's non-zero inputs name, summed in fp32 in idx order, times the optional fp32
    per-output ``scale`` (an int8 weight's) plus the optional fp32 ``bias``, written to out (fp32
    or bf16 [T, N], rounded to nearest even once). All contiguous on CPU; idx int64, val fp32.
    Returns out. Needs :func:`library`."""
    t = 1 if offsets is None else offsets.numel() - 1
    if not (_rows_ok(w, scale, bias) and _entries_ok(idx, val, offsets, out, t, w.shape[-1])):
        raise ValueError(f"rows_mv: needs w fp32 / bf16 / int8 [K, N], idx int64 and val fp32 [nnz], offsets int64 "
                         f"[T + 1] or None, out fp32 / bf16 [T, N], scale and bias fp32 [N] or None, contiguous; got "
                         f"w {w.dtype} {tuple(w.shape)}, idx {idx.dtype} {tuple(idx.shape)}, val {val.dtype} "
                         f"{tuple(val.shape)}, out {out.dtype} {tuple(out.shape)}")
    n = w.shape[1]
    library().sq_rows_mv(w.data_ptr(), _KINDS[w.dtype], n, n, idx.data_ptr(), val.data_ptr(), _ptr(offsets), t,
                         idx.numel(), _ptr(scale), _ptr(bias), out.data_ptr(), int(out.dtype == torch.bfloat16))
    return out


def rows4_mv(rows: torch.Tensor, n: int, group: int, idx: torch.Tensor, val: torch.Tensor,
             offsets: torch.Tensor | None, out: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rows_mv` over int4 codes by input row: ``rows`` uint8 [K, >= ceil(N / 2)] (code u of
    output 2j in the low nibble of byte j, 2j + 1 in the high; torch's 4-bit bag layout, whose
    trailing scale and bias bytes are not read), weight ``(u - 8) * scale[g] + zero[g]`` for input
    rows of group g (``group`` inputs a group; ``scale``, ``zero`` fp32 [groups, N]; zero None:
    symmetric). A group's entries one after another (increasing idx, as ``nonzero`` gives them)
    read its scales once; in any order the sum is the same. Returns out."""
    t = 1 if offsets is None else offsets.numel() - 1
    if not (_rows4_ok(rows, n, group, scale, zero, bias) and _entries_ok(idx, val, offsets, out, t, n)):
        raise ValueError(f"rows4_mv: needs rows uint8 [K, >= N / 2], group > 0, idx int64 and val fp32 [nnz], out fp32 "
                         f"/ bf16 [T, N], scale and zero fp32 [groups, N], bias fp32 [N], contiguous; got rows "
                         f"{rows.dtype} {tuple(rows.shape)} for N {n}, group {group}, scale {scale.dtype} "
                         f"{tuple(scale.shape)}, out {out.dtype} {tuple(out.shape)}")
    library().sq_rows4_mv(rows.data_ptr(), rows.shape[1], n, group, idx.data_ptr(), val.data_ptr(), _ptr(offsets), t,
                          idx.numel(), scale.data_ptr(), _ptr(zero), _ptr(bias), out.data_ptr(),
                          int(out.dtype == torch.bfloat16))
    return out


def _x_ok(x: torch.Tensor, k: int, scale: torch.Tensor | None) -> bool:
    return (x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] == k and x.stride(1) == 1
            and (scale is None or (scale.dtype == torch.float32 and scale.shape == (k,) and scale.is_contiguous())))


def select(x: torch.Tensor, threshold: float, scale: torch.Tensor | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(offsets, idx, val): the inputs of each token of x (fp32 or bf16 [T, K], rows contiguous)
    whose score ``|x|`` (or ``|x| * scale``, fp32 [K]) is above ``threshold``, in column order, as
    :func:`rows_mv` reads them (val fp32; offsets [T + 1], None for one token). Scores are rounded
    to x's dtype and compared with ``threshold`` as given, so pass a value of x's dtype (and a
    scale of its values) for the set torch's mask in that dtype keeps. Needs :func:`library`."""
    t, k = x.shape
    if not _x_ok(x, k, scale):
        raise ValueError(f"select: needs x fp32 / bf16 [T, K] with contiguous rows and scale fp32 [K] or None; got x "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    idx = torch.empty(t * k, dtype=torch.int64)
    val = torch.empty(t * k, dtype=torch.float32)
    off = torch.empty(t + 1, dtype=torch.int64)
    nnz = library().sq_select(x.data_ptr(), int(x.dtype == torch.bfloat16), t, k, x.stride(0), threshold, _ptr(scale),
                              idx.data_ptr(), val.data_ptr(), off.data_ptr())
    return None if t == 1 else off, idx[:nnz], val[:nnz]


class SiteRows:
    """One linear's weight by input row, checked once, run from its *unmasked* input: a call is
    :func:`select` and :func:`rows_mv` (or :func:`rows4_mv`) in one C call, with no tensors for the
    entries in between (a decode step makes one per linear; the torch ops around a mask, its
    non-zero search and the bag cost more than the bag itself at 10% active).

    ``SiteRows(w, scale, bias)``: :func:`rows_mv`'s weight, fp32 / bf16 / int8 [K, N];
    ``SiteRows(rows, scale, bias, n=N, group=G, zero=Z)``: :func:`rows4_mv`'s int4 codes."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                 n: int | None = None, group: int | None = None, zero: torch.Tensor | None = None):
        lib = library()
        if group is None:
            if not _rows_ok(w, scale, bias):
                raise ValueError(f"SiteRows: needs w fp32 / bf16 / int8 [K, N], scale and bias fp32 [N] or None, "
                                 f"contiguous; got w {w.dtype} {tuple(w.shape)}")
            self.n = w.shape[1]
            self._fn, self._args = lib.sq_site_mv, (w.data_ptr(), _KINDS[w.dtype], self.n, self.n, _ptr(scale),
                                                     _ptr(bias))
        else:
            if n is None or scale is None or not _rows4_ok(w, n, group, scale, zero, bias):
                raise ValueError(f"SiteRows: needs int4 rows uint8 [K, >= N / 2], group > 0, scale and zero fp32 "
                                 f"[groups, N], bias fp32 [N]; got rows {w.dtype} {tuple(w.shape)} for N {n}, group "
                                 f"{group}")
            self.n = n
            self._fn, self._args = lib.sq_site4_mv, (w.data_ptr(), w.shape[1], n, group, scale.data_ptr(),
                                                      _ptr(zero), _ptr(bias))
        self.k = w.shape[0]
        self._keep = (w, scale, bias, zero)  # the pointers above stay valid while this object lives

    def __call__(self, x: torch.Tensor, threshold: float, score_scale: torch.Tensor | None, max_entries: int,
                 out: torch.Tensor) -> bool:
        """``out`` [T, N] (fp32 / bf16) = x [T, K] masked as :func:`select` keeps it, times the
        weight; False (out untouched) when the call keeps more than ``max_entries`` inputs in all."""
        t = x.shape[0]
        if not (_x_ok(x, self.k, score_scale) and out.dtype in (torch.float32, torch.bfloat16)
                and out.shape == (t, self.n) and out.is_contiguous()):
            raise ValueError(f"SiteRows: needs x fp32 / bf16 [T, {self.k}] with contiguous rows, score scale fp32 "
                             f"[{self.k}] or None, out fp32 / bf16 [T, {self.n}]; got x {x.dtype} {tuple(x.shape)}, "
                             f"out {out.dtype} {tuple(out.shape)}")
        got = self._fn(x.data_ptr(), int(x.dtype == torch.bfloat16), t, self.k, x.stride(0), threshold,
                       _ptr(score_scale), max_entries, *self._args, out.data_ptr(), int(out.dtype == torch.bfloat16))
        if got == -1:
            raise MemoryError(f"SiteRows: no memory for {t * self.k} entries")
        return got >= 0


def _bench(n: int = 5632, k: int = 2048, tokens: int = 1, copies: int = 6, rounds: int = 30) -> dict[str, float]:
    """Median ms of ``copies`` different weights (so they come from memory, not cache) through
    dense F.linear, torch's int8 op and :func:`int8_gemv`, ``tokens`` tokens in bf16 (and in fp32:
    dense fp32 against ours), rounds interleaved."""
    x = torch.randn(tokens, k).bfloat16()
    x32 = x.float()
    dense = [torch.randn(n, k).bfloat16() for _ in range(copies)]
    dense32 = [torch.randn(n, k) for _ in range(copies)]
    codes = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
    scale = torch.rand(n)
    s16 = scale.bfloat16()
    cases = {
        "dense bf16": lambda: [torch.nn.functional.linear(x, w) for w in dense],
        "torch int8 op": lambda: [torch.ops.aten._weight_int8pack_mm(x, c, s16) for c in codes],
        "ours int8": lambda: [int8_gemv(x.float(), c, scale).bfloat16() for c in codes],
        "dense fp32": lambda: [torch.nn.functional.linear(x32, w) for w in dense32],
        "ours int8 fp32": lambda: [int8_gemv(x32, c, scale) for c in codes],
    }
    return _median_ms(cases, rounds)


def _median_ms(cases: dict, rounds: int) -> dict[str, float]:
    """Median ms of each of ``cases`` (name -> a function of no arguments) over ``rounds`` rounds,
    the cases interleaved within a round so that load from other jobs hits them alike."""
    import statistics
    import time

    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def _bench_report() -> None:
    if library() is None:
        raise SystemExit(f"native kernels unavailable: {unavailable_reason()}")
    print(f"threads {torch.get_num_threads()} (native sees {library().sq_threads()}), built for {isa()}")
    for tokens in (1, 8):
        ms = _bench(tokens=tokens)
        for name, t in ms.items():
            dtype = "fp32" if "fp32" in name else "bf16"
            print(f"{tokens} token{'s' if tokens > 1 else ' '} {name:15s} {t:7.2f} ms  "
                  f"{ms['dense ' + dtype] / t:4.2f}x dense {dtype}")
