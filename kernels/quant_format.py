"""Weight-only quantized linear format: int8 / int4 codes with per-group scales (and zero points).

A linear weight ``W [N, K]`` (out, in) is split along K into ``G = ceil(K / g)`` groups of ``g``
columns (``g = group_size``; ``g >= K`` is per-channel; the last group may be partial). Every
(row, group) has an fp32 scale, and for asymmetric formats a uint8 zero point. Dequantization is
done in fp32:

==========================  =====================================  ==============================
format                      codes                                  w
==========================  =====================================  ==============================
int8 symmetric              ``int8 [N, K]`` in [-128, 127]         ``q * s``
int8 asymmetric             ``uint8 [N, K]``, zero ``uint8 [N, G]``  ``(u - z) * s``
int4 symmetric              packed ``uint8 [N, ceil(K/2)]``, u in [0, 15]   ``(u - 8) * s``
int4 asymmetric             packed, u in [0, 15], zero in [0, 15]  ``(u - z) * s``
fp8 e4m3 (symmetric)        ``float8_e4m3fn [N, K]``               ``q.float() * s``
==========================  =====================================  ==============================

``scale`` is ``fp32 [N, G]``; ``zero`` is ``uint8 [N, G]`` for the asymmetric formats and None
otherwise. **int4 packing**: byte ``j`` of a row is ``u[2j] | u[2j+1] << 4`` (low nibble = even
column); for odd K the last high nibble is 0 and is not part of W.

The format is (bits, symmetric, codes dtype): fp8 is ``bits=8, symmetric=True`` with
``float8_e4m3fn`` codes. Everything here is plain torch (the references the kernels are tested
against); :func:`check_quant_args` is the one place that validates shapes and dtypes.

**2:4 + int8** (symmetric): a 2:4-sparse int8 code matrix stored as :func:`pack_24` makes it,
``values int8 [N, K/2]`` + ``meta uint8 [N, ceil(K/8)]``, with fp32 scales ``[N, G]`` over the
original K columns, ``w = unpack_24(values, meta) * s``. ``group_size % 4 == 0`` (or per-channel),
so the two kept values of a group of 4 columns share a scale: value column ``j'`` is in group
``j' // (group_size // 2)``. Checked by :func:`check_quant24_args`.
"""

from __future__ import annotations

import torch

from .sparse24_format import unpack_24

