"""CPU weight-only quantized linears: torch's own kernels, and for int8 decode our own
(:mod:`squeeze.kernels.cpu_native`) where it is built.

The weights come in the quantized-weight layout (codes [N, K], fp32 scales [N, G], uint8 zero
points for asymmetric int; see ``squeeze.algorithms.quant``). Int8 calls of fewer than
:data:`INT8_GEMM_TOKENS` tokens run our kernel, in any activation dtype, when this machine could
build it (fp32 scales; in bf16 it streamed the codes 1.1-1.2x faster than torch's op on an
AVX-512 Xeon, as fast on an AVX2 EPYC, kernels/README.md); longer calls (prefill) decode a
cache-sized panel of rows at a time (our decoder where it is built) and run the dense GEMM on it.
Otherwise, and for int4, two aten ops do the work:

``torch.ops.aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])``
    ``y = x @ (w * scales[:, None]).T``: per-channel symmetric int8 only (no groups, no zero
    point). ``scales`` must have x's dtype. Only bf16 is vectorised on x86 (eight codes per
    convert, even on AVX-512); fp32 and fp16 run a scalar loop. The bf16 loop reads x with *aligned* vector loads and has no K tail: K must be a
    multiple of 8 (AVX2; 16 on AVX-512) and every row of x 16-byte (32) aligned, else it reads
    past the row or faults (segfaults seen here at K % 8 != 0 with M > 1, and at an x offset by
    one element). :func:`int8_linear_cpu` therefore pads K to a multiple of 16 (zero codes, zero
    inputs) and copies a misaligned x.
``torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], packed, gk, scales_and_zeros [K/gk, N, 2])``
    dequantizes nibble u to ``(u - 8) * scale + zero_term`` (checked by experiment). ``packed`` is
    ``_convert_weight_to_int4pack_for_cpu(u int32 [N, K], innerKTiles)`` (innerKTiles is ignored
    on CPU); its byte order depends on the CPU's vector width, so a packed weight belongs to the
    machine that packed it and is never saved. Constraints (its own checks): N % 16 == 0,
    K % gk == 0, gk in {32, 64, 128, 256}; x and scales_and_zeros of one dtype (bf16, fp16 or
    fp32; only bf16 is vectorised on x86). Our layouts map onto it as: sym ``zero_term = 0``;
    asym ``w = (u - z) s = (u - 8) s + (8 - z) s``, so ``zero_term = (8 - z) s``. A group size g
    runs as the largest gk dividing g (per-channel: any gk, the row's scale repeated), K and N
    are padded (pad codes 8, pad inputs 0, pad rows cut off), so every K works. A g none of them
    divides (16, 100) gets None from :func:`prepare_int4_cpu`; 96 runs as gk = 32.

Precision: both ops take scales (and zero terms) in x's dtype, so with bf16 activations each
weight is ``code * bf16(s)`` (relative error <= 2^-8), accumulated in fp32, and the output is
rounded to bf16. With an asymmetric group, ``(z - 8) * bf16(s) + bf16((8 - z) s)`` is no longer
exactly 0: a masked entry contributes at most ``|8 - z| * s * 2^-8`` times its input. Symmetric
zeros stay exact. fp16 activations also round s to fp16, which is subnormal below 6.1e-5 (int8
rows with absmax < 0.0078): precision falls there.

Measured (1 thread, x bf16 [1, 4096] @ W [11008, 4096], int4 group 128; 30 interleaved rounds;
torch 2.13 CPU; AMD EPYC, AVX2, no AVX-512; 2 cores shared with another job at load average 2.7,
so only the ratios mean much)::

    OMP_NUM_THREADS=1 .venv/bin/python -c "import squeeze.kernels.quant_cpu as m; m._bench_report()"

                min        median
    dense      9.69 ms   10.13 ms   F.linear, bf16 weight
    int8       5.30 ms    5.62 ms   1.83x dense (mins)
    int4 g128  6.42 ms    6.64 ms   1.51x dense (mins)

Runs minutes apart gave 1.5-1.8x for int8 and 1.5-1.7x for int4. An earlier measurement gave
8.07 / 3.53 / 2.34 ms (int4 the fastest); this CPU reports AVX2 only, while the project's earlier
bench notes name an AVX-512 Xeon, where the ops take their AVX-512 paths.
fp32 and fp16 activations run the ops' scalar loops, 5-10x *slower* than dense here (raw ops,
fp32: int8 70 ms, int4 110 ms against 11.7 ms dense): :data:`FAST_DTYPES` lists the dtypes worth
the ops; a caller dequantizes for the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_native
from .cpu_input_sparse import bag_blocks, bag_offsets, blocked_bags, nonzero_entries, token_offsets, unblock

__all__ = ["FAST_DTYPES", "MIN_KERNEL_WEIGHTS", "kernel_pays", "ROWS_ACTIVE", "Int4CPUWeight", "Int4RowsWeight", "Int8CPUWeight", "Int8RowsWeight", "int4_linear_cpu",
           "int4_rows_linear_cpu", "int8_linear_cpu", "int8_rows_linear_cpu", "quant_rows_supported", "prepare_int4_cpu",
           "prepare_int4_rows_cpu", "prepare_int8_cpu", "prepare_int8_rows_cpu", "rows_active_limit", "rows_pay",
           "site_rows", "NATIVE_ROWS_ACTIVE"]

FAST_DTYPES = frozenset({torch.bfloat16})  # activation dtypes where the ops beat dense F.linear on x86
# A weight-only call costs microseconds more than F.linear, which a small weight's fewer bytes do
# not pay back: our int8 kernel (squeeze.kernels.cpu_native) was 0.57 / 0.95 / 1.26 / 1.49 / 1.99x
# dense fp32 at 64^2 / 256^2 / 512^2 / 1024^2 / 2048 x 1024 weights (1 thread, one token), and on
# stories260k (64 / 172 wide) int8 decoded at 0.84x dense bf16 through torch's op, 0.68x through
# ours (`squeeze bench`). Below this many weights the dense decoded weight runs instead.
MIN_KERNEL_WEIGHTS = 512 * 512
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the ops accept
_INT8_K_MULTIPLE = 16  # the bf16 loop steps 8 (AVX2) or 16 (AVX-512) columns, with no tail
_X_ALIGN = 64  # bytes; the bf16 loop's aligned loads need 16 (AVX2) or 32 (AVX-512)
_INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 op accepts, largest first


def _have(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def kernel_pays(bits: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a weight-only [n, k] linear of ``bits`` with ``dtype`` activations runs faster here
    than dense ``F.linear``: never below :data:`MIN_KERNEL_WEIGHTS` weights; in bf16 always (our
    int8 kernel or torch's ops); for int8 in fp32 / fp16 through our own kernel, if it builds."""
    if n * k < MIN_KERNEL_WEIGHTS:
        return False
    if dtype in FAST_DTYPES:
        return True
    return bits == 8 and dtype in _DTYPES and cpu_native.library() is not None


