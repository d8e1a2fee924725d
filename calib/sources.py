"""Calibration data sources -> rows of token ids.

``--calib`` accepts: ``builtin`` (a small English corpus written for this project;
``builtin-eval`` is a separate set of 240 held-out sentences for evaluation), a ``.txt``
file (paragraphs separated by blank lines, else one row per line), a ``.jsonl`` file with
``text`` or ``input_ids`` per line, a ``.parquet`` file, a folder saved by
``datasets.Dataset.save_to_disk``, or a ``datasets`` hub name ``NAME[:CONFIG]`` (works when it is
cached or the hub is reachable). Token-id data needs no tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from squeeze.errors import SqueezeError


@dataclass
class Rows:
    """Rows of either text or token ids, and where they came from."""

    source: str
    kind: str  # "builtin", "txt", "jsonl", "parquet", "datasets-folder", "datasets-hub"
    texts: list[str] | None = None
    ids: list[list[int]] | None = None

    def __len__(self):
        return len(self.texts if self.texts is not None else self.ids)


def builtin_text(name: str = "builtin.txt") -> str:
    return resources.files("squeeze.calib").joinpath("data", name).read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if p]
    if len(paras) <= 1:
        paras = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return paras


def _from_records(records, source: str, kind: str) -> Rows:
    texts, ids = [], []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise SqueezeError(f"{source}: row {i} is not an object with 'text' or 'input_ids'")
        if "input_ids" in r and r["input_ids"] is not None:
            v = r["input_ids"]
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in v):
                raise SqueezeError(f"{source}: row {i}: input_ids must be a list of non-negative integers")
            ids.append(list(v))
        elif "text" in r and isinstance(r["text"], str):
            if r["text"].strip():
                texts.append(r["text"])
        else:
            raise SqueezeError(f"{source}: row {i} has neither 'text' nor 'input_ids'")
    if ids and texts:
        raise SqueezeError(f"{source}: mixes 'text' and 'input_ids' rows; use one kind")
    return Rows(source, kind, texts=None if ids else texts, ids=ids if ids else None)


def load_rows(src: str) -> Rows:
    if src is None or str(src).strip() == "":
        raise SqueezeError("no calibration data given: pass --calib builtin or a file/folder/dataset name")
    src = str(src)
    if src == "builtin":
        return Rows("builtin", "builtin", texts=_paragraphs(builtin_text()))
    if src == "builtin-eval":  # held-out sentences, one per line, never used for calibration
        lines = [ln.strip() for ln in builtin_text("builtin_eval.txt").splitlines() if ln.strip()]
        return Rows("builtin-eval", "builtin", texts=lines)
    p = Path(src)
    if p.is_file():
        try:
            if p.suffix == ".txt":
                return Rows(src, "txt", texts=_paragraphs(p.read_text(encoding="utf-8")))
            if p.suffix in (".jsonl", ".json"):
                records = []
                with open(p, encoding="utf-8") as f:
                    for ln, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                records.append(json.loads(line))
                            except json.JSONDecodeError:
                                raise SqueezeError(f"{src}: line {ln} is not valid JSON") from None
                return _from_records(records, src, "jsonl")
            if p.suffix == ".parquet":
                import pyarrow.parquet as pq

                return _from_records(pq.read_table(p).to_pylist(), src, "parquet")
        except (OSError, UnicodeDecodeError) as e:
            raise SqueezeError(f"{src}: cannot read calibration file ({e})") from None
        except ImportError:
            raise SqueezeError("reading .parquet needs pyarrow: pip install pyarrow") from None
        raise SqueezeError(f"{src}: unsupported calibration file type {p.suffix!r} (use .txt, .jsonl or .parquet)")
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise SqueezeError(f"{src}: not a datasets folder saved with save_to_disk ({e.__class__.__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        return _from_records(_columns(ds, src), src, "datasets-folder")
    if p.suffix in (".txt", ".jsonl", ".json", ".parquet") or "/" in src and not _looks_like_hub_name(src):
        raise SqueezeError(f"calibration file {src} does not exist")
    return _from_hub(src)


def _columns(ds, src):
    cols = set(ds.column_names)
    if "input_ids" in cols:
        return [{"input_ids": r} for r in ds["input_ids"]]
    if "text" in cols:
        return [{"text": r} for r in ds["text"]]
    raise SqueezeError(f"{src}: dataset has no 'text' or 'input_ids' column (columns: {sorted(cols)})")


def _looks_like_hub_name(src: str) -> bool:
    return src.count("/") <= 1 and not src.startswith((".", "/"))


def _from_hub(src: str) -> Rows:
    import datasets

    name, _, config = src.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__
        raise SqueezeError(
            f"cannot load dataset {src!r} ({msg}); offline, only cached datasets load: give a local "
            ".txt/.jsonl/.parquet file, a saved datasets folder, or builtin"
        ) from None
    return _from_records(_columns(ds, src), src, "datasets-hub")
