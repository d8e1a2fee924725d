"""Recovery distillation: masks provably unchanged, export record, resume, errors (the loss math and
the loop: tests/test_train.py)."""

import json

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.recovery import work_dir
from tests.conftest import STORIES, STORIES_CALIB, STORIES_EVAL, needs_shared


# -- end to end on tiny models -------------------------------------------------------------------
def _weights(path):
    """The dense weights an export stores (a packed one decoded)."""
    from squeeze.formats import open_dense

    ckpt = open_dense(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


@pytest.fixture(scope="module")
def pruned(tiny_dir, tiny_calib, tmp_path_factory):
    """{arch: pruned folder}: llama and bert at 2:4, gpt2 (Conv1D, transposed) at 50%."""
    import squeeze

    base = tmp_path_factory.mktemp("pruned")
    out = {}
    for arch, kw in (("llama", {"pattern": "2:4"}), ("gpt2", {"sparsity": 0.5}), ("bert", {"pattern": "2:4"})):
        out[arch] = squeeze.compress(tiny_dir(arch), base / arch, method="wanda", calib=str(tiny_calib),
                                     nsamples=8, seqlen=16, **kw).out
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_recover_keeps_every_zero_and_improves(arch, pruned, tiny_dir, tiny_calib, tmp_path):
    import squeeze

    out = tmp_path / "rec"
    r = squeeze.recover(pruned[arch], out, reference=tiny_dir(arch), calib=str(tiny_calib), steps=8, lr=1e-4,
                        nsamples=8, seqlen=16, batch_size=4)
    before, after = _weights(pruned[arch]), _weights(out)
    assert before.keys() == after.keys()
    changed = 0
    for k, w in before.items():
        assert after[k].dtype == w.dtype and after[k].shape == w.shape
        assert torch.all(after[k][w == 0] == 0), k  # every weight that was zero is still exactly zero
        if w.ndim == 2 and any(s in k for s in (".layers.", ".h.", ".layer.")):
            changed += int(not torch.equal(after[k], w))
    assert changed > 0  # the fine-tune did move the kept weights
    # what `squeeze info` reports: the promised pattern / sparsity still holds on every linear
    info = squeeze.info(out)
    assert info["linears"] and all(rec["promise_ok"] for rec in info["linears"].values())
    if arch != "gpt2":
        assert all(rec["fits_2_4"] for rec in info["linears"].values())
    # the record stays complete, and the export loads
    rec = json.loads((out / "squeeze.json").read_text())
    assert [p["pass"] for p in rec["passes"]] == ["wanda", "recover"]
    entry = rec["passes"][-1]
    assert entry["steps"] == 8 and entry["lr"] == 1e-4
    assert entry["loss"] == ("rel_mse" if arch == "bert" else "kl")
    assert entry["loss_after"] < entry["loss_before"], entry
    assert r.report["loss_after"] == entry["loss_after"]
    model = squeeze.load(out)
    assert model.squeeze_record["passes"][-1]["pass"] == "recover"
    assert not work_dir(out).exists()  # checkpoints removed after a successful export


def test_resume_gives_the_uninterrupted_result(pruned, tiny_dir, tiny_calib, tmp_path):
    import squeeze

    kw = {"reference": tiny_dir("llama"), "calib": str(tiny_calib), "steps": 6, "lr": 1e-3, "nsamples": 8, "seqlen": 16,
              "batch_size": 4, "checkpoint_every": 2}
    full = squeeze.recover(pruned["llama"], tmp_path / "full", **kw)

    class Stop(Exception):
        pass

    def stop_after_5(step, total, loss):
        if step == 5:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        squeeze.recover(pruned["llama"], out, on_step=stop_after_5, **kw)
    assert not out.exists()
    state = json.loads((work_dir(out) / "state.json").read_text())
    assert state["step"] == 4
    with pytest.raises(SqueezeError, match="different recovery run"):
        squeeze.recover(pruned["llama"], out, resume=True, **(kw | {"lr": 5e-4}))
    r = squeeze.recover(pruned["llama"], out, resume=True, **kw)
    assert r.report["resumed_from"] == 4 and r.report["losses"] == full.report["losses"]
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_user_errors(pruned, tiny_dir, tiny_calib, tmp_path):
    import squeeze

    kw = {"calib": str(tiny_calib), "nsamples": 4, "seqlen": 16}
    with pytest.raises(SqueezeError, match="not the dense version"):
        squeeze.recover(pruned["llama"], tmp_path / "x", reference=tiny_dir("gpt2"), **kw)
    with pytest.raises(SqueezeError, match="--steps"):
        squeeze.recover(pruned["llama"], tmp_path / "x", reference=tiny_dir("llama"), steps=0, **kw)
    with pytest.raises(SqueezeError, match="--reference"):
        squeeze.recover(pruned["llama"], tmp_path / "x", **kw)
    with pytest.raises(SqueezeError, match="already exists"):
        squeeze.recover(pruned["llama"], pruned["gpt2"], reference=tiny_dir("llama"), **kw)
    with pytest.raises(SqueezeError, match="not a compression method"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "y", method="recover", calib=str(tiny_calib))
    for fmt in ("auto", "dense"):  # training would leave the quantization grid, packed or not
        quantized = squeeze.compress(tiny_dir("llama"), tmp_path / f"q-{fmt}", method="wanda", pattern="2:4",
                                     quantize="int8", format=fmt, **kw).out
        with pytest.raises(SqueezeError, match="recover the pruned export before quantizing"):
            squeeze.recover(quantized, tmp_path / "x", reference=tiny_dir("llama"), **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_export_recovers_packed_then_quantizes(arch, pruned, tiny_dir, tiny_calib, tmp_path):
    """prune (packed by default) -> recover -> quantize: every step reads the packed export, writes
    the format it was given, and the pruned zeros stay exact zeros through quantization."""
    import squeeze
    from squeeze.formats import open_dense
    from squeeze.sparsity import satisfies_nm

    kw = {"calib": str(tiny_calib), "nsamples": 4, "seqlen": 16}
    src = json.loads((pruned[arch] / "squeeze.json").read_text())
    assert src["format"]["linears"]  # the default export is packed
    rec = squeeze.recover(pruned[arch], tmp_path / "rec", reference=tiny_dir(arch), steps=3, **kw).out
    record = json.loads((rec / "squeeze.json").read_text())
    assert record["format"]["kind"] == src["format"]["kind"]
    assert record["format"]["linears"].keys() == src["format"]["linears"].keys()
    before, after = _weights(pruned[arch]), _weights(rec)
    assert sum(not torch.equal(before[k], after[k]) for k in src["format"]["linears"]) > 0  # trained, then packed
    assert all(torch.equal(after[k] == 0, before[k] == 0) for k in src["format"]["linears"])

    q = squeeze.compress(rec, tmp_path / "q", quantize="int8", **kw)
    record = json.loads((q.out / "squeeze.json").read_text())
    assert [e["pass"] for e in record["passes"]] == ["wanda", "recover", "quantize"]
    quant = open_dense(q.out)
    for k in src["format"]["linears"]:
        w = quant.get(k)
        assert torch.all(w[after[k] == 0] == 0), k  # the mask promised before stays exact
        if arch == "llama":
            assert satisfies_nm(w, 2, 4), k
    assert all(r.get("quant") == "int8" and r["pass"] == "wanda" for r in record["linears"].values())
    info = squeeze.info(q.out)
    assert all(r["promise_ok"] for r in info["linears"].values() if "promised" in r)
    with torch.no_grad():  # the packed chain loads as what it stores
        ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(squeeze.load(q.out)(ids).logits).all()


def test_cli(pruned, tiny_dir, tiny_calib, tmp_path):
    from squeeze.cli.main import main

    main(["recover", str(pruned["llama"]), "--reference", str(tiny_dir("llama")), "--calib", str(tiny_calib),
          "--steps", "3", "--nsamples", "4", "--seqlen", "16", "--out", str(tmp_path / "c"),
          "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == 3 and len(report["losses"]) == 3
    with pytest.raises(SystemExit) as e:  # exists without --overwrite -> user error, exit code 2
        main(["recover", str(pruned["llama"]), "--reference", str(tiny_dir("llama")), "--calib", str(tiny_calib),
              "--steps", "3", "--out", str(tmp_path / "c")])
    assert e.value.code == 2


# -- real model ----------------------------------------------------------------------------------
@needs_shared
def test_recovery_lowers_eval_kl_on_stories(tmp_path):
    import squeeze

    torch.set_num_threads(1)
    pruned = squeeze.compress(STORIES, tmp_path / "w", method="wanda", pattern="2:4", calib=str(STORIES_CALIB),
                              nsamples=64, seqlen=128).out
    squeeze.recover(pruned, tmp_path / "r", reference=STORIES, calib=str(STORIES_CALIB), nsamples=64, seqlen=128,
                    steps=20, lr=1e-3)
    kl_pruned = squeeze.evaluate(pruned, str(STORIES_EVAL), reference=STORIES, max_rows=32)["kl"]
    kl_rec = squeeze.evaluate(tmp_path / "r", str(STORIES_EVAL), reference=STORIES, max_rows=32)["kl"]
    assert kl_rec < 0.8 * kl_pruned, (kl_rec, kl_pruned)
    assert squeeze.info(tmp_path / "r")["linears"]["model.layers.0.mlp.down_proj"]["promise_ok"]