@dataclass(eq=False)
class Int8CPUWeight:
    """What :func:`int8_linear_cpu` needs: codes int8 [N, Kp] (K padded to a multiple of 16 with
    zeros), the per-row scale fp32 [N], K. The scale in each activation dtype is cached."""

    codes: torch.Tensor
    scale: torch.Tensor
    in_features: int
    _cast: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # fresh on replace()

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = self.scale.to(dtype)
        return self._cast[dtype]


@dataclass(eq=False)
class Int4CPUWeight:
    """What :func:`int4_linear_cpu` needs: torch's packed int4 weight for this CPU [Np, Kp/2]
    (N padded to a multiple of 16, K to a multiple of ``kernel_group``), scales_and_zeros fp32
    [Kp/kernel_group, Np, 2], the op's group size, and the true N and K. Not portable between
    machines (the packing follows the CPU's vector width)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    kernel_group: int
    in_features: int
    out_features: int
    _cast: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # fresh on replace()

    def scales_and_zeros_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = self.scales_and_zeros.to(dtype)
        return self._cast[dtype]


def _check_scale(scale: torch.Tensor, n: int, what: str) -> None:
    if scale.dim() not in (1, 2) or scale.shape[0] != n or not scale.dtype.is_floating_point:
        raise ValueError(f"{what}: scale must be float [N, G] (or [N]) with N={n} rows, got {scale.dtype} "
                         f"{tuple(scale.shape)}")


def prepare_int8_cpu(codes: torch.Tensor, scale: torch.Tensor) -> Int8CPUWeight | None:
    """Symmetric per-channel int8 (codes int8 [N, K], scale [N, 1] or [N]) -> :class:`Int8CPUWeight`.

    None where the op cannot run the layout: uint8 codes (asymmetric), more than one group per row,
    torch without the op, or an empty weight. Then the caller dequantizes.
    """
    if codes.dim() != 2:
        raise ValueError(f"int8 codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    _check_scale(scale, n, "prepare_int8_cpu")
    if codes.dtype != torch.int8 or (scale.dim() == 2 and scale.shape[1] != 1):
        return None
    if not _have("_weight_int8pack_mm") or n == 0 or k == 0:
        return None
    kp = -(-k // _INT8_K_MULTIPLE) * _INT8_K_MULTIPLE
    packed = torch.zeros(n, kp, dtype=torch.int8)
    packed[:, :k] = codes
    return Int8CPUWeight(packed, scale.reshape(n).float().contiguous(), k)


def _int4_kernel_group(g: int, groups: int, k: int) -> int | None:
    """The op's group size for our group size g: it must divide g (each op group inside one of
    ours), unless there is one group per row; then the one that pads K least (ties: the larger)."""
    if groups == 1:
        return min(_INT4_GROUPS, key=lambda gk: (-(-k // gk) * gk, -gk))
    return next((gk for gk in _INT4_GROUPS if g % gk == 0), None)


def prepare_int4_cpu(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     group_size: int | None) -> Int4CPUWeight | None:
    """int4 nibbles u uint8 [N, K] (values 0..15; sym: q + 8), scale fp32 [N, G], zero uint8 [N, G]
    (asymmetric) or None (symmetric), group_size (None = one group per row) -> :class:`Int4CPUWeight`.

    None where the op cannot run the layout (a group size no op group size divides, e.g. 16 or 100)
    or torch lacks the ops; then the caller dequantizes.
    """
    if u.dim() != 2 or u.dtype != torch.uint8:
        raise ValueError(f"int4 codes must be uint8 nibbles [N, K] (unpacked), got {u.dtype} "
                         f"{tuple(u.shape)}")
    n, k = u.shape
    _check_scale(scale, n, "prepare_int4_cpu")
    scale = scale.reshape(n, -1).float()
    g = group_size or k
    groups = -(-k // g) if k else 0
    if scale.shape[1] != groups:
        raise ValueError(f"prepare_int4_cpu: K={k} with group size {g} has {groups} groups, but scale has "
                         f"{scale.shape[1]}")
    if zero is not None and (zero.dtype != torch.uint8 or zero.shape != scale.shape):
        raise ValueError(f"prepare_int4_cpu: zero must be uint8 {tuple(scale.shape)} like scale, got "
                         f"{zero.dtype} {tuple(zero.shape)}")
    ops = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    if n == 0 or k == 0 or not all(_have(op) for op in ops):
        return None
    if bool((u > 15).any()) or (zero is not None and bool((zero > 15).any())):
        raise ValueError("prepare_int4_cpu: int4 codes and zero points must be 0..15")
    gk = _int4_kernel_group(g, groups, k)
    if gk is None:
        return None
    kp, np_ = -(-k // gk) * gk, -(-n // 16) * 16
    u32 = torch.full((np_, kp), 8, dtype=torch.int32)  # pad code 8: zero for sym; pad inputs are 0 anyway
    u32[:n, :k] = u
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u32, 1)
    # every op group starts below K, so it lies in our group (j * gk) // g (g is a multiple of gk)
    ours = torch.arange(kp // gk) * gk // g  # (Kp/gk,)
    s = scale[:, ours]  # (N, Kp/gk)
    zt = torch.zeros_like(s) if zero is None else (8.0 - zero[:, ours].float()) * s
    sz = torch.zeros(kp // gk, np_, 2)
    sz[:, :n, 0] = s.T
    sz[:, :n, 1] = zt.T
    return Int4CPUWeight(packed, sz, gk, k, n)


def _rows(x: torch.Tensor, k: int, kp: int, what: str) -> torch.Tensor:
    """x [..., K] -> contiguous [M, Kp] the ops can read: zero-padded to Kp, 64-byte aligned."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"{what}: x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{what}: x must be [..., K] with K={k}, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, k)
    if kp != k:
        return F.pad(x2, (0, kp - k))  # a fresh, aligned buffer
    x2 = x2.contiguous()
    if not torch.compiler.is_compiling() and x2.data_ptr() % _X_ALIGN:
        x2 = x2.clone()  # the bf16 int8 loop's aligned loads fault on a misaligned row
    return x2


