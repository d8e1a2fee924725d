"""Recovery for encoders: per-sentence rows with padding, token dropout and replacement, the
encoder loss terms and schedule end to end; masks still provably unchanged (the loss math itself:
tests/test_train.py)."""

import json

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.recovery import drop_tokens, parse_augment, parse_encoder_loss, replace_tokens


# -- pure pieces ---------------------------------------------------------------------------------
def test_parse_encoder_loss():
    assert parse_encoder_loss("last") == {"last": 1.0}
    assert parse_encoder_loss(" layers , pooled:2.5") == {"layers": 1.0, "pooled": 2.5}
    for bad, msg in (("", "one or more"), ("mse", "unknown term"), ("pooled:0", "positive"),
                     ("pooled:x", "positive"), ("last,last", "twice")):
        with pytest.raises(SqueezeError, match=msg):
            parse_encoder_loss(bad)


def test_parse_augment():
    assert parse_augment(None) == {} and parse_augment("") == {}
    assert parse_augment("pairs,drop:0.1") == {"pairs": 1.0, "drop": 0.1}
    assert parse_augment("replace:0.2") == {"replace": 0.2}
    for bad in ("drop", "drop:1", "drop:-0.1", "replace:0", "shuffle", "pairs:2"):
        with pytest.raises(SqueezeError, match="augment"):
            parse_augment(bad)


def test_drop_and_replace_tokens():
    row = torch.arange(100, 140)
    g = torch.Generator().manual_seed(0)
    out = drop_tokens(row, 0.5, g)
    assert out[0] == 100 and out[-1] == 139 and 2 < len(out) < 40  # specials kept, some dropped
    assert torch.equal(drop_tokens(row, 0.5, torch.Generator().manual_seed(0)), out)  # seeded
    assert torch.equal(drop_tokens(torch.tensor([1, 2]), 0.9, g), torch.tensor([1, 2]))
    vocab = torch.arange(1000, 1010)
    out = replace_tokens(row, 0.5, torch.Generator().manual_seed(0), vocab)
    assert len(out) == len(row) and out[0] == 100 and out[-1] == 139
    changed = out != row
    assert 0 < int(changed.sum()) < 38 and bool(((out[changed] >= 1000) & (out[changed] < 1010)).all())


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sentence_rows_recover_minilm(minilm_dir, tmp_path):
    """The real tokenizer: per-sentence rows, every new option at once; masks unchanged, recorded."""
    from safetensors.torch import load_file

    import squeeze

    torch.set_num_threads(1)
    pruned = squeeze.compress(minilm_dir, tmp_path / "p", method="magnitude", pattern="2:4").out
    out = tmp_path / "r"
    r = squeeze.recover(pruned, out, reference=minilm_dir, calib="builtin", rows="sentences", nsamples=12, seqlen=64,
                        steps=3, lr=1e-4, batch_size=4, encoder_loss="layers,pooled:2", augment="pairs,drop:0.1,replace:0.1",
                        lr_schedule="cosine", warmup=1)
    cal = r.report["calibration"]
    assert cal["packing"] == "sentences+pairs" and cal["nsamples"] == 12 and cal["tokens"] < 12 * 64
    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k, w in before.items():
        assert torch.all(after[k][w == 0] == 0), k
    assert any(not torch.equal(after[k], w) for k, w in before.items() if ".layer." in k)
    assert all(rec["fits_2_4"] for rec in squeeze.info(out)["linears"].values())
    entry = json.loads((out / "squeeze.json").read_text())["passes"][-1]
    assert entry["loss"] == "layers,pooled:2" and entry["lr_schedule"] == "cosine" and entry["warmup"] == 1
    assert entry["augment"] == {"pairs": 1.0, "drop": 0.1, "replace": 0.1}
    assert len(r.report["losses"]) == 3 and entry["loss_before"] > 0