__all__ = [
    "check_quant24_args",
    "check_quant_args",
    "dequantize_24_reference",
    "dequantize_reference",
    "pack_int4",
    "quant_bytes",
    "quant_linear_reference",
    "unpack_int4",
]


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """u [N, K] integers in [0, 15] (any integer dtype) -> uint8 [N, ceil(K/2)], low nibble = even column."""
    if u.dim() != 2 or u.dtype.is_floating_point or u.dtype == torch.bool:
        raise ValueError(f"pack_int4 needs a 2-D integer tensor, got {u.dtype} {tuple(u.shape)}")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError(f"int4 codes must lie in [0, 15], got [{int(u.min())}, {int(u.max())}]")
    n, k = u.shape
    u8 = u.to(torch.uint8)
    if k % 2:
        u8 = torch.cat([u8, u8.new_zeros(n, 1)], dim=1)  # the pad high nibble is 0
    return u8[:, 0::2] | (u8[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 [N, K] nibbles (the pad nibble of an odd K is dropped)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed int4 codes must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (K + 1) // 2:
        raise ValueError(
            f"packed int4 codes for K={K} need ceil(K/2)={(K + 1) // 2} columns, got {packed.shape[1]}"
        )
    n = packed.shape[0]
    u = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(n, -1)  # (N, 2 * ceil(K/2))
    return u[:, :K]


def _format(codes: torch.Tensor, bits: int, symmetric: bool) -> str:
    if bits == 8 and codes.dtype == torch.float8_e4m3fn:
        if not symmetric:
            raise ValueError("fp8 e4m3 codes are symmetric (no zero point)")
        return "fp8"
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    want = torch.int8 if (bits == 8 and symmetric) else torch.uint8
    if codes.dtype != want:
        kind = f"int{bits} {'symmetric' if symmetric else 'asymmetric'}"
        raise ValueError(f"{kind} codes must be {want} (fp8: float8_e4m3fn), got {codes.dtype}")
    return f"int{bits}"


def check_quant_args(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    symmetric: bool,
    group_size: int,
    K: int | None = None,
) -> tuple[str, int, int, int]:
    """Validate a quantized weight; returns (format, N, K, G) with format in int8 / int4 / fp8.

    K may be omitted for 8-bit codes (it is their width); packed int4 needs it (odd K).
    """
    fmt = _format(codes, bits, symmetric)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K] (int4: [N, ceil(K/2)]), got {tuple(codes.shape)}")
    n = codes.shape[0]
    if K is None:
        if fmt == "int4":
            raise ValueError("K is needed for packed int4 codes (ceil(K/2) columns do not tell odd K)")
        K = codes.shape[1]
    want_cols = (K + 1) // 2 if fmt == "int4" else K
    if codes.shape[1] != want_cols:
        raise ValueError(f"{fmt} codes for K={K} need {want_cols} columns, got {codes.shape[1]}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (use K for per-channel), got {group_size!r}")
    g = -(-K // group_size) if K else 0
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n, g):
        raise ValueError(f"scale must be float32 [N, G] = {(n, g)} (group_size {group_size}), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if symmetric:
        if zero is not None:
            raise ValueError("symmetric formats take no zero point (zero=None)")
    elif zero is None or zero.dtype != torch.uint8 or tuple(zero.shape) != (n, g):
        got = None if zero is None else f"{zero.dtype} {tuple(zero.shape)}"
        raise ValueError(f"asymmetric formats need zero uint8 [N, G] = {(n, g)}, got {got}")
    devices = {t.device for t in (codes, scale, zero) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"codes, scale and zero must share a device, got {sorted(map(str, devices))}")
    return fmt, n, K, g


def dequantize_reference(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    bits: int,
    symmetric: bool,
    group_size: int,
    K: int | None = None,
) -> torch.Tensor:
    """The quantized weight as fp32 [N, K] (the table in the module docstring)."""
    fmt, n, K, g = check_quant_args(
        codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size, K=K
    )
    if fmt == "int4":
        q = unpack_int4(codes, K).float()
        if symmetric:
            q = q - 8.0
    else:
        q = codes.float()
    cols = torch.arange(K, device=codes.device) // group_size  # group of every column
    if zero is not None:
        q = q - zero.float()[:, cols]
    return q * scale[:, cols]


def quant_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    bits: int,
    symmetric: bool,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``x @ W.T (+ bias)`` with W dequantized in fp32. x [..., K] -> fp32 [..., N]."""
    w = dequantize_reference(
        codes, scale, zero, bits=bits, symmetric=symmetric, group_size=group_size, K=x.shape[-1]
    )
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())


def check_quant24_args(
    values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, *, group_size: int, K: int | None = None
) -> tuple[int, int, int]:
    """Validate a 2:4 + int8 weight; returns (N, K, G). K defaults to 2 * values' width."""
    if values.dim() != 2 or values.dtype != torch.int8:
        raise ValueError(f"2:4 values must be int8 [N, K/2], got {values.dtype} {tuple(values.shape)}")
    n = values.shape[0]
    if K is None:
        K = 2 * values.shape[1]
    if K % 4 or values.shape[1] * 2 != K:
        raise ValueError(f"2:4 values for K={K} need K % 4 == 0 and K/2 columns, got "
                         f"{tuple(values.shape)}")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, (K + 7) // 8):
        raise ValueError(f"2:4 meta must be uint8 [N, ceil(K/8)] = {(n, (K + 7) // 8)}, got "
                         f"{meta.dtype} {tuple(meta.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or (group_size < K and group_size % 4):
        raise ValueError(f"2:4 + int8 needs group_size a multiple of 4 (or >= K), got {group_size!r}")
    g = -(-K // group_size) if K else 0
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n, g):
        raise ValueError(f"scale must be float32 [N, G] = {(n, g)} (group_size {group_size}), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if len({values.device, meta.device, scale.device}) > 1:
        raise ValueError("values, meta and scale must share a device")
    return n, K, g


def dequantize_24_reference(
    values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, *, group_size: int, K: int | None = None
) -> torch.Tensor:
    """The 2:4 + int8 weight as fp32 [N, K]: ``unpack_24(values, meta).float() * s`` per group."""
    n, K, g = check_quant24_args(values, meta, scale, group_size=group_size, K=K)
    cols = torch.arange(K, device=values.device) // group_size
    return unpack_24(values, meta, K).float() * scale[:, cols]


def quant_bytes(
    n: int,
    k: int,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    sparse24: bool = False,
) -> int:
    """Bytes of a quantized [n, k] weight: codes + fp32 scales (+ uint8 zeros). group_size None = per-channel.

    ``bits=16`` gives the dense bf16/fp16 weight (no scales), for comparisons. ``sparse24=True``
    (int8 only): 2:4 values [n, k/2] + meta [n, ceil(k/8)] + scales.
    """
    if bits == 16:
        return 2 * n * k
    if sparse24:
        if bits != 8 or not symmetric:
            raise ValueError("2:4 quantized weights are int8 symmetric")
        return n * (k // 2) + n * ((k + 7) // 8) + 4 * n * -(-k // (group_size or k))
    g = -(-k // (group_size or k))
    codes = n * ((k + 1) // 2 if bits == 4 else k)
    return codes + 4 * n * g + (0 if symmetric else n * g)
