"""Resumable compress: the work folder of a block sweep.

A compress run keeps its progress in ``<out parent>/.<out name>.compress-work/`` (like recover's
``.recover-work``), removed once the export is in place:

- ``spill/block<i>.safetensors``: block ``i`` as the export will store it (written by
  :class:`squeeze.export.Spill`; its packed entries and sidecar tensors named in the file's
  metadata, so the file alone rebuilds the spill's index);
- ``hidden-<i>.safetensors``: the calibration hidden states entering block ``i + 1`` (fp32, the
  propagated activations of the compressed model so far);
- ``state.json``: the identity of the run, the last finished block, the per-linear records and
  each block pass's carried state (:meth:`squeeze.passes.base.BlockPass.sweep_state`).

Every file is written to a temporary name and ``os.replace``d into place, and ``state.json``,
written last, is what makes a block count as finished: a kill at any instant leaves the previous
state, whose files are all still there. Files of blocks after the recorded one are stale and
overwritten on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from squeeze.errors import SqueezeError

STATE_JSON = "state.json"


def work_dir(out: str | Path) -> Path:
    """Where an interrupted compress of ``out`` keeps its progress: a hidden sibling of ``out``."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.compress-work"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (a reader sees the old file or the whole new one).
    Streamed tensor by tensor from the tensors' own memory: safetensors' ``save_file`` first
    builds the whole file in memory, a second copy of the calibration activations."""
    from squeeze.shard_writer import ShardWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with ShardWriter(tmp, sorted(tensors), metadata) as w:
        for name in sorted(tensors):
            w.add(name, tensors[name])
    _durable_replace(tmp, path)


def save_json(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    _durable_replace(tmp, path)


def _durable_replace(tmp: Path, path: Path) -> None:
    # fsync before the rename: after a power loss the new name must not point at unwritten data
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def source_files(ckpt) -> dict[str, list[int]]:
    """{file: [bytes, mtime ns]} of the source checkpoint's folder: an edited source is another run."""
    root = Path(ckpt.path)
    return {str(f.relative_to(root)): [f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(root.rglob("*")) if f.is_file()}


class SweepState:
    """The work folder of one compress run, keyed by ``fingerprint`` (what identifies the run)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    @property
    def spill_dir(self) -> Path:
        return self.folder / "spill"

    def read(self) -> dict | None:
        """The saved state, or None when there is none (no folder, or killed before block 0 ended)."""
        try:
            return json.loads((self.folder / STATE_JSON).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def start(self, resume: bool, out: Path) -> dict | None:
        """Prepare the folder for this run; returns the state to continue from (``resume``) or None.

        Without ``resume`` a folder of another run is replaced, and one of this same run is refused
        (it holds finished work that ``--resume`` would continue). With ``resume`` a folder of
        another run is refused; no folder at all starts from the beginning."""
        saved = self.read()
        if saved is not None and saved.get("fingerprint") != self.fingerprint:
            if resume:
                raise SqueezeError(f"{self.folder} holds an interrupted compress with other settings (model, recipe, "
                                   "calibration, seed, dtype, format or threads differ): drop --resume to start over")
            saved = None
        elif saved is not None and not resume:
            raise SqueezeError(f"an interrupted compress to {out} with these settings finished "
                               f"{saved['done'] + 1} of {saved['blocks']} blocks: re-run with --resume to continue, "
                               f"or delete {self.folder} to start over")
        if saved is None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        return saved

    def hidden(self, saved: dict) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / saved["hidden"]))
        return [tensors[f"batch{k}"] for k in range(len(tensors))]

    def save_block(self, index: int, blocks: int, hidden: list[torch.Tensor] | None, record: dict) -> None:
        """Block ``index`` is finished: its spill file is written; save the activations entering the
        next block, then the state that names them (last: it is the commit point)."""
        name = None
        if hidden is not None:
            name = f"hidden-{index:05d}.safetensors"
            save_tensors({f"batch{k}": h.contiguous() for k, h in enumerate(hidden)}, self.folder / name)
        save_json({"fingerprint": self.fingerprint, "done": index, "blocks": blocks, "hidden": name, **record},
                  self.folder / STATE_JSON)
        for old in self.folder.glob("hidden-*.safetensors"):
            if old.name != name:
                old.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