def _finish(y: torch.Tensor, x: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    if y.shape[1] != n:
        y = y[:, :n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


# The int8 GEMV kernels' time grows with the token count; from INT8_GEMM_TOKENS tokens on (prefill)
# the codes are decoded a panel of rows at a time and each panel runs through the dense GEMM while
# it is still in cache. W 5632 x 2048, bf16, 1 thread, ours / panels / dense bf16 (AVX-512 Xeon):
# 4.2 / 7.6 / 3.4 ms at 8 tokens, 6.9 / 6.8 / 3.5 at 16, 12.8 / 8.2 / 4.9 at 32, 49.0 / 14.9 /
# 10.0 at 128 (OMP_NUM_THREADS=1 python -c "import squeeze.kernels.quant_cpu as m;
# m._bench_prefill()"; decoding the whole weight into a workspace first took 15-28 ms).
INT8_GEMM_TOKENS = 32
_PANEL_BYTES = 1 << 20  # decoded rows per GEMM call: about a core's L2


def _panel(prepared: Int8CPUWeight, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """``codes[rows] * scale[rows]`` in out's dtype: our decoder where it is built (bf16 / fp32),
    else two torch ops (the codes cast exactly, then multiplied by the scale in out's dtype)."""
    k = prepared.in_features
    if out.dtype != torch.float16 and not torch.compiler.is_compiling() and cpu_native.library() is not None:
        return cpu_native.int8_decode(prepared.codes, prepared.scale, k, rows, out)
    out.copy_(prepared.codes[rows, :k])  # int8 -> dtype: exact (|code| <= 127)
    return out.mul_(prepared.scale_as(out.dtype)[rows, None])


def _gemm(x2: torch.Tensor, prepared: Int8CPUWeight) -> torch.Tensor:
    """x2 [M, K] @ dequantize(codes, scale).T [M, N] through the dense GEMM, one panel of decoded
    rows at a time: the decoded weight is never written out whole to memory (in bf16 that cost 9
    bytes of traffic a weight: the codes read, written as bf16, read and written by the scale, read
    by the GEMM), only read back from cache."""
    n, k = prepared.out_features, prepared.in_features
    step = max(16, _PANEL_BYTES // (k * x2.element_size()))
    buf = torch.empty(min(step, n), k, dtype=x2.dtype)
    y_t = torch.empty(n, x2.shape[0], dtype=x2.dtype)  # y transposed: a panel's outputs are whole rows
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        torch.mm(_panel(prepared, rows, buf[:rows.stop - r0]), x2.T, out=y_t[rows])
    return y_t.T


def int8_linear_cpu(x: torch.Tensor, prepared: Int8CPUWeight, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``x @ dequantize(codes, scale).T (+ bias)`` for x [..., K] (bf16, fp16 or fp32); calls of
    :data:`INT8_GEMM_TOKENS` tokens or more through panels of the decoded weight and the dense GEMM,
    fewer through our own kernel where it is built (:mod:`squeeze.kernels.cpu_native`; fp32 scales),
    else torch's op (scales rounded to x's dtype; in fp32 / fp16 a scalar loop, slower than
    dense)."""
    k, n = prepared.in_features, prepared.out_features
    if x.dim() >= 1 and x.shape[-1] == k and x.numel() >= INT8_GEMM_TOKENS * k and x.dtype in _DTYPES:
        return _finish(_gemm(x.reshape(-1, k), prepared), x, n, bias)
    x2 = _rows(x, k, prepared.codes.shape[1], "int8_linear_cpu")
    if x2.shape[0] == 0:
        return _finish(x2.new_zeros(0, n), x, n, bias)
    if not torch.compiler.is_compiling() and cpu_native.library() is not None:
        y = cpu_native.int8_gemv(x2.float(), prepared.codes, prepared.scale).to(x.dtype)  # fp32 scales
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, prepared.codes, prepared.scale_as(x.dtype))  # (M, N)
    return _finish(y, x, n, bias)


def int4_linear_cpu(x: torch.Tensor, prepared: Int4CPUWeight, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``x @ dequantize(u, scale, zero).T (+ bias)`` for x [..., K] (bf16, fp16 or fp32; fast: bf16)."""
    k, n = prepared.in_features, prepared.out_features
    kp = prepared.packed.shape[1] * 2
    x2 = _rows(x, k, kp, "int4_linear_cpu")
    if x2.shape[0] == 0:
        return _finish(x2.new_zeros(0, n), x, n, bias)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, prepared.packed, prepared.kernel_group,
                                                   prepared.scales_and_zeros_as(x.dtype))  # (M, Np)
    return _finish(y, x, n, bias)


# -- codes read by input row: activation sparsity on quantized weights ----------------------------
# TEAL / WINA zero most inputs of a linear; torch's quantized embedding bags read only the input
# rows a bag names, each row as 8-bit (or 4-bit) codes with its own scale and bias appended. Our
# weights are scaled per *output* row (and group of K), so the rows store the codes themselves
# (scale 1 and a bias that decodes every code back exactly: int8 code + 128 with bias -128, int4
# nibble u with bias -8, i.e. u - 8) and the output scales multiply the bags' fp32 sums; int4 runs
# one bag per group of K, whose sums its group's scales (and zero terms) weigh. One token's call
# reads active x N codes, against K x N for torch's weight-only ops. 1 thread, AVX-512, one
# token, cycling over 8 weights (which fit this machine's 480 MB L3: from memory every path is
# slower, the bags' scattered rows more than the ops' streams, bench/README.md section 8b): int8 W 2048 x 5632 at 30% active 0.58 ms against the int8 op
# 1.67 ms and dense bf16 2.13 ms (W 5632 x 2048: 0.34 ms at 30%, 0.82 ms at 50%, int8 op 0.81
# ms); int4 g128 W 5632 x 2048 at 30% 0.35 ms against the int4 op 0.80 ms.
ROWS_ACTIVE = 0.4  # the bags while a token keeps at most this fraction of K (int8 break-even ~0.5)
# With our row kernel (csrc/rows.c, 2.6-3.6x torch's int8 bag; kernels/README.md) against our
# int8 GEMV (csrc/qgemv.c): the largest measured active fraction (0.1 / 0.3 / ... / 0.9) at which
# the rows were >= 1.1x on both W 2048 x 5632 and 5632 x 2048, weights from memory, 1 thread,
# AVX-512 Xeon, 2026-12-03, in a loop like cpu_input_sparse._bench_report's with 1-8 tokens
# sharing one active set (one token: 2.39x / 1.43x at 70%, 1.87x / 1.08x at 90%; two at 50%:
# 2.23x / 1.41x; eight at 30%: 1.94x / 1.56x). (at most this many tokens, active):
NATIVE_ROWS_ACTIVE = ((1, 0.7), (2, 0.5), (8, 0.3))
NATIVE_OUT = (torch.float32, torch.bfloat16)
_BAG_OP = "embedding_bag_byte_rowwise_offsets"
_BAG4_OP = "embedding_bag_4bit_rowwise_offsets"


@dataclass(eq=False)
class Int8RowsWeight:
    """What :func:`int8_rows_linear_cpu` needs: the codes by input row and the per-output scale
    fp32 [N]. Where our C kernel is built (:func:`~squeeze.kernels.cpu_native.rows_mv`), ``rows``
    is the codes themselves, int8 [K, N]; else torch's quantized embedding bag layout in
    ``blocks`` column blocks (:func:`~squeeze.kernels.cpu_input_sparse.blocked_bags`), uint8
    [K * blocks, N / blocks + 8] (code + 128, then fp32 1.0 and -128.0 as the row's scale and
    bias)."""

    rows: torch.Tensor
    scale: torch.Tensor
    blocks: int = 1

    @property
    def native(self) -> bool:
        return self.rows.dtype == torch.int8

    @property
    def in_features(self) -> int:
        return self.rows.shape[0] // self.blocks

    @property
    def out_features(self) -> int:
        return self.scale.shape[0]


def quant_rows_supported() -> bool:
    """Whether this torch has the quantized embedding bags (builds without FBGEMM do not)."""
    return hasattr(torch.ops.quantized, _BAG_OP) and hasattr(torch.ops.quantized, _BAG4_OP)


def prepare_int8_rows_cpu(prepared: Int8CPUWeight, blocks: int | None = None,
                          native: bool | None = None) -> Int8RowsWeight | None:
    """The rows layout of an :class:`Int8CPUWeight` (1 byte per weight more, built once per
    linear): for our C kernel where it is built (``native``, default: whether it is), else for
    torch's bag split into ``blocks`` column blocks (default: one per thread torch has now, see
    :func:`~squeeze.kernels.cpu_input_sparse.bag_blocks`); None with neither."""
    k, n = prepared.in_features, prepared.out_features
    if native is None:
        native = cpu_native.library() is not None
    if native:
        return Int8RowsWeight(prepared.codes[:, :k].t().contiguous(), prepared.scale)
    if not quant_rows_supported():
        return None
    b = bag_blocks(1, n) if blocks is None else blocks
    if n % b:
        raise ValueError(f"{n} outputs do not split into {b} blocks")
    rows = torch.empty(k * b, n // b + 8, dtype=torch.uint8)
    codes = (prepared.codes[:, :k].t().to(torch.int16) + 128).to(torch.uint8)  # [K, N]
    rows[:, :-8] = codes.reshape(k * b, n // b)  # row r * b + j: input r's block j
    rows[:, -8:] = torch.tensor([1.0, -128.0]).view(torch.uint8)
    return Int8RowsWeight(rows, prepared.scale, b)


def int8_rows_linear_cpu(x: torch.Tensor, prepared: Int8RowsWeight, bias: torch.Tensor | None = None,
                         entries: tuple | None = None) -> torch.Tensor:
    """``x @ dequantize(codes, scale).T (+ bias)`` for x [T, K] with zeros in it, over the codes of
    each token's non-zero inputs (``entries``:
    :func:`~squeeze.kernels.cpu_input_sparse.nonzero_entries` of x, if known): our kernel, or one
    bag per (token, column block); sums in fp32 (exact products of codes and fp32 inputs), one
    fp32 scale per output, rounded to x's dtype once."""
    t, (tok, col, val) = x.shape[0], entries if entries is not None else nonzero_entries(x)
    if prepared.native:
        out = torch.empty(t, prepared.out_features, dtype=x.dtype if x.dtype in NATIVE_OUT else torch.float32)
        y = cpu_native.rows_mv(prepared.rows, col, val.float(), token_offsets(tok, t), out, prepared.scale,
                               None if bias is None else bias.float())
        return y.to(x.dtype)
    idx, offsets, weights = blocked_bags((tok, col, val.float()), t, prepared.blocks)
    sums = getattr(torch.ops.quantized, _BAG_OP)(prepared.rows, idx, offsets, False, 0, False, weights, None, False)
    y = unblock(sums, t, prepared.blocks) * prepared.scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rows_active_limit(prepared, tokens: int) -> float:
    """The largest fraction of the inputs a token may keep, in a call of ``tokens`` tokens, for
    the codes by input row to beat the weight-only kernel: :data:`NATIVE_ROWS_ACTIVE` with our
    kernel (int8), :data:`ROWS_ACTIVE` with torch's bags."""
    if isinstance(prepared, Int8RowsWeight) and prepared.native:
        return next((a for t, a in NATIVE_ROWS_ACTIVE if tokens <= t), 0.0)
    return ROWS_ACTIVE


def rows_pay(prepared, tokens: int, active: float) -> bool:
    """Whether the codes by input row beat the weight-only kernel for a call of ``tokens`` tokens
    that each keep ``active`` of the inputs (:func:`rows_active_limit`)."""
    return active <= rows_active_limit(prepared, tokens)


def site_rows(prepared, bias: torch.Tensor | None, tokens: int, active: float | None
              ) -> tuple[cpu_native.SiteRows, float] | None:
    """(:class:`~squeeze.kernels.cpu_native.SiteRows` over the codes by input row, the largest
    fraction of its inputs a token may keep for them to pay) for calls of ``tokens`` tokens of a
    site that keeps ``active`` of its inputs (None: only the data knows, so each call is counted),
    or None: our kernel is not built for this layout, or ``active`` does not pay
    (:func:`rows_pay`; a calibrated fraction is trusted for every call, as
    :func:`int8_rows_linear_cpu`'s callers do)."""
    limit = rows_active_limit(prepared, tokens)
    if active is not None:
        if active > limit:
            return None
        limit = 1.0
    b = None if bias is None else bias.detach().float().contiguous()
    if isinstance(prepared, Int8RowsWeight) and prepared.native:
        return cpu_native.SiteRows(prepared.rows, prepared.scale, b), limit
    if isinstance(prepared, Int4RowsWeight) and cpu_native.library() is not None:
        return cpu_native.SiteRows(prepared.rows, prepared.scale, b, n=prepared.out_features,
                                   group=prepared.kernel_group, zero=prepared.zero_term), limit
    return None


@dataclass(eq=False)
class Int4RowsWeight:
    """What :func:`int4_rows_linear_cpu` needs: the nibbles by input row, uint8 [K, ceil(N/2) +
    4] (u of outputs 2j, 2j+1 in the low, high nibble; then fp16 1.0 and -8.0: the bag decodes u -
    8), the op group size, and the scales and zero terms of an :class:`Int4CPUWeight`, each fp32
    [Kp/gk, N] (w = (u - 8) s + zero term); zero_term None when every one is 0 (symmetric)."""

    rows: torch.Tensor
    kernel_group: int
    scale: torch.Tensor
    zero_term: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return self.rows.shape[0]

    @property
    def out_features(self) -> int:
        return self.scale.shape[1]


def prepare_int4_rows_cpu(u: torch.Tensor, prepared: Int4CPUWeight) -> Int4RowsWeight | None:
    """The rows layout of int4 nibbles u uint8 [N, K] (0..15) that ``prepared`` was packed from
    (0.5 byte per weight more; torch's 4-bit bag layout, which our kernel reads too); None with
    neither torch's quantized embedding bags nor our kernel."""
    if not quant_rows_supported() and cpu_native.library() is None:
        return None
    n, k = prepared.out_features, prepared.in_features
    ut = torch.full((k, n + n % 2), 8, dtype=torch.uint8)  # an odd N pads a code 8 (weight 0)
    ut[:, :n] = u.t()
    rows = torch.empty(k, ut.shape[1] // 2 + 4, dtype=torch.uint8)
    rows[:, :-4] = ut[:, 0::2] | (ut[:, 1::2] << 4)
    rows[:, -4:] = torch.tensor([1.0, -8.0], dtype=torch.float16).view(torch.uint8)
    sz = prepared.scales_and_zeros[:, :n]  # [Kp/gk, N, 2]
    zero = sz[..., 1].contiguous()
    return Int4RowsWeight(rows, prepared.kernel_group, sz[..., 0].contiguous(),
                          None if not bool(zero.any()) else zero)


def int4_rows_linear_cpu(x: torch.Tensor, prepared: Int4RowsWeight, bias: torch.Tensor | None = None,
                         entries: tuple | None = None) -> torch.Tensor:
    """``x @ dequantize(u, scale, zero).T (+ bias)`` for x [T, K] with zeros in it, over the codes
    of each token's non-zero inputs (``entries``:
    :func:`~squeeze.kernels.cpu_input_sparse.nonzero_entries` of x, if known): our kernel
    (:func:`~squeeze.kernels.cpu_native.rows4_mv`) where it is built, else one bag per (token,
    group of K; the groups already give the threads several bags); each group's fp32 sums times
    its scales, plus its zero terms times the group's input sum (asymmetric); rounded to x's dtype
    once."""
    t, gk = x.shape[0], prepared.kernel_group
    groups = prepared.scale.shape[0]
    tok, col, val = entries if entries is not None else nonzero_entries(x)
    n = prepared.out_features
    if cpu_native.library() is not None:
        out = torch.empty(t, n, dtype=x.dtype if x.dtype in NATIVE_OUT else torch.float32)
        y = cpu_native.rows4_mv(prepared.rows, n, gk, col, val.float(), token_offsets(tok, t), out, prepared.scale,
                                prepared.zero_term, None if bias is None else bias.float())
        return y.to(x.dtype)
    bag = torch.div(col, gk, rounding_mode="floor")  # entries run by token, then column: so by group
    if tok is not None:
        bag = bag + tok * groups
    weights = val.float()
    sums = getattr(torch.ops.quantized, _BAG4_OP)(prepared.rows, col, bag_offsets(bag, t * groups), False, 0, False,
                                                   weights, None, False)
    y = (sums.view(t, groups, -1)[..., :n] * prepared.scale).sum(1)  # an odd N's pad column cut
    if prepared.zero_term is not None:
        xsum = torch.zeros(t * groups).index_add_(0, bag, weights).view(t, groups, 1)
        y = y + (xsum * prepared.zero_term).sum(1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _bench(n: int = 11008, k: int = 4096, group: int = 128, reps: int = 30) -> dict[str, tuple[float, float]]:
    """(median, min) ms of dense F.linear, int8 and int4 (group ``group``) on x bf16 [1, k]; the three
    run interleaved so that load from other jobs hits them alike."""
    torch.manual_seed(0)
    w = torch.randn(n, k).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    p8 = prepare_int8_cpu(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) / 127)
    u4 = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    p4 = prepare_int4_cpu(u4, torch.rand(n, k // group) / 7, None, group)
    runs = {"dense": lambda: F.linear(x, w), "int8": lambda: int8_linear_cpu(x, p8),
            f"int4 g{group}": lambda: int4_linear_cpu(x, p4)}
    times = {name: [] for name in runs}
    for _ in range(3):
        for fn in runs.values():
            fn()
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (sorted(ts)[len(ts) // 2] * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def _bench_prefill(n: int = 5632, k: int = 2048, copies: int = 4, rounds: int = 9) -> None:
    """Print median ms a weight of int8 [n, k] through our GEMV kernel, through the decoded panels
    and the GEMM, and of dense bf16 F.linear, at 8-128 bf16 tokens, rounds interleaved."""
    torch.manual_seed(0)
    ws = [prepare_int8_cpu(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 127)
          for _ in range(copies)]
    dense = [torch.randn(n, k).bfloat16() for _ in range(copies)]
    for m in (8, 16, 32, 64, 128):
        x = torch.randn(m, k).bfloat16()
        ms = cpu_native._median_ms({
            "ours": lambda: [cpu_native.int8_gemv(x.float(), w.codes, w.scale).bfloat16() for w in ws],
            "panels": lambda: [_gemm(x, w) for w in ws],
            "dense": lambda: [F.linear(x, w) for w in dense]}, rounds)
        print(f"{m:4d} tokens " + "  ".join(f"{name} {t / copies:6.2f} ms" for name, t in ms.items()))


def _bench_report() -> None:
    """Print :func:`_bench` on one thread (the command is in the module docstring)."""
    import os

    torch.set_num_threads(1)
    result = _bench()
    print(f"x bf16 [1, 4096] @ W [11008, 4096], {torch.get_num_threads()} thread, "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")
    dense = result["dense"][1]
    for name, (median, best) in result.items():
        print(f"{name:9s} min {best:6.2f} ms  median {median:6.2f} ms  {dense / best:.2f}x dense (mins)")
