"""2:4 compressed format: bitwise round trips, metadata layout, CUTLASS conversion vs torch's packer."""

import pytest
import torch
from squeeze.kernels import compressed_bytes, from_cutlass, is_24_sparse, pack_24, to_cutlass, unpack_24
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from tests.kernels.helpers import rand_24


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", [(8, 16), (5, 12), (3, 4), (32, 64), (7, 36)])
def test_pack_unpack_roundtrip_bitwise(dtype, shape):
    n, k = shape
    w = rand_24(n, k, dtype, seed=n * k)
    values, meta = pack_24(w)
    assert values.shape == (n, k // 2) and values.dtype == dtype
    assert meta.shape == (n, (k + 7) // 8) and meta.dtype == torch.uint8
    back = unpack_24(values, meta, k)
    assert back.dtype == dtype
    assert torch.equal(_bits(back), _bits(w))


def test_special_values_roundtrip():
    w = torch.tensor([[float("nan"), 0.0, float("inf"), 0.0, 0.0, -float("inf"), 0.0, 1e-40]])
    values, meta = pack_24(w)
    assert torch.equal(_bits(unpack_24(values, meta)), _bits(w))


def test_meta_layout_by_hand():
    # group 0 keeps columns 1 and 3; group 1 keeps 0 and 2; group 2 (K % 8 == 4) keeps 2 and 3.
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0, 6.0]])
    values, meta = pack_24(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    byte0 = 1 | (3 << 2) | (0 << 4) | (2 << 6)
    byte1 = 2 | (3 << 2)  # pad nibble (high) is zero
    assert meta.tolist() == [[byte0, byte1]]


def test_degenerate_groups_follow_cutlass_choice():
    # empty -> (2, 3); lone nonzero at 0 -> (0, 2); at 1 -> (1, 2); at 2 or 3 -> (2, 3)
    w = torch.tensor([[0, 0, 0, 0, 7, 0, 0, 0, 0, 7, 0, 0, 0, 0, 7, 0, 0, 0, 0, 7]], dtype=torch.float16)
    w = torch.cat([w, torch.zeros(1, 4, dtype=torch.float16)], dim=1)  # K = 24
    _, meta = pack_24(w)
    nibbles = [(b >> s) & 0xF for b in meta[0].tolist() for s in (0, 4)]
    pairs = [(v & 3, v >> 2) for v in nibbles]
    assert pairs == [(2, 3), (0, 2), (1, 2), (2, 3), (2, 3), (2, 3)]


def test_minus_zero_in_dropped_position_comes_back_plus_zero():
    w = torch.tensor([[1.0, 2.0, -0.0, 0.0]])
    values, meta = pack_24(w)
    back = unpack_24(values, meta)
    assert torch.equal(back, w)  # equal as numbers
    assert not torch.signbit(back[0, 2])  # sign of a dropped zero is not stored (documented)


def test_not_24_raises_with_location():
    w = torch.zeros(4, 16)
    w[2, 8:11] = 1.0  # three nonzeros in row 2, columns 8..11
    assert not is_24_sparse(w)
    with pytest.raises(ValueError, match=r"row 2, columns 8\.\.11 hold 3 nonzeros"):
        pack_24(w)


@pytest.mark.parametrize("bad", [torch.zeros(4, 10), torch.zeros(8), torch.zeros(2, 2, 8)])
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError):
        pack_24(bad)


def test_unpack_rejects_inconsistent_metadata():
    w = rand_24(4, 16, torch.float32, fill="two")
    values, meta = pack_24(w)
    with pytest.raises(ValueError, match="ascending"):
        unpack_24(values, torch.zeros_like(meta))  # positions (0, 0)
    with pytest.raises(ValueError, match="K"):
        unpack_24(values, meta, 12)
    with pytest.raises(ValueError, match="uint8"):
        unpack_24(values, meta.to(torch.int16))
    v12, m12 = pack_24(rand_24(2, 12, torch.float32))
    m12[:, -1] |= 0x40
    with pytest.raises(ValueError, match="pad bits"):
        unpack_24(v12, m12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (96, 256)])
@pytest.mark.parametrize("fill", ["two", "mixed"])
def test_to_cutlass_matches_torch_packer(dtype, shape, fill):
    w = rand_24(*shape, dtype, seed=shape[0] + shape[1], fill=fill)
    values, meta = pack_24(w)
    c_values, c_meta = to_cutlass(values, meta)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert c_meta.dtype == ref_meta.dtype == torch.int16
    assert torch.equal(_bits(c_values), _bits(ref_values))
    assert torch.equal(c_meta, ref_meta)
    # and back: ours from torch's, and torch's decoder on ours
    b_values, b_meta = from_cutlass(ref_values, ref_meta)
    assert torch.equal(b_meta, meta) and torch.equal(_bits(b_values), _bits(values))
    assert torch.equal(_bits(sparse_semi_structured_to_dense_cutlass(c_values, c_meta)), _bits(w))


def test_to_cutlass_int8_matches_torch_packer():
    w = rand_24(32, 128, torch.int8, seed=3)
    c_values, c_meta = to_cutlass(*pack_24(w))
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert c_meta.dtype == torch.int32
    assert torch.equal(c_values, ref_values) and torch.equal(c_meta, ref_meta)
    assert torch.equal(from_cutlass(ref_values, ref_meta)[1], pack_24(w)[1])


def test_cutlass_rejects_unsupported():
    with pytest.raises(ValueError, match="multiple of 32"):
        to_cutlass(*pack_24(rand_24(16, 64, torch.float16)))
    with pytest.raises(ValueError, match="float32"):
        to_cutlass(*pack_24(rand_24(32, 64, torch.float32)))


@pytest.mark.parametrize("dtype,ratio", [(torch.float16, 0.5625), (torch.bfloat16, 0.5625),
                                         (torch.float32, 0.53125), (torch.int8, 0.625)])
def test_compressed_size(dtype, ratio):
    n, k = 64, 256
    values, meta = pack_24(rand_24(n, k, dtype))
    nbytes = values.numel() * values.element_size() + meta.numel()
    assert nbytes == compressed_bytes(n, k, dtype)
    assert nbytes / (n * k * dtype.itemsize) == pytest.approx(ratio)
