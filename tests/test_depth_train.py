"""LayerSkip recipe (schedules, early-exit loss, training/resume/export) and LayerDrop removal."""

import itertools
import json
import math

import pytest
import torch

import squeeze
from squeeze.depth import layerdrop, layerskip
from squeeze.runtime.stack import exit_logits, layer_outputs
from squeeze.errors import SqueezeError
from tests.test_depth import _one_thread, tiny_model  # noqa: F401  (_one_thread: autouse fixture)


def test_dropout_rates_follow_schedule():
    r = layerskip.dropout_rates(5, 0.2)
    assert r[0] == 0 and r[-1] == pytest.approx(0.2)
    for l in range(5):
        assert r[l] == pytest.approx(0.2 * (math.exp(l * math.log(2) / 4) - 1))
    assert all(a < b for a, b in itertools.pairwise(r))
    assert layerskip.dropout_rates(1, 0.3) == [0.0]


def test_layer_dropout_is_per_sample_and_at_the_scheduled_rate():
    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    blocks = torch.nn.ModuleList([AddOne(), AddOne()])
    rates = [0.0, 0.3]
    d = layerskip.LayerDropout(blocks, rates)
    d.seed(0)
    x = torch.zeros(4000, 1, 1)
    y0, y1 = blocks[0](x), blocks[1](x)
    assert torch.all(y0 == 1)  # rate 0: never skipped (no hook)
    skipped = (y1 == 0).float().mean()
    assert abs(float(skipped) - 0.3) < 0.03
    assert set(y1.flatten().tolist()) == {0.0, 1.0}  # within one batch some samples skip, others not (no rescale)
    blocks.eval()
    assert torch.all(blocks[1](x) == 1)  # inactive at inference
    d.remove()


def test_loss_scales_and_curricula():
    s = layerskip.loss_scales([0, 1, 2, 3], 4, "sum_l")
    assert torch.allclose(s, torch.tensor([1, 3, 6, 10], dtype=torch.float64) / 20)
    s = layerskip.loss_scales([1, 3], 4, "linear_l", e_scale=0.5)
    assert torch.allclose(s, torch.tensor([1.0, 4.0], dtype=torch.float64) / 5)
    assert layerskip.enabled_exits(4, 0, 100, "gradual") == [3]
    assert layerskip.enabled_exits(4, 25, 100, "gradual") == [2, 3]
    assert layerskip.enabled_exits(4, 50, 100, "gradual") == [0, 1, 2, 3]
    assert layerskip.enabled_exits(4, 0, 100, "rotational") == [0, 2, 3]
    assert layerskip.enabled_exits(4, 1, 100, "rotational") == [1, 3]
    assert layerskip.enabled_exits(4, 7, 100, "none") == [0, 1, 2, 3]
    with pytest.raises(SqueezeError):
        layerskip.enabled_exits(4, 0, 1, "bogus")


def test_early_exit_loss_equals_hand_computation():
    model = tiny_model("llama", layers=3)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hiddens, logits = layer_outputs(model, ids[:, :-1])
    labels = ids[:, 1:]
    assert torch.allclose(exit_logits(model, hiddens[-1]), logits, atol=1e-5)  # last exit = the model
    loss, per_layer = layerskip.early_exit_loss(model, hiddens, labels, [0, 2], scale="sum_l", e_scale=0.5)
    ces = []
    for l in (0, 2):
        h = model.model.norm(hiddens[l])
        lg = model.lm_head(h)
        lp = torch.log_softmax(lg, -1)
        ces.append(float(-lp.gather(-1, labels[..., None]).mean().detach()))
    # sum_l over enabled layers {0, 2}: cumsum(1, 3) = (1, 4); non-final x 0.5 -> (0.5, 4) / 4.5
    expected = (0.5 * ces[0] + 4 * ces[1]) / 4.5
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert per_layer == pytest.approx(ces, rel=1e-5)


