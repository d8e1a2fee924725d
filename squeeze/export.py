"""Atomic export: a checkpoint folder that plain ``from_pretrained`` loads, plus ``squeeze.json``.

Everything is written into a temporary sibling folder and renamed into place at the end, so a
failed run leaves nothing behind and an existing output is only replaced when asked. The input
checkpoint is only ever read. Tensors are written shard by shard, mirroring the source's
sharding; compressed blocks come from a spill written during the sweep, everything else is
copied from the source, one tensor at a time (:class:`~squeeze.shard_writer.ShardWriter`).
"""

from __future__ import annotations

import contextlib
import functools
import errno
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import torch

from squeeze import progress
from squeeze.checkpoint import INDEX_NAME, Checkpoint
from squeeze.errors import SqueezeError
from squeeze.report import write_json
from squeeze.resume import save_tensors
from squeeze.shard_writer import ShardWriter
from squeeze.versions import made_with

SIDECAR = "squeeze.safetensors"
_SIDECAR_PREFIX = "sidecar/"  # a spill file's run-time buffers (checkpoint keys never hold a slash)
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
    free = shutil.disk_usage(tmp).free  # before this run wrote anything: what it had to work with
    try:
        yield tmp
    except Exception as e:
        if not out_of_space(e):
            raise
        # the failed writer's frames hold spilled tensors, mapped from files in tmp: drop them, or
        # whoever keeps this error (a caller, a test) keeps the deleted files' space taken; the
        # errors it was raised while handling too (a file's close failing after its write did)
        seen = e
        while seen is not None:
            traceback.clear_frames(seen.__traceback__)
            seen = seen.__context__
        shutil.rmtree(tmp, ignore_errors=True)
        raise SqueezeError(f"no space left on device writing {out}: the export and its scratch files need more than "
                           f"the {free / 1e6:.1f} MB that were free there; free more space or choose another --out "
                           "(nothing was kept)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def out_of_space(e: BaseException) -> bool:
    """A full disk or quota, however it is reported: Python's OSError, or safetensors' own error
    type, whose message carries the OS error ("No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return f"os error {errno.ENOSPC})" in text or os.strerror(errno.ENOSPC) in text


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
        tensors, sidecar = {}, {}
        for name, t in block.module.state_dict().items():
            full = f"{block.name}.{name}"
            key = self.weights.to_ckpt.get(full)
            if key is None:
                if full not in self.weights.tied:
                    sidecar[full] = t.detach().clone().contiguous()
                continue
            tensors[key] = self.cast(key, t.detach()).contiguous()
        packed = {}
        if self.format != "dense":
            from squeeze.formats import pack_block

            packed = pack_block(block, self.weights, tensors)
            self.packed.update(packed)
        self.sidecar.update(sidecar)
        path = self.folder / f"block{block.index:05d}.safetensors"
        # the file alone says what it holds (packed entries, sidecar keys), so a resumed run can
        # rebuild this index from the files of the blocks it finished (squeeze.resume)
        meta = {"packed": json.dumps(packed), "sidecar": json.dumps(sorted(sidecar))}
        save_tensors({**tensors, **{_SIDECAR_PREFIX + k: t for k, t in sidecar.items()}}, path, meta)
        for k in tensors:
            self.where[k] = path

    def restore(self, upto: int) -> None:
        """Take over the spill files of blocks ``0..upto`` a killed run left in the folder (a
        resumed sweep starts at block ``upto + 1``); later blocks' files are stale and go."""
        from safetensors import safe_open

        for path in sorted(self.folder.glob("block*.safetensors")):
            if int(path.stem.removeprefix("block")) > upto:
                path.unlink()
                continue
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                self.packed.update(json.loads(meta.get("packed", "{}")))
                for k in json.loads(meta.get("sidecar", "[]")):
                    self.sidecar[k] = f.get_tensor(_SIDECAR_PREFIX + k)
                for k in f.keys():
                    if not k.startswith(_SIDECAR_PREFIX):
                        self.where[k] = path

    def has(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor | None:
        path = self.where.get(key)
        if path is None:
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


def write_checkpoint(ckpt: Checkpoint, dest: Path, spill: Spill | TensorSource | None, config_updates: dict,
                     record: dict, sidecar: dict | None = None, keys: dict[str, str | None] | None = None) -> dict:
    """Assemble the export inside ``dest`` (the staging folder). Returns {file: bytes}.

    ``ckpt`` is the source with its dense keys (a packed source through
    :class:`~squeeze.formats.DenseView`). Each weight is written as ``spill`` packed it, else as
    ``spill`` holds it, else as the source stores it: a packed source weight that nothing replaced
    keeps its stored tensors. ``record["format"]`` is set here to what the files then hold, so
    squeeze.json and config.json always describe the files. ``keys`` renames source tensors
    (source key -> new key) or leaves them out (-> ``None``); keys it does not name keep their
    name. Each tensor stays in the shard it came from."""
    from squeeze.formats import LAYOUT, kind_of, packed_keys, renamed_entry

    keys = keys or {}
    sizes = {}
    total = 0
    weight_map = {}
    stored_packed = getattr(ckpt, "packed", {})  # the source's own packed weights
    out_packed = {}
    # gathering (spilled, packed, cast) and writing the tensors: the bulk of an export's time. Each
    # shard is planned first (every tensor's name and where it comes from), then written one
    # tensor at a time, so only the tensor being written is in memory, never the whole shard
    with progress.phase("writing export", total=len(ckpt.key_to_shard), unit="tensor") as shown:
        for shard in ckpt.shards:
            plan: list[tuple[str, object]] = []  # (name in the export, a call that reads its tensor)
            shard_keys = [k for k, s in ckpt.key_to_shard.items() if s == shard]
            for k in shard_keys:
                new = keys.get(k, k)
                if new is None:
                    continue
                entry = spill.packed.get(k) if spill is not None else None
                if entry:  # packed by this run: its codec's tensors instead of the dense weight
                    plan += [(name, functools.partial(spill.get, name)) for name in packed_keys(entry)]
                    out_packed[new] = entry
                elif spill is not None and spill.has(k):
                    plan.append((new, functools.partial(spill.get, k)))
                elif k in stored_packed:  # untouched and stored packed: copied as stored
                    entry = renamed_entry(stored_packed[k], k, new)
                    plan += [(name, functools.partial(ckpt.raw.get, old))
                             for old, name in zip(packed_keys(stored_packed[k]), packed_keys(entry))]
                    out_packed[new] = entry
                else:
                    plan.append((new, functools.partial(_source_tensor, ckpt, spill, k)))
            with ShardWriter(dest / shard, [name for name, _ in plan], {"format": "pt"}) as w:
                for name, read in plan:
                    t = read()
                    w.add(name, t)
                    weight_map[name] = shard
                    total += t.numel() * t.element_size()
                    del t
            shown.advance(len(shard_keys))
            sizes[shard] = (dest / shard).stat().st_size
    record.pop("format", None)
    if out_packed:
        record["format"] = {"kind": kind_of(out_packed), "layout": LAYOUT, "linears": out_packed}
    write_index(ckpt, dest, weight_map, total)
    from squeeze.autoload import mark

    write_json(dest / "config.json", mark({**ckpt.config_dict, **config_updates}, record))
    copy_extra_files(ckpt, dest)
    sidecar = {**(spill.sidecar if spill is not None else {}), **(sidecar or {})}
    if sidecar:
        save_tensors(sidecar, dest / SIDECAR)
        sizes[SIDECAR] = (dest / SIDECAR).stat().st_size
    write_json(dest / RECORD, {**made_with(), **record})
    seal(dest)
    return sizes


def _source_tensor(ckpt, spill, key: str) -> torch.Tensor:
    t = ckpt.get(key)
    return spill.cast(key, t) if spill is not None else t


def write_index(ckpt, dest: Path, weight_map: dict[str, str], total: int) -> None:
    """The shard index of an export of the sharded ``ckpt`` (its metadata kept, the map rewritten)."""
    if ckpt.index_file:
        index = json.loads((ckpt.path / INDEX_NAME).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        index["weight_map"] = dict(sorted(weight_map.items()))
        write_json(dest / INDEX_NAME, index)


def copy_extra_files(ckpt, dest: Path) -> None:
    """Tokenizer, generation config and the like, as the source has them."""
    for f in ckpt.extra_files():
        rel = f.relative_to(ckpt.path)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)


def seal(dest: Path) -> None:
    """Read-write for the owner, readable by all: whatever umask the staging folder was made under."""
    for f in dest.rglob("*"):
        if f.is_file():
            f.chmod(0o644)


def size_report(baseline, sizes: dict, record: dict) -> dict:
    """What a command's report says of an export written by :func:`write_checkpoint`: its bytes
    beside ``baseline``'s (the checkpoint it is measured against), and what can load it."""
    from squeeze.autoload import loads_with

    source, export = baseline.weight_bytes(), sum(sizes.values())
    return {"size_bytes": {"source": source, "export": export, "ratio": round(export / max(source, 1), 4)},
            "loads_with": loads_with(record)}


class TensorSource:
    """In-memory replacement tensors keyed by checkpoint key (e.g. weights fine-tuned in memory),
    in the shape :func:`write_checkpoint` expects of a spill: keys it holds come from here, cast
    to the dtype the source checkpoint stores them in; every other key is copied from the source.
    A weight the source stored packed is packed again (:func:`squeeze.formats.pack_linear`: its
    sparsity layout, when that is still smaller than dense), so an export keeps its format."""

    def __init__(self, ckpt: Checkpoint, tensors: dict[str, torch.Tensor], sidecar: dict | None = None):
        from squeeze.formats import pack_linear

        self.ckpt, self.tensors, self.sidecar = ckpt, dict(tensors), dict(sidecar or {})
        self.packed: dict[str, dict] = {}
        self.parts: dict[str, torch.Tensor] = {}
        for key, before in getattr(ckpt, "packed", {}).items():
            if key in self.tensors:
                entry = pack_linear(self.get(key), key.removesuffix(".weight"), before["transposed"])
                if entry is not None:
                    self.parts.update(entry.pop("tensors"))
                    self.packed[key] = entry
                    del self.tensors[key]

    def cast(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        from squeeze.checkpoint import SAFETENSORS_DTYPES

        return t.to(SAFETENSORS_DTYPES.get(self.ckpt.dtype_of(key), t.dtype))

    def has(self, key: str) -> bool:
        return key in self.parts or key in self.tensors

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.parts:
            return self.parts[key]
        t = self.tensors.get(key)
        return None if t is None else self.cast(key, t.detach())
