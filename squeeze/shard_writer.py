"""Write a safetensors file one tensor at a time, holding only the tensor being written.

safetensors' own ``save_file`` takes every tensor of the file at once and serializes the whole
file in memory: for an export shard of a few GB that is the shard twice over, the largest
allocation of a compress run. The format puts a JSON header (names, dtypes, shapes, byte offsets)
before the data, and the header may be padded with spaces, so a writer that knows the tensor
*names* in advance reserves room for the header, streams each tensor's bytes after it as they
arrive, and writes the real header, padded to the reserved length, at the end (or, when it does
not fit, writes it first into a new file and copies the data after it, in chunks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from squeeze.checkpoint import SAFETENSORS_DTYPES

# the names checkpoint.py reads, and the fp8 ones (stored by quantized exports, never read as floats)
ST_DTYPES = {**{dtype: name for name, dtype in SAFETENSORS_DTYPES.items()},
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}

# room reserved per header entry besides its name: the keys, the longest dtype name, 4 dims of up
# to 10 digits and 2 offsets of up to 15; a header that outgrows it is moved (__exit__)
_ENTRY_BOUND = 48 + 4 * 11 + 2 * 16
_COPY_CHUNK = 64 << 20


class ShardWriter:
    """``with ShardWriter(path, names, metadata) as w: w.add(name, tensor)`` for every name, in
    any order, each once. The file is complete when the block exits without an error."""

    def __init__(self, path: str | Path, names: list[str], metadata: dict[str, str] | None = None):
        self.path, self.names, self.metadata = Path(path), set(names), metadata
        if len(self.names) != len(names):
            raise ValueError(f"{self.path}: a tensor name is given twice")
        meta = len(json.dumps({"__metadata__": metadata})) if metadata else 0
        bound = 2 + meta + sum(len(json.dumps(n)) + _ENTRY_BOUND for n in names)
        self.reserve = bound + (-bound % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.header: dict[str, dict] = {}
        self.offset = 0
        self.file = None

    def __enter__(self) -> "ShardWriter":
        self.file = open(self.path, "wb")
        self.file.seek(8 + self.reserve)
        return self

    def add(self, name: str, t: torch.Tensor) -> None:
        if name not in self.names or name in self.header:
            raise ValueError(f"{self.path}: tensor {name!r} was not announced, or is written twice")
        t = t.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        self.header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + size]}
        if size:
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.offset += size

    def __exit__(self, kind, error, tb) -> None:
        try:
            if kind is None:
                missing = self.names - set(self.header)
                if missing:
                    raise ValueError(f"{self.path}: {len(missing)} announced tensors not written "
                                     f"(e.g. {sorted(missing)[0]!r})")
                header = dict(self.header)
                if self.metadata:
                    header["__metadata__"] = self.metadata
                raw = json.dumps(header, separators=(",", ":")).encode()
                if len(raw) <= self.reserve:
                    self.file.seek(0)
                    self.file.write(self.reserve.to_bytes(8, "little") + raw + b" " * (self.reserve - len(raw)))
                else:  # more dims or digits than reserved for (rare): the header first, the data after it
                    self._move_data(raw)
        finally:
            self.file.close()

    def _move_data(self, raw: bytes) -> None:
        raw += b" " * (-len(raw) % 8)
        moved = self.path.with_name(self.path.name + ".moving")
        self.file.flush()
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(len(raw).to_bytes(8, "little") + raw)
            src.seek(8 + self.reserve)
            while chunk := src.read(_COPY_CHUNK):  # in chunks: never the whole data in memory
                dst.write(chunk)
        os.replace(moved, self.path)

