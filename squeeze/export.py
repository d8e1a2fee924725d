"""Atomic export: a checkpoint folder that plain ``from_pretrained`` loads, plus ``squeeze.json``.

Everything is written into a temporary sibling folder and renamed into place at the end, so a
failed run leaves nothing behind and an existing output is only replaced when asked. The input
checkpoint is only ever read. Tensors are written shard by shard, mirroring the source's
sharding; compressed blocks come from a spill written during the sweep, everything else is
copied from the source, so at most one shard is in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from squeeze.checkpoint import INDEX_NAME, Checkpoint
from squeeze.errors import SqueezeError
from squeeze.report import write_json
from squeeze.versions import versions

SIDECAR = "squeeze.safetensors"
RECORD = "squeeze.json"


def check_output_dir(out: Path, source: Path, overwrite: bool) -> None:
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or source in out.parents or out in source.parents:
        raise SqueezeError(f"output {out} overlaps the input checkpoint {source}; choose another --out")
    if out.exists() and not overwrite:
        raise SqueezeError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise SqueezeError(f"output {out} exists and is not a directory")
    if not out.parent.exists():
        raise SqueezeError(f"output's parent folder {out.parent} does not exist")


@contextlib.contextmanager
def staging_dir(out: Path):
    """A temp folder next to ``out``; removed on failure, renamed to ``out`` by :func:`commit`."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-squeeze-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, out: Path) -> None:
    out = Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-squeeze-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Spill:
    """Per-block tensors written during the sweep (checkpoint keys, export dtype), read back
    lazily when the shards are assembled. Tensors of the block that the checkpoint does not know
    (run-time buffers such as thresholds) go to the sidecar."""

    def __init__(self, folder: Path, weights, export_dtype: torch.dtype | None, fmt: str = "dense"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weights, self.export_dtype, self.format = weights, export_dtype, fmt
        self.where: dict[str, Path] = {}
        self.sidecar: dict[str, torch.Tensor] = {}
        self.packed: dict[str, dict] = {}  # weight key -> its values/meta keys (compressed format)

    def cast(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        if self.export_dtype is not None:
            return t.to(self.export_dtype)
        from squeeze.checkpoint import SAFETENSORS_DTYPES

        return t.to(SAFETENSORS_DTYPES.get(self.weights.ckpt.dtype_of(key), t.dtype))

    def __call__(self, block) -> None:
        tensors = {}
        for name, t in block.module.state_dict().items():
            full = f"{block.name}.{name}"
            key = self.weights.to_ckpt.get(full)
            if key is None:
                if full not in self.weights.tied:
                    self.sidecar[full] = t.detach().clone().contiguous()
                continue
            tensors[key] = self.cast(key, t.detach()).contiguous()
        if self.format != "dense":
            from squeeze.formats import pack_block

            self.packed.update(pack_block(block, self.weights, tensors))
        path = self.folder / f"block{block.index:05d}.safetensors"
        save_file(tensors, str(path))
        for k in tensors:
            self.where[k] = path

    def get(self, key: str) -> torch.Tensor | None:
        path = self.where.get(key)
        if path is None:
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


def write_checkpoint(ckpt: Checkpoint, dest: Path, spill: Spill | None, config_updates: dict, record: dict,
                     sidecar: dict | None = None, keys: dict[str, str | None] | None = None) -> dict:
    """Assemble the export inside ``dest`` (the staging folder). Returns {file: bytes}.

    ``keys`` renames source tensors (source key -> new key) or leaves them out (-> ``None``); keys
    it does not name keep their name. Each tensor stays in the shard it came from."""
    keys = keys or {}
    sizes = {}
    total = 0
    weight_map = {}
    for shard in ckpt.shards:
        tensors = {}
        for k in [k for k, s in ckpt.key_to_shard.items() if s == shard]:
            new = keys.get(k, k)
            if new is None:
                continue
            packed = getattr(spill, "packed", {}).get(k)
            if packed:  # stored as its codec's tensors instead of the dense weight
                from squeeze.formats import packed_keys

                for name in packed_keys(packed):
                    tensors[name] = spill.get(name)
                    weight_map[name] = shard
                    total += tensors[name].numel() * tensors[name].element_size()
                continue
            t = spill.get(k) if spill is not None else None
            if t is None:
                t = ckpt.get(k)
                if spill is not None:
                    t = spill.cast(k, t)
            tensors[new] = t.contiguous()
            weight_map[new] = shard
            total += t.numel() * t.element_size()
        save_file(tensors, str(dest / shard), metadata={"format": "pt"})
        sizes[shard] = (dest / shard).stat().st_size
        del tensors
    if ckpt.index_file:
        index = json.loads((ckpt.path / INDEX_NAME).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        index["weight_map"] = dict(sorted(weight_map.items()))
        write_json(dest / INDEX_NAME, index)
    from squeeze.autoload import mark

    write_json(dest / "config.json", mark({**ckpt.config_dict, **config_updates}, record))
    for f in ckpt.extra_files():
        rel = f.relative_to(ckpt.path)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)
    sidecar = {**(spill.sidecar if spill is not None else {}), **(sidecar or {})}
    if sidecar:
        save_file(sidecar, str(dest / SIDECAR))
        sizes[SIDECAR] = (dest / SIDECAR).stat().st_size
    write_json(dest / RECORD, {**versions(), **record})
    for f in dest.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    return sizes


class TensorSource:
    """In-memory replacement tensors keyed by checkpoint key (e.g. weights fine-tuned in memory),
    in the shape :func:`write_checkpoint` expects of a spill: keys it holds come from here, cast
    to the dtype the source checkpoint stores them in; every other key is copied from the source."""

    def __init__(self, ckpt: Checkpoint, tensors: dict[str, torch.Tensor], sidecar: dict | None = None):
        self.ckpt, self.tensors, self.sidecar = ckpt, tensors, dict(sidecar or {})

    def cast(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        from squeeze.checkpoint import SAFETENSORS_DTYPES

        return t.to(SAFETENSORS_DTYPES.get(self.ckpt.dtype_of(key), t.dtype))

    def get(self, key: str) -> torch.Tensor | None:
        t = self.tensors.get(key)
        return None if t is None else self.cast(key, t.detach())
