"""Compressed 2:4 format: pack / unpack, and converters to torch's CUTLASS layout.

Our layout (one 2:4 linear, weight ``W`` [N, K], K a multiple of 4)::

    values [N, K/2]          the two kept entries of every group of 4 columns, in W's dtype,
                             in ascending column order (group g -> values[:, 2g], values[:, 2g+1])
    meta   [N, ceil(K/8)]    uint8; four 2-bit in-group positions per byte, low bits first:
                             byte j = pos(2j, first) | pos(2j, second) << 2
                                    | pos(2j+1, first) << 4 | pos(2j+1, second) << 6

This is the per-group encoding CUTLASS uses for 16-bit sparse tensor-core operands (two 2-bit
indices, lower index in the low bits) *without* CUTLASS's interleaving of rows and columns, so a
Triton kernel can find the metadata of value ``j`` of row ``n`` by plain arithmetic::

    byte = meta[n, j // 4];  position = (byte >> 2 * (j % 4)) & 3;  column = 4 * (j // 2) + position

When K % 8 == 4 the last byte describes one group only; its high nibble (the pad bits) is zero.

Groups with fewer than two nonzeros still name two positions (the kept "values" are zeros), chosen
exactly as torch's CUTLASS packer does (``sparse_semi_structured_from_dense_cutlass``, whose
choices come from a logic-minimised encoding): an empty group keeps (2, 3); a lone nonzero at
position p keeps (p, 2) when p < 2 and (2, 3) otherwise. Using the same rule makes
:func:`to_cutlass` a pure re-layout that is bitwise equal to torch's packer.

Round trips are exact, bit for bit, with one caveat: a ``-0.0`` in a dropped position comes back as
``+0.0`` (it compares equal; sign of zero is not stored). NaN and inf count as nonzero.

Storage (values + meta) relative to dense: 0.5625 for 16-bit, 0.53125 for fp32, 0.625 for int8.
"""

from __future__ import annotations

import torch

__all__ = ["compressed_bytes", "from_cutlass", "is_24_sparse", "pack_24", "to_cutlass", "unpack_24"]

# Nonzero mask of a group (bit p set <=> column p nonzero) -> kept positions (first, second).
# -1 marks masks with more than two nonzeros (not 2:4).
_FIRST = [-1] * 16
_SECOND = [-1] * 16
for _code in range(16):
    _nz = [p for p in range(4) if _code >> p & 1]
    if len(_nz) == 2:
        _FIRST[_code], _SECOND[_code] = _nz
    elif len(_nz) == 1:
        _p = _nz[0]
        _FIRST[_code], _SECOND[_code] = (_p, 2) if _p < 2 else (2, 3)
    elif len(_nz) == 0:
        _FIRST[_code], _SECOND[_code] = 2, 3
del _code, _nz