def test_resume_with_dropout_and_cosine(tiny_dir, tiny_calib, tmp_path):
    """Token dropout and the schedule are functions of seed and step: a resumed run is identical."""
    import squeeze

    pruned = squeeze.compress(tiny_dir("bert"), tmp_path / "p", method="wanda", pattern="2:4", calib=str(tiny_calib),
                              nsamples=8, seqlen=16).out
    kw = {"reference": tiny_dir("bert"), "calib": str(tiny_calib), "steps": 4, "lr": 1e-3, "nsamples": 8,
          "seqlen": 16, "batch_size": 4, "checkpoint_every": 2, "encoder_loss": "layers,pooled",
          "augment": "drop:0.2", "lr_schedule": "cosine", "warmup": 1}
    full = squeeze.recover(pruned, tmp_path / "full", **kw)

    class Stop(Exception):
        pass

    def stop(step, total, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        squeeze.recover(pruned, tmp_path / "res", on_step=stop, **kw)
    with pytest.raises(SqueezeError, match="different recovery run"):  # the new settings are fingerprinted
        squeeze.recover(pruned, tmp_path / "res", resume=True, **(kw | {"augment": "drop:0.3"}))
    r = squeeze.recover(pruned, tmp_path / "res", resume=True, **kw)
    assert r.report["resumed_from"] == 2 and r.report["losses"] == full.report["losses"]
    a, b = squeeze.load(tmp_path / "full").state_dict(), squeeze.load(tmp_path / "res").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_user_errors(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    llama = squeeze.compress(tiny_dir("llama"), tmp_path / "l", method="wanda", pattern="2:4", calib=str(tiny_calib),
                             nsamples=4, seqlen=16).out
    kw = {"reference": tiny_dir("llama"), "calib": str(tiny_calib), "nsamples": 4, "seqlen": 16, "steps": 2}
    with pytest.raises(SqueezeError, match="applies to encoders only"):
        squeeze.recover(llama, tmp_path / "x", encoder_loss="pooled", **kw)
    with pytest.raises(SqueezeError, match="--rows"):
        squeeze.recover(llama, tmp_path / "x", rows="words", **kw)
    with pytest.raises(SqueezeError, match="needs text data"):
        squeeze.recover(llama, tmp_path / "x", rows="sentences", **kw)
    with pytest.raises(SqueezeError, match="pairs needs --rows sentences"):
        squeeze.recover(llama, tmp_path / "x", augment="pairs", **kw)
    with pytest.raises(SqueezeError, match="--lr-schedule"):
        squeeze.recover(llama, tmp_path / "x", lr_schedule="linear", **kw)
    with pytest.raises(SqueezeError, match="--warmup"):
        squeeze.recover(llama, tmp_path / "x", warmup=2, **kw)
    assert not (tmp_path / "x").exists()


def test_cli_flags(tiny_dir, tiny_calib, tmp_path):
    from squeeze.cli.main import main

    import squeeze

    pruned = squeeze.compress(tiny_dir("bert"), tmp_path / "p", method="wanda", pattern="2:4", calib=str(tiny_calib),
                              nsamples=4, seqlen=16).out
    base = ["recover", str(pruned), "--reference", str(tiny_dir("bert")), "--calib", str(tiny_calib), "--steps", "2",
            "--nsamples", "4", "--seqlen", "16"]
    main(base + ["--encoder-loss", "layers,pooled:0.5", "--augment", "drop:0.1", "--lr-schedule", "cosine",
                 "--warmup", "1", "--out", str(tmp_path / "c"), "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["loss"] == "layers,pooled:0.5" and report["lr_schedule"] == "cosine" and report["warmup"] == 1
    assert report["augment"] == {"drop": 0.1}
    for bad in (["--augment", "drop:2"], ["--encoder-loss", "cosine"], ["--warmup", "5"]):
        with pytest.raises(SystemExit) as e:  # user error -> exit code 2, nothing written
            main(base + bad + ["--out", str(tmp_path / "d")])
        assert e.value.code == 2
    assert not (tmp_path / "d").exists()
