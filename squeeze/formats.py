"""Storage formats for exports.

``dense`` (default): zeros baked into ordinary safetensors; plain ``from_pretrained`` loads it.

``compressed`` (2:4): every linear whose weight satisfies 2:4 along its input dimension is stored
as ``<linear>.values`` [N, K/2] in the weight's dtype and ``<linear>.meta`` [N, ceil(K/8)] uint8
(four 2-bit in-group positions per byte, low bits first; see ``squeeze.kernels.pack_24``) instead
of ``<linear>.weight``: 0.5625x the bytes of a 16-bit weight. Only ``squeeze.load`` reads it; on
CPU it decompresses on load (exactly the dense model), on CUDA it swaps in
:class:`squeeze.runtime.sparse24.Sparse24Linear` modules running the Triton kernels.
"""

from __future__ import annotations

import torch

from squeeze.errors import SqueezeError

FORMATS = ("dense", "compressed")
COMPRESSED_KIND = "compressed-2:4"
LAYOUT = ("values [N, K/2] in the weight's dtype (kept entries in column order); meta [N, ceil(K/8)] uint8: "
          "for input-column group g (4 columns), the two kept in-group positions (ascending) occupy 2 bits "
          "each, group 2j in bits 0-3 and group 2j+1 in bits 4-7 of byte j, low bits first; weights of "
          "GPT-2 Conv1D layers are packed in [out, in] orientation (transposed: true)")


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise SqueezeError(f"unknown --format {name!r}: use {' or '.join(FORMATS)}")
    return name


def pack_block(block, weights, tensors: dict, cast) -> dict:
    """Replace the weights of the block's 2:4 linears in ``tensors`` (checkpoint key -> tensor)
    by values/meta. Returns {weight key: {"values": key, "meta": key, "transposed": bool}}."""
    from squeeze.kernels import is_24_sparse, pack_24

    done = {}
    for lin in block.linears.values():
        key = weights.to_ckpt.get(f"{lin.name}.weight")
        if key is None or key not in tensors or lin.in_features % 4:
            continue
        w = cast(key, lin.weight.detach())
        if not is_24_sparse(w):
            continue
        values, meta = pack_24(w.contiguous())
        stem = key.removesuffix(".weight")
        tensors.pop(key)
        tensors[f"{stem}.values"], tensors[f"{stem}.meta"] = values.contiguous(), meta.contiguous()
        done[key] = {"values": f"{stem}.values", "meta": f"{stem}.meta", "transposed": lin.transposed,
                     "shape": list(w.shape)}
    return done


class DecompressedView:
    """A read-only view of a compressed checkpoint that looks like the dense one: ``get`` of a
    packed weight key unpacks it. Lets the ordinary loading path rebuild the exact dense model."""

    def __init__(self, ckpt, packed: dict):
        self.ckpt, self.packed, self.path = ckpt, packed, ckpt.path
        hidden = {v for p in packed.values() for v in (p["values"], p["meta"])}
        self._keys = [k for k in ckpt.keys() if k not in hidden] + list(packed)

    def keys(self):
        return self._keys

    def get(self, key: str) -> torch.Tensor:
        p = self.packed.get(key)
        if p is None:
            return self.ckpt.get(key)
        from squeeze.kernels import unpack_24

        w = unpack_24(self.ckpt.get(p["values"]), self.ckpt.get(p["meta"]), p["shape"][1])
        return w.t().contiguous() if p["transposed"] else w