def test_finetune_runs_resumes_and_exports(tmp_path, tiny_calib):
    src = tmp_path / "src"
    tiny_model("llama", layers=3).save_pretrained(src)
    kw = {"calib": str(tiny_calib), "steps": 4, "batch_size": 2, "seqlen": 16, "nsamples": 8, "save_every": 2,
          "lr": 1e-3, "curriculum": "gradual"}
    full = layerskip.finetune(src, tmp_path / "a", **kw)
    assert len(full["losses"]) == 4 and all(math.isfinite(x) for x in full["losses"])

    class Stop(Exception):
        pass

    def interrupt(step, total, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        layerskip.finetune(src, tmp_path / "b", progress=interrupt, **kw)
    sdir = layerskip.state_dir(tmp_path / "b")
    assert not (tmp_path / "b").exists() and json.loads((sdir / "state.json").read_text())["step"] == 2
    with pytest.raises(SqueezeError, match="different layerskip run"):
        layerskip.finetune(src, tmp_path / "b", resume=True, **(kw | {"lr": 2e-3}))
    resumed = layerskip.finetune(src, tmp_path / "b", resume=True, **kw)
    assert resumed["resumed_from"] == 2 and resumed["losses"] == full["losses"]
    assert not sdir.exists()

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    orig = AutoModelForCausalLM.from_pretrained(src)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n  # interrupted + resumed = uninterrupted, exactly
    assert any(not torch.equal(pa, po) for pa, po in zip(a.parameters(), orig.parameters()))
    rec = json.loads((tmp_path / "a" / "squeeze.json").read_text())
    entry = rec["passes"][-1]
    assert entry["pass"] == "layerskip" and entry["p_max"] == 0.2 and entry["curriculum"] == "gradual"
    squeeze.load(tmp_path / "a")  # the recorded pass is known to squeeze.load
    with pytest.raises(SqueezeError, match="exists"):
        layerskip.finetune(src, tmp_path / "a", **kw)


def test_finetune_with_distillation_cli(tmp_path, tiny_calib):
    from click.testing import CliRunner
    from squeeze.cli.main import cli

    src = tmp_path / "src"
    tiny_model("qwen2", layers=2).save_pretrained(src)
    r = CliRunner().invoke(cli, ["finetune", str(src), "--recipe", "layerskip", "--calib", str(tiny_calib),
                                 "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--nsamples", "4",
                                 "--distill-from", str(src), "--curriculum", "rotational", "--out",
                                 str(tmp_path / "o"), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "o" / "squeeze.json").read_text())["passes"][-1]["distill_from"] == str(src)


def test_block_influence_and_choice():
    x = torch.randn(3, 5, 8)
    assert float(layerdrop.block_influence(x, x)) == pytest.approx(0, abs=1e-9)
    assert float(layerdrop.block_influence(x, -x)) == pytest.approx(2)
    assert layerdrop.choose_layers(5, 2, "even") == [1, 3]
    assert layerdrop.choose_layers(5, 2, "importance", [0.5, 0.1, 0.3, 0.05, 0.9]) == [1, 3]
    with pytest.raises(SqueezeError):
        layerdrop.choose_layers(5, 5, "even")


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("by", ["importance", "even"])
def test_layerdrop_export_reloads_and_matches_in_memory(arch, by, tmp_path, tiny_calib):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_model(arch, layers=4).save_pretrained(src)
    rep = layerdrop.drop_layers(src, tmp_path / "out", 2, by=by, calib=str(tiny_calib), nsamples=4, seqlen=16,
                                score="kl" if arch == "gpt2" else "cosine")
    removed = rep["removed"]
    assert len(removed) == 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.num_hidden_layers == 2
    ref = layerdrop.remove_layers(AutoModelForCausalLM.from_pretrained(src).eval(), removed)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
        # with a KV cache too (layer_idx renumbered in memory and in the export)
        out_a = exported.generate(ids, max_new_tokens=5, do_sample=False)
        out_b = ref.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out_a, out_b)
    rec = json.loads((tmp_path / "out" / "squeeze.json").read_text())["passes"][-1]
    assert rec["pass"] == "layerdrop" and rec["removed"] == removed and rec["num_layers_after"] == 2
    if arch == "gemma3_text":
        kept = [i for i in range(4) if i not in removed]
        lt = ["sliding_attention", "full_attention"] * 2
        assert exported.config.layer_types == [lt[i] for i in kept]
    squeeze.load(tmp_path / "out")


def test_whole_model_commands_read_and_keep_packed_exports(tmp_path, tiny_calib):
    """drop-layers, tune-exit and finetune on a packed (default-format) 2:4 export: each reads it,
    an untouched packed weight stays packed (renamed with its layer), and the export loads as
    the weights it was given."""
    from squeeze.depth.tune import tune_exit
    from squeeze.formats import open_dense

    src = tmp_path / "src"
    tiny_model("llama", layers=4).save_pretrained(src)
    pruned = squeeze.compress(src, tmp_path / "p", method="wanda", pattern="2:4", calib=str(tiny_calib),
                              nsamples=4, seqlen=16).out
    packed = json.loads((pruned / "squeeze.json").read_text())["format"]["linears"]
    assert packed
    rep = layerdrop.drop_layers(pruned, tmp_path / "d", 1, by="even", calib=str(tiny_calib))
    (gone,) = rep["removed"]
    assert rep["loads_with"] == "squeeze" and rep["size_bytes"]["ratio"] < 1
    after = json.loads((tmp_path / "d" / "squeeze.json").read_text())
    assert len(after["format"]["linears"]) == len(packed) * 3 // 4
    a, b = open_dense(pruned), open_dense(tmp_path / "d")
    for key in b.packed:  # layer i of the new export is layer renum[i] of the old
        i = int(key.split(".")[2])
        old = key.replace(f".layers.{i}.", f".layers.{i + (i >= gone)}.")
        assert torch.equal(b.get(key), a.get(old)), key
    model = squeeze.load(tmp_path / "d")
    ref = layerdrop.remove_layers(squeeze.load(pruned), [gone])
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)

    rep = tune_exit(pruned, calib=str(tiny_calib), out=tmp_path / "t", ks=(1,), nprompts=1, prompt_len=8,
                    max_new_tokens=4)
    assert json.loads((tmp_path / "t" / "squeeze.json").read_text())["format"]["linears"] == packed
    assert rep["size_bytes"]["ratio"] == pytest.approx(1, abs=0.01)  # the same tensors, copied as stored

    from squeeze.depth.layerskip import finetune

    rep = finetune(pruned, tmp_path / "f", calib=str(tiny_calib), steps=2, nsamples=4, seqlen=16, batch_size=2)
    # every weight trained, zeros too: nothing is smaller packed, so the export is dense and plain
    assert "format" not in json.loads((tmp_path / "f" / "squeeze.json").read_text())
    assert rep["loads_with"] == "transformers"