def _check_weight(w: torch.Tensor) -> tuple[int, int]:
    if w.dim() != 2:
        raise ValueError(f"2:4 weights must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % 4 != 0:
        raise ValueError(f"2:4 needs the input dimension K to be a multiple of 4, got K={k}")
    return n, k


# Per nonzero-mask code: the metadata nibble (first | second << 2; 0xFF = not 2:4) and the bit set
# of kept positions.
_NIBBLE = [0xFF if _FIRST[c] < 0 else _FIRST[c] | (_SECOND[c] << 2) for c in range(16)]
_KEPT = [0 if _FIRST[c] < 0 else (1 << _FIRST[c]) | (1 << _SECOND[c]) for c in range(16)]


def _group_codes(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, K/4] uint8 nonzero-mask code per group of 4 columns (bit p: column p != 0)."""
    n, k = w.shape
    nz = (w != 0).view(n, k // 4, 4).to(torch.uint8)  # NaN != 0 counts as nonzero; -0.0 as zero
    return nz[..., 0] | (nz[..., 1] << 1) | (nz[..., 2] << 2) | (nz[..., 3] << 3)


def is_24_sparse(w: torch.Tensor) -> bool:
    """True if every group of 4 consecutive columns of ``w`` [N, K] has at most 2 nonzeros."""
    _check_weight(w)
    counts = (w != 0).view(w.shape[0], -1, 4).sum(-1)
    return bool((counts <= 2).all())


def pack_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse weight ``w`` [N, K] -> (values [N, K/2] w.dtype, meta [N, ceil(K/8)] uint8).

    Raises ValueError if ``w`` is not 2-D, K is not a multiple of 4, or some group of four
    columns has more than two nonzeros (the message names the first offending row and columns).
    """
    n, k = _check_weight(w)
    w = w.contiguous()
    codes = _group_codes(w).to(torch.int32)  # (N, G)
    nibble = torch.tensor(_NIBBLE, dtype=torch.uint8, device=w.device)[codes]  # (N, G)
    bad = nibble == 0xFF
    if bool(bad.any()):
        row, grp = (int(v) for v in bad.nonzero()[0])
        count = int((w[row, 4 * grp : 4 * grp + 4] != 0).sum())
        raise ValueError(
            f"weight is not 2:4 sparse: row {row}, columns {4 * grp}..{4 * grp + 3} hold {count} nonzeros "
            f"(at most 2 of every 4 consecutive input columns may be nonzero); "
            f"{int(bad.sum())} of {bad.numel()} groups violate the pattern"
        )
    kept = torch.tensor(_KEPT, dtype=torch.uint8, device=w.device)[codes]  # (N, G) bit set
    shifts = torch.arange(4, dtype=torch.uint8, device=w.device)
    keep = ((kept[..., None] >> shifts) & 1).bool()  # (N, G, 4), exactly two per group
    # masked_select walks row-major: the two kept entries of each group, ascending. Copies bits.
    values = w.view(n, k // 4, 4)[keep].view(n, k // 2)
    return values, _nibbles_to_bytes(nibble)


def _nibbles_to_bytes(nibble: torch.Tensor) -> torch.Tensor:
    """(N, G) uint8 nibbles -> (N, ceil(G/2)) bytes, even group in the low nibble, pad nibble 0."""
    n, g = nibble.shape
    if g % 2:
        nibble = torch.cat([nibble, nibble.new_zeros(n, 1)], dim=1)
    pairs = nibble.view(n, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def _bytes_to_nibbles(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, ceil(G/2)) uint8 -> (N, G) uint8 nibbles (drops the pad nibble)."""
    n = meta.shape[0]
    both = torch.stack([meta & 0xF, meta >> 4], dim=-1).view(n, -1)
    return both[:, :groups]


def _check_packed(values: torch.Tensor, meta: torch.Tensor, k: int | None) -> tuple[int, int]:
    if values.dim() != 2 or meta.dim() != 2:
        raise ValueError(
            f"values and meta must be 2-D, got {tuple(values.shape)} and {tuple(meta.shape)}"
        )
    n, half = values.shape
    if k is None:
        k = 2 * half
    if k % 4 != 0 or 2 * half != k:
        raise ValueError(f"values [N, K/2] = {tuple(values.shape)} does not fit K={k} (K must be a multiple of 4)")
    if meta.dtype != torch.uint8:
        raise ValueError(f"meta must be uint8, got {meta.dtype}")
    if tuple(meta.shape) != (n, (k + 7) // 8):
        raise ValueError(f"meta must be [N, ceil(K/8)] = {(n, (k + 7) // 8)}, got {tuple(meta.shape)}")
    return n, k


def unpack_24(values: torch.Tensor, meta: torch.Tensor, K: int | None = None) -> torch.Tensor:
    """Decompress (values [N, K/2], meta [N, ceil(K/8)]) -> dense [N, K] in values.dtype.

    ``K`` defaults to ``2 * values.shape[1]``. Raises ValueError on inconsistent shapes, on
    metadata whose two positions in a group are not strictly ascending, or on nonzero pad bits.
    """
    n, k = _check_packed(values, meta, K)
    g = k // 4
    if g % 2 and n and bool((meta[:, -1] >> 4).any()):
        raise ValueError("meta pad bits (high nibble of the last byte, K % 8 == 4) must be zero")
    nibble = _bytes_to_nibbles(meta, g).to(torch.int64)
    p0, p1 = nibble & 3, nibble >> 2
    if bool((p0 >= p1).any()):
        raise ValueError("corrupt 2:4 metadata: the two positions of a group must be strictly ascending")
    dense = torch.zeros(n, g, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, torch.stack([p0, p1], dim=-1), values.reshape(n, g, 2))
    return dense.view(n, k)


def compressed_bytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Bytes of (values, meta) for an [n, k] weight of ``dtype``."""
    return n * (k // 2) * dtype.itemsize + n * ((k + 7) // 8)


# ---------------------------------------------------------------------------------------------
# CUTLASS layout (torch.sparse.SparseSemiStructuredTensorCUTLASS)
#
# torch's packer builds, per row, the same 4-bit-per-group codes we use, packed little-endian into
# int16 (16-bit dtypes: 4 groups = 16 columns per element) or int32 (int8: 8 groups = 32 columns).
# It then permutes the elements of that [N, C] metadata matrix to CUTLASS's
# ColumnMajorInterleaved<2> layout expected by the sparse tensor-core GEMM:
#   1. within every block of R rows (R = 32 for int16, 16 for int32), row 8a + b moves to
#      row (R/8) b + a  (a transpose of the [R/8, 8] row grid);
#   2. each 2x2 block of (row, column) is transposed;
#   3. storage is column-pair major: element (row, col) lands at flat offset
#      (col // 2) * 2N + 2 row + col % 2, and the flat buffer is viewed as [N, C].
# The values need no permutation: they are our `values` as is.
# ---------------------------------------------------------------------------------------------

_CUTLASS_META_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.int8: torch.int32}
# torch.sparse.to_sparse_semi_structured shape rules (dense rows, dense cols multiples of).
_CUTLASS_SHAPE = {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (32, 128)}


def _cutlass_params(dtype: torch.dtype, n: int, k: int) -> tuple[torch.dtype, int]:
    if dtype not in _CUTLASS_META_DTYPE:
        raise ValueError(
            f"CUTLASS 2:4 conversion supports float16, bfloat16 and int8 values, got {dtype} "
            "(CUTLASS stores float32 as 1:2 pairs, a different pattern)"
        )
    rows, cols = _CUTLASS_SHAPE[dtype]
    if n % rows or k % cols:
        raise ValueError(
            f"CUTLASS 2:4 layout needs N a multiple of {rows} and K a multiple of {cols} for {dtype}, "
            f"got N={n}, K={k}"
        )
    meta_dtype = _CUTLASS_META_DTYPE[dtype]
    return meta_dtype, 32 if meta_dtype == torch.int16 else 16


def _bytes_to_words(meta: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """(N, B) uint8 -> (N, B / itemsize) little-endian words of dtype ``word`` (bit pattern kept)."""
    n, b = meta.shape
    per = word.itemsize
    parts = meta.view(n, b // per, per).to(torch.int64)
    acc = torch.zeros(n, b // per, dtype=torch.int64, device=meta.device)
    for i in range(per):
        acc |= parts[..., i] << (8 * i)
    bits = 8 * per
    acc = torch.where(acc >= (1 << (bits - 1)), acc - (1 << bits), acc)  # two's complement
    return acc.to(word)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    n, c = words.shape
    per = words.dtype.itemsize
    w = words.to(torch.int64) & ((1 << (8 * per)) - 1)
    parts = [((w >> (8 * i)) & 0xFF) for i in range(per)]
    return torch.stack(parts, dim=-1).view(n, c * per).to(torch.uint8)


def _interleave_meta(words: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    """Our row-major word matrix [N, C] -> CUTLASS-reordered [N, C] (steps 1-3 above)."""
    n, c = words.shape
    a = rows_per_block // 8
    # 1. row 8a+b -> a + (R/8) b inside each block of R rows
    m1 = words.view(n // rows_per_block, a, 8, c).transpose(1, 2).reshape(n, c)
    # 2. + 3. transpose 2x2 blocks, then store column-pair major:
    #    m1[2i + ri, 2j + ci] lands at flat (j, i, ci, ri)
    out = m1.view(n // 2, 2, c // 2, 2).permute(2, 0, 3, 1)
    return out.contiguous().view(n, c)


def _deinterleave_meta(reordered: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    n, c = reordered.shape
    a = rows_per_block // 8
    m1 = reordered.reshape(c // 2, n // 2, 2, 2).permute(1, 3, 0, 2).reshape(n, c)
    return m1.view(n // rows_per_block, 8, a, c).transpose(1, 2).reshape(n, c)


def to_cutlass(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (values, meta) -> (values, meta_reordered) in the layout of torch's CUTLASS 2:4 tensors.

    The result equals ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``
    on the dense weight, bit for bit (and can build a ``SparseSemiStructuredTensorCUTLASS`` on CUDA).
    Needs float16/bfloat16 (N % 32 == 0, K % 64 == 0) or int8 (N % 32 == 0, K % 128 == 0).
    """
    n, k = _check_packed(values, meta, None)
    meta_dtype, rows = _cutlass_params(values.dtype, n, k)
    words = _bytes_to_words(meta, meta_dtype)  # (N, K / (4 * nibbles per word))
    return values.contiguous(), _interleave_meta(words, rows)


def from_cutlass(values: torch.Tensor, meta_reordered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_cutlass`: CUTLASS (values, meta_reordered) -> our (values, meta uint8)."""
    if values.dim() != 2 or meta_reordered.dim() != 2:
        raise ValueError("values and meta must be 2-D")
    n, half = values.shape
    k = 2 * half
    meta_dtype, rows = _cutlass_params(values.dtype, n, k)
    if meta_reordered.dtype != meta_dtype:
        raise ValueError(f"CUTLASS metadata for {values.dtype} must be {meta_dtype}, got {meta_reordered.dtype}")
    expect = (n, k // (4 * 2 * meta_dtype.itemsize))
    if tuple(meta_reordered.shape) != expect:
        raise ValueError(f"CUTLASS metadata must be {expect}, got {tuple(meta_reordered.shape)}")
    words = _deinterleave_meta(meta_reordered, rows)
    return values.contiguous(), _words_to_bytes(words)
