"""Turn rows into calibration samples: ``nsamples`` sequences of ``seqlen`` token ids.

Packing (``auto`` picks the first that fits):
- ``rows``: each row with at least ``seqlen`` tokens gives one sample, its first ``seqlen``
  tokens (so a sample starts where a document starts, as the model saw in training), the
  first ``nsamples`` such rows in file order.
- ``concat``: all rows joined in file order into one stream, cut into consecutive windows of
  ``seqlen``; ``nsamples`` windows are picked at random with ``seed``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from squeeze.calib.sources import Rows

from squeeze.errors import SqueezeError


@dataclass
class Calibration:
    samples: list[torch.Tensor]  # each [seqlen] int64
    source: str
    packing: str
    seqlen: int
    seed: int
    extra: dict = field(default_factory=dict)  # e.g. generated-token counts

    @property
    def num_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.samples)

    def digest(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"source": self.source, "packing": self.packing, "nsamples": len(self.samples),
                "seqlen": self.seqlen, "tokens": self.num_tokens, "seed": self.seed,
                "digest": self.digest(), **self.extra}


def tokenize_rows(rows: Rows, tokenizer) -> list[list[int]]:
    if rows.ids is not None:
        return rows.ids
    if tokenizer is None:
        raise SqueezeError(
            f"calibration data {rows.source} is text but the model has no tokenizer; give token ids "
            "instead (a .jsonl with an 'input_ids' list per line)"
        )
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in rows.texts]


def auto_seqlen(lengths: list[int], nsamples: int, cap: int) -> int:
    """The default ``--seqlen``: the longest at which the data still gives ``nsamples`` whole rows,
    up to ``cap``, when that is at least half of ``cap``; else ``cap`` (windows cut from the
    concatenated rows). Whole rows are what a model sees at inference, each from its start; a window
    of the concatenation mixes documents mid-way (stories260k, SparseGPT 2:4 + 100 recovery steps:
    KL 0.143 on 128 whole 400-token rows, 0.281 on 512-token windows; bench/README.md §3)."""
    longest = sorted(lengths, reverse=True)
    if len(longest) >= nsamples and min(longest[nsamples - 1], cap) >= cap // 2:
        return min(longest[nsamples - 1], cap)
    return cap


def pack(rows: Rows, tokenizer, nsamples: int, seqlen: int | None, seed: int = 0, packing: str = "auto",
         vocab_size: int | None = None, max_seqlen: int = 512) -> Calibration:
    """``nsamples`` samples of ``seqlen`` tokens (``None``: :func:`auto_seqlen` up to
    ``max_seqlen``): whole rows cut to ``seqlen`` (``packing="rows"``, or ``auto`` when enough rows
    are that long), else windows of the rows' concatenation at seeded random offsets."""
    ids = [r for r in tokenize_rows(rows, tokenizer) if r] if len(rows) else []
    if seqlen is None:
        seqlen = auto_seqlen([len(r) for r in ids], nsamples, max_seqlen)
    if nsamples < 1 or seqlen < 2:
        raise SqueezeError(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")
    if packing not in ("auto", "rows", "concat"):
        raise SqueezeError(f"unknown packing {packing!r}: use auto, rows or concat")
    if len(rows) == 0:
        raise SqueezeError(f"calibration data {rows.source} is empty")
    if vocab_size is not None:
        bad = max((max(r) for r in ids), default=0)
        if bad >= vocab_size:
            raise SqueezeError(f"calibration data {rows.source} has token id {bad} >= the model's vocab size "
                               f"{vocab_size}: it was tokenised for another model")
    long_rows = [r for r in ids if len(r) >= seqlen]
    total = sum(len(r) for r in ids)
    windows = total // seqlen
    if packing == "rows" or (packing == "auto" and len(long_rows) >= nsamples):
        if len(long_rows) < nsamples:
            raise SqueezeError(
                f"calibration data {rows.source} has {len(long_rows)} rows of >= {seqlen} tokens, "
                f"asked for --nsamples {nsamples}; lower --nsamples/--seqlen or use --packing concat"
            )
        samples = [torch.tensor(r[:seqlen], dtype=torch.long) for r in long_rows[:nsamples]]
        return Calibration(samples, rows.source, "rows", seqlen, seed)
    if windows < nsamples:
        raise SqueezeError(
            f"calibration data {rows.source} holds {total} tokens = {windows} samples of {seqlen}; asked for "
            f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen} tokens; lower --nsamples or --seqlen"
        )
    stream = torch.tensor([t for r in ids for t in r], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=g)[:nsamples].sort().values
    samples = [stream[i * seqlen:(i + 1) * seqlen].clone() for i in pick.tolist()]
    return Calibration(samples, rows.source, "concat", seqlen, seed)
