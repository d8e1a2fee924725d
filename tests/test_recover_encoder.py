"""Recovery for encoders: intermediate-layer and pooled-embedding losses, per-sentence rows with
padding, token dropout, learning-rate schedule; masks still provably unchanged."""

import itertools
import json

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.recovery import (
    _Distiller,
    collate,
    drop_tokens,
    layerwise_relative_mse,
    lr_at,
    mean_pool,
    parse_augment,
    parse_encoder_loss,
    pooled_cosine_loss,
    relative_mse,
    replace_tokens,
)


# -- pure pieces ---------------------------------------------------------------------------------
def test_relative_mse_ignores_padding():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = relative_mse(t, s, mask)
    s2, t2 = s.clone(), t.clone()
    s2[0, 3:] += 100.0  # garbage at padded positions changes nothing
    t2[0, 3:] -= 50.0
    assert torch.allclose(relative_mse(t2, s2, mask), base)
    assert not torch.allclose(relative_mse(t2, s2), base)  # ... but counts without the mask
    assert float(relative_mse(t, t, mask)) == 0.0


def test_layerwise_relative_mse_is_the_mean_over_blocks():
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    assert float(layerwise_relative_mse(t, [x.clone() for x in t])) == 0.0
    s = [t[0], t[1] + 1.0, t[2]]  # only the middle block differs
    value = layerwise_relative_mse(t, s)
    assert value > 0
    assert torch.allclose(value, relative_mse(t[1], s[1]) / 3)
    with pytest.raises(ValueError):
        layerwise_relative_mse(t, s[:2])


def test_pooled_cosine_loss_matches_the_evaluation_metric():
    from squeeze.evaluation import _embed

    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 6, 4, generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    assert float(pooled_cosine_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(pooled_cosine_loss(t, 3.0 * t, mask)) == pytest.approx(0.0, abs=1e-6)  # direction only
    s = t + torch.randn(3, 6, 4, generator=g)
    s_padded = s.clone()
    s_padded[mask == 0] = 1e3  # padding must not leak into the mean
    loss = pooled_cosine_loss(t, s_padded, mask)
    assert loss > 0

    class Fixed(torch.nn.Module):  # returns a fixed hidden state, as squeeze.evaluate's _embed expects
        def __init__(self, h):
            super().__init__()
            self.h = h

        def forward(self, input_ids, attention_mask):
            return type("O", (), {"last_hidden_state": self.h[:, :input_ids.shape[1]]})()

    rows = [torch.arange(6), torch.arange(3), torch.arange(2)]
    cos = torch.nn.functional.cosine_similarity(_embed(Fixed(s), rows, 0), _embed(Fixed(t), rows, 0), dim=-1)
    assert float(loss) == pytest.approx(float(1 - cos.mean()), abs=1e-5)
    assert torch.allclose(mean_pool(t, mask)[2], t[2, :2].mean(0))


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


def test_lr_schedule():
    assert [lr_at(s, 10, 1.0, "constant", 0) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, 10, 1.0, "constant", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_at(s, 10, 1.0, "cosine", 2) for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in itertools.pairwise(cos[2:])) and 0 < cos[-1] < 0.05


def test_collate_and_drop_tokens():
    ids, mask = collate([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = collate([torch.tensor([5, 6]), torch.tensor([8, 9])], pad_id=0)
    assert mask is None and ids.tolist() == [[5, 6], [8, 9]]
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


def test_padded_batch_loss_equals_unpadded_rows(tiny_dir):
    """Per-sentence rows: a padded, masked batch gives each row the loss it has on its own."""
    from transformers import BertModel

    teacher = BertModel.from_pretrained(str(tiny_dir("bert"))).eval()
    student = BertModel.from_pretrained(str(tiny_dir("bert"))).eval()
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = [torch.tensor([1, 5, 9, 11, 2]), torch.tensor([1, 7, 2])]
    ids, mask = collate(rows, pad_id=0)
    d = _Distiller(student, teacher, "encoder", {"pooled": 1.0})
    with torch.no_grad():
        each = [float(d.loss(r[None])) for r in rows]
        assert float(d.loss(ids, mask)) == pytest.approx(sum(each) / 2, rel=1e-4)
        assert each[0] > 0 and each[1] > 0
        for terms in ({"last": 1.0}, {"layers": 1.0}, {"layers": 1.0, "pooled": 2.0}):
            assert float(_Distiller(teacher, teacher, "encoder", terms).loss(ids, mask)) == pytest.approx(0, abs=1e-6)
            assert float(_Distiller(student, teacher, "encoder", terms).loss(ids, mask)) > 0


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
