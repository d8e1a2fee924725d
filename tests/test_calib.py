"""Calibration sources and packing."""

import json

import pytest
import torch
from squeeze.calib import load_rows, pack
from squeeze.calib.build import build_calibration, split_sentences

from squeeze.errors import SqueezeError


def test_builtin_corpus_is_real_text():
    rows = load_rows("builtin")
    assert rows.texts and len(rows) > 50 and sum(len(t.split()) for t in rows.texts) > 8000
    ev = load_rows("builtin-eval")
    assert len(ev) == 240
    assert not set(ev.texts) & set(rows.texts)


def test_txt_jsonl_parquet_and_datasets_folder_agree(tmp_path):
    texts = ["first paragraph of words", "second paragraph here", "third one"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    for src in ("a.txt", "a.jsonl", "a.parquet", "ds"):
        assert load_rows(str(tmp_path / src)).texts == texts, src


def test_ids_need_no_tokenizer(tmp_path):
    rows = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14]]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    cal = pack(load_rows(str(tmp_path / "ids.jsonl")), None, nsamples=2, seqlen=4)
    assert cal.packing == "rows"
    assert [s.tolist() for s in cal.samples] == [[1, 5, 6, 7], [1, 10, 11, 12]]


def test_concat_packing_is_seeded_and_exact(tmp_path):
    rows = [list(range(i * 10, i * 10 + 7)) for i in range(1, 9)]  # 8 rows x 7 tokens = 56 tokens
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    src = load_rows(str(tmp_path / "ids.jsonl"))
    a = pack(src, None, nsamples=3, seqlen=10, seed=0)
    b = pack(src, None, nsamples=3, seqlen=10, seed=0)
    c = pack(src, None, nsamples=3, seqlen=10, seed=1)
    assert a.packing == "concat" and all(len(s) == 10 for s in a.samples)
    assert a.digest() == b.digest() and a.digest() != c.digest()
    stream = torch.tensor([t for r in rows for t in r])
    for s in a.samples:  # every sample is a window of the stream aligned to seqlen
        starts = [i for i in range(0, 50, 10) if torch.equal(stream[i:i + 10], s)]
        assert len(starts) == 1
    with pytest.raises(SqueezeError, match="holds 56 tokens = 5 samples of 10"):
        pack(src, None, nsamples=6, seqlen=10)


def test_text_is_tokenized_with_the_model_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    cal = pack(load_rows("builtin"), tok, nsamples=8, seqlen=64)
    assert cal.packing == "rows" and all(s[0].item() == tok.cls_token_id for s in cal.samples)


