"""Read a Hugging Face checkpoint directory lazily and safely.

Only safetensors are read (never pickle). Shards are validated up front (header parses, data
fits the file) so a truncated or corrupted file is a clear error before any work starts, and
tensors are then read one at a time, so a model larger than RAM can be streamed block by block.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch

from squeeze.errors import SqueezeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` as the hub spells repository ids (no drive, no ./, ~ or leading slash): what a
    user who is used to ``from_pretrained("meta-llama/Llama-3.2-1B")`` gives in place of a folder."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", name) is not None and ".." not in name


def _read_header(path: Path) -> dict:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SqueezeError(f"{path}: not a safetensors file (too short); re-download or re-export it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise SqueezeError(f"{path}: corrupted safetensors header (length {n}); re-download it")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SqueezeError(f"{path}: corrupted or unreadable safetensors file ({e.__class__.__name__}); re-download it") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise SqueezeError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end}); re-download it"
        )
    return header


class Checkpoint:
    """A checkpoint directory: config.json, safetensors shards, and optional tokenizer files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            if looks_like_hub_id(str(path)):
                raise SqueezeError(
                    f"model path {path} does not exist; if it is a Hugging Face hub id, download it first "
                    f"(`huggingface-cli download {path} --local-dir DIR`) and pass DIR: squeeze reads local "
                    "folders only"
                )
            raise SqueezeError(f"model path {self.path} does not exist")
        if not self.path.is_dir():
            raise SqueezeError(f"model path {self.path} is not a directory (give the checkpoint folder)")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise SqueezeError(f"{self.path} has no config.json: not a Hugging Face checkpoint folder")
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SqueezeError(f"{cfg_path}: unreadable config.json ({e})") from None
        from squeeze.autoload import unmark

        self.config_dict = unmark(raw)  # the model's own config, also for exports marked for squeeze
        self.marked = self.config_dict is not raw
        self.shards, self.key_to_shard, self.index_file = self._find_shards()
        self.headers = {s: _read_header(self.path / s) for s in self.shards}
        for key, shard in self.key_to_shard.items():
            if key not in self.headers[shard]:
                raise SqueezeError(f"{self.path}: index says {key} is in {shard} but it is not; re-download it")
        self._open: dict[str, object] = {}

    def _find_shards(self):
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise SqueezeError(f"{index}: unreadable shard index ({e})") from None
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if not (self.path / s).is_file():
                    raise SqueezeError(f"{self.path}: shard {s} named in {INDEX_NAME} is missing; re-download it "
                                      "(an incomplete download leaves shards out)")
            return shards, dict(weight_map), INDEX_NAME
        single = self.path / SINGLE_NAME
        if single.is_file():
            header = _read_header(single)
            return [SINGLE_NAME], {k: SINGLE_NAME for k in header}, None
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")) or any(self.path.glob("*.pth")):
            raise SqueezeError(
                f"{self.path} holds only pickle weights (.bin/.pt); squeeze reads safetensors only "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment)"
            )
        raise SqueezeError(f"{self.path} has no model.safetensors or {INDEX_NAME}")

    # -- tensors ---------------------------------------------------------------------------
    def keys(self):
        return self.key_to_shard.keys()

    def dtype_of(self, key: str) -> str:
        return self.headers[self.key_to_shard[key]][key]["dtype"]

    def shape_of(self, key: str) -> list[int]:
        return self.headers[self.key_to_shard[key]][key]["shape"]

    def nbytes(self, key: str) -> int:
        start, end = self.headers[self.key_to_shard[key]][key]["data_offsets"]
        return end - start

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.key_to_shard[key]
        handle = self._open.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise SqueezeError(f"{self.path / shard}: cannot open safetensors ({e})") from None
            self._open[shard] = handle
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise SqueezeError(f"{self.path / shard}: cannot read tensor {key} ({e}); re-download it") from None

    def close(self):
        self._open.clear()

    # -- metadata --------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in self.shards)

    def source_dtype(self) -> torch.dtype:
        """The dtype most weight bytes are stored in."""
        counts: dict[str, int] = {}
        for header in self.headers.values():
            for v in header.values():
                counts[v["dtype"]] = counts.get(v["dtype"], 0) + v["data_offsets"][1] - v["data_offsets"][0]
        name = max(counts, key=counts.get) if counts else "F32"
        return SAFETENSORS_DTYPES.get(name, torch.float32)

    def extra_files(self) -> list[Path]:
        """Files to carry over to an export: tokenizer, generation config, sentence-transformers
        metadata... everything except weights, the index and our own sidecar."""
        skip = set(self.shards) | {INDEX_NAME, "squeeze.json", "squeeze.safetensors", "config.json"}
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if p.is_file() and str(rel) not in skip and not rel.parts[0].startswith(".") \
                    and p.suffix not in (".bin", ".pt", ".pth", ".safetensors", ".onnx", ".h5", ".msgpack"):
                out.append(p)
        return out

    def has_tokenizer(self) -> bool:
        return any((self.path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.txt",
                                                         "vocab.json", "tokenizer_config.json"))


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def digest_of(obj) -> str:
    """A short stable digest of JSON-able data (for recording calibration sources)."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return h[:16]
