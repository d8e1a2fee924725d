"""One way from a ``--calib`` spec to a :class:`Calibration` for a given model: compress, recover,
drop-layers, LayerSkip and tune-exit all call :func:`build_calibration`, so they check
``--seqlen`` against the model's context, tokenize and guard the vocab the same way.

Rows are either ``packed`` (fixed-length samples, see :mod:`squeeze.calib.packing`) or
``sentences`` (one sentence per row, each its own length, see :func:`sentence_ids`).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
from squeeze.calib.packing import Calibration, pack
from squeeze.calib.sources import load_rows

from squeeze import progress
from squeeze.errors import SqueezeError

ROWS = ("packed", "sentences")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer stored in the checkpoint folder ``path``, or None when it has none."""
    ckpt_has = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json"))
    if not ckpt_has:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise SqueezeError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0][:120]})") from None


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_of(config) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``), None when unknown."""
    return getattr(_text_config(config), "max_position_embeddings", None)


def build_calibration(ckpt, config, calib: str, nsamples: int | None, seqlen: int | None, seed: int = 0,
                      packing: str = "auto", rows: str = "packed", pairs: bool = False,
                      trust_remote_code: bool = False) -> Calibration:
    """Calibration rows from the spec ``calib`` for the checkpoint ``ckpt`` (its tokenizer) whose
    transformers config is ``config`` (its context and vocab size).

    ``rows="packed"``: ``nsamples`` samples of ``seqlen`` tokens, ``packing`` as in
    :func:`~squeeze.calib.packing.pack`; ``seqlen=None`` picks it from the data (whole rows when
    enough are long; at most 512 or the model's context). ``rows="sentences"``: :func:`sentence_ids`,
    with ``pairs``; ``nsamples=None`` keeps every sentence; ``seqlen`` cuts sentences (default 512 or the context)."""
    if rows not in ROWS:
        raise SqueezeError(f"unknown rows {rows!r}: use packed or sentences")
    max_pos = context_of(config)
    cap = min(512, max_pos or 512)
    if max_pos and seqlen is not None and seqlen > max_pos:
        raise SqueezeError(f"--seqlen {seqlen} exceeds the model's context of {max_pos} tokens; lower --seqlen")
    with progress.phase("calibration data"):  # reading a dataset and tokenizing it can take a while
        data = load_rows(calib)
        vocab = getattr(_text_config(config), "vocab_size", None)
        if rows == "sentences":
            return _sentence_calibration(ckpt, data, nsamples, seqlen or cap, seed, pairs, vocab, trust_remote_code)
        tok = load_tokenizer(ckpt.path, trust_remote_code) if data.ids is None else None
        return pack(data, tok, nsamples, seqlen, seed, packing, vocab_size=vocab, max_seqlen=cap)


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]*[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split running text at sentence ends (``.``, ``!`` or ``?``, then whitespace, then a capital
    letter or digit). A heuristic for prose; abbreviations such as "Dr. Smith" split too."""
    flat = " ".join(text.split())
    return [p.strip() for p in _SENTENCE_END.split(flat) if p.strip()]


def sentence_ids(texts: list[str], tokenizer, seqlen: int, pairs: bool = False) -> list[list[int]]:
    """Rows of one sentence each: every text split with :func:`split_sentences`, tokenized on its
    own (with the tokenizer's special tokens) and cut to ``seqlen`` tokens; with ``pairs`` also
    every two consecutive sentences of a text as one more row. Rows under 2 tokens are dropped."""
    out = []
    for t in texts:
        sents = split_sentences(t)
        out += sents
        if pairs:
            out += [a + " " + b for a, b in itertools.pairwise(sents)]
    return [r[:seqlen] for r in (tokenizer(t, add_special_tokens=True)["input_ids"] for t in out) if len(r) >= 2]


def _sentence_calibration(ckpt, data, nsamples, seqlen, seed, pairs, vocab, trust_remote_code) -> Calibration:
    """``--rows sentences``: :func:`sentence_ids` of the text rows; ``nsamples`` keeps a seeded
    random subset of that many (in their original order)."""
    if data.texts is None:
        raise SqueezeError(f"--rows sentences needs text data, {data.source} holds token ids; "
                           "use --rows packed or give text")
    tok = load_tokenizer(ckpt.path, trust_remote_code)
    if tok is None:
        raise SqueezeError(f"--rows sentences needs the model's tokenizer, {ckpt.path} has none; use --rows packed")
    ids = sentence_ids(data.texts, tok, seqlen, pairs)
    if not ids:
        raise SqueezeError(f"calibration data {data.source} has no sentence of at least 2 tokens")
    if nsamples is not None:
        if nsamples > len(ids):
            raise SqueezeError(f"calibration data {data.source} has {len(ids)} sentence rows, asked for "
                               f"--nsamples {nsamples}; lower --nsamples or leave it out to use all")
        pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:nsamples].sort().values
        ids = [ids[i] for i in pick.tolist()]
    if vocab is not None and max(max(r) for r in ids) >= vocab:
        raise SqueezeError(f"the tokenizer of {ckpt.path} gives ids past the model's vocab size {vocab}")
    return Calibration([torch.tensor(r, dtype=torch.long) for r in ids], data.source,
                       "sentences+pairs" if pairs else "sentences", seqlen, seed)