def test_bad_sources(tmp_path):
    with pytest.raises(SqueezeError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SqueezeError, match="line 1 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "neg.jsonl").write_text(json.dumps({"input_ids": [1, -3]}) + "\n")
    with pytest.raises(SqueezeError, match="non-negative"):
        load_rows(str(tmp_path / "neg.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SqueezeError, match="unsupported calibration file type"):
        load_rows(str(tmp_path / "x.csv"))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SqueezeError, match="offline, only cached datasets load"):
        load_rows("squeeze-no-such-org/no-such-dataset")


def test_token_ids_beyond_vocab_are_rejected(tmp_path):
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": list(range(300, 340))}) + "\n")
    with pytest.raises(SqueezeError, match="vocab size 128"):
        pack(load_rows(str(tmp_path / "ids.jsonl")), None, 1, 16, vocab_size=128)


# -- build_calibration: the one builder every command uses ------------------------------------------
def _minilm(minilm_dir):
    from squeeze.checkpoint import Checkpoint
    from squeeze.modeling import load_config

    ckpt = Checkpoint(minilm_dir)
    return ckpt, load_config(ckpt)


def test_split_sentences():
    text = 'He said "Go." Then 3 dogs ran!  Why?\n(Yes.) The end. e.g. lower case stays'
    assert split_sentences(text) == ['He said "Go."', "Then 3 dogs ran!", "Why?", "(Yes.)",
                                     "The end. e.g. lower case stays"]


@pytest.mark.parametrize("packing", ["auto", "rows", "concat"])
def test_packed_rows_are_the_packing_of_the_tokenized_source(minilm_dir, packing):
    from transformers import AutoTokenizer

    ckpt, config = _minilm(minilm_dir)
    cal = build_calibration(ckpt, config, "builtin", 8, 48, seed=3, packing=packing)
    want = pack(load_rows("builtin"), AutoTokenizer.from_pretrained(str(minilm_dir)), 8, 48, 3, packing)
    assert cal.packing == want.packing and cal.seed == 3
    assert [s.tolist() for s in cal.samples] == [s.tolist() for s in want.samples]


def test_token_ids_need_no_tokenizer(tiny_dir, tiny_calib):
    from squeeze.checkpoint import Checkpoint
    from squeeze.modeling import load_config

    ckpt = Checkpoint(tiny_dir("llama"))  # no tokenizer in the folder
    cal = build_calibration(ckpt, load_config(ckpt), str(tiny_calib), 4, 16, packing="rows")
    rows = [json.loads(line)["input_ids"] for line in tiny_calib.read_text().splitlines()]
    assert [s.tolist() for s in cal.samples] == [r[:16] for r in rows[:4]]


@pytest.mark.parametrize("pairs", [False, True])
def test_sentence_rows_are_one_tokenized_sentence_each(minilm_dir, pairs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    ckpt, config = _minilm(minilm_dir)
    texts = load_rows("builtin").texts
    sents = [s for t in texts for s in split_sentences(t)]
    cal = build_calibration(ckpt, config, "builtin", None, 24, rows="sentences", pairs=pairs)
    assert cal.packing == ("sentences+pairs" if pairs else "sentences")
    got = [s.tolist() for s in cal.samples]
    if not pairs:
        assert got == [tok(s)["input_ids"][:24] for s in sents]
    else:  # every text's sentences, then its consecutive pairs
        first = split_sentences(texts[0])
        want = [tok(s)["input_ids"][:24] for s in first + [a + " " + b for a, b in zip(first, first[1:])]]
        assert got[:len(want)] == want and len(got) == len(sents) + sum(
            max(len(split_sentences(t)) - 1, 0) for t in texts)
    assert len({len(r) for r in got}) > 1  # rows keep their own lengths


def test_sentence_rows_subset_is_seeded_and_in_order(minilm_dir):
    ckpt, config = _minilm(minilm_dir)
    every = [s.tolist() for s in build_calibration(ckpt, config, "builtin", None, 32, rows="sentences").samples]
    a = [s.tolist() for s in build_calibration(ckpt, config, "builtin", 20, 32, seed=4, rows="sentences").samples]
    b = [s.tolist() for s in build_calibration(ckpt, config, "builtin", 20, 32, seed=4, rows="sentences").samples]
    c = [s.tolist() for s in build_calibration(ckpt, config, "builtin", 20, 32, seed=5, rows="sentences").samples]
    assert a == b != c and len(a) == 20
    where = [every.index(r) for r in a]
    assert where == sorted(where)
    with pytest.raises(SqueezeError, match="sentence rows, asked for --nsamples"):
        build_calibration(ckpt, config, "builtin", len(every) + 1, 32, rows="sentences")


@pytest.mark.parametrize("rows", ["packed", "sentences"])
def test_seqlen_is_checked_against_the_context_in_every_mode(minilm_dir, rows):
    ckpt, config = _minilm(minilm_dir)
    with pytest.raises(SqueezeError, match="--seqlen 513 exceeds the model's context of 512 tokens"):
        build_calibration(ckpt, config, "builtin", 4, 513, rows=rows)


def test_builder_errors(minilm_dir, tiny_dir, tiny_calib):
    from squeeze.checkpoint import Checkpoint
    from squeeze.modeling import load_config

    ckpt, config = _minilm(minilm_dir)
    with pytest.raises(SqueezeError, match="needs text data"):
        build_calibration(ckpt, config, str(tiny_calib), None, 16, rows="sentences")
    with pytest.raises(SqueezeError, match="unknown rows"):
        build_calibration(ckpt, config, "builtin", 4, 16, rows="lines")
    tiny = Checkpoint(tiny_dir("llama"))
    with pytest.raises(SqueezeError, match="needs the model's tokenizer"):
        build_calibration(tiny, load_config(tiny), "builtin", None, 16, rows="sentences")
    with pytest.raises(SqueezeError, match="the model has no tokenizer"):
        build_calibration(tiny, load_config(tiny), "builtin", 4, 16)
