"""The Python API and the CLI's happy paths: compress -> info -> eval -> load, recipes."""

import json

import torch
import yaml
from squeeze.cli.main import main

import squeeze


def test_version_names_the_libraries_that_decide_the_numbers(capsys):
    import transformers

    main(["--version"])
    out = capsys.readouterr().out.strip()
    assert out == f"squeeze {squeeze.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def test_recipe_two_passes_one_sweep(tiny_dir, tiny_calib, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump([
        {"pass": "wanda", "pattern": "2:4", "ignore": r"mlp\.down_proj"},
        {"pass": "magnitude", "pattern": "4:8", "targets": r"mlp\.down_proj"},
    ]))
    res = squeeze.compress(tiny_dir("llama"), tmp_path / "o", recipe=str(recipe), calib=str(tiny_calib),
                           nsamples=16, seqlen=32)
    lin = res.report["linears"]
    assert {r["pattern"] for n, r in lin.items() if "down_proj" in n} == {"4:8"}
    assert {r["pattern"] for n, r in lin.items() if "down_proj" not in n} == {"2:4"}
    assert all(r["pattern_ok"] for r in lin.values())
    assert res.report["forwards_per_block"] == 2
    record = json.loads((tmp_path / "o" / "squeeze.json").read_text())
    assert [p["pass"] for p in record["passes"]] == ["wanda", "magnitude"]
    assert record["calibration"]["digest"] and record["calibration"]["tokens"] == 16 * 32


def test_cli_compress_info_eval(tiny_dir, tiny_calib, tmp_path, capsys):
    out = tmp_path / "o"
    main(["compress", str(tiny_dir("llama")), "--out", str(out), "--method", "wanda", "--pattern", "2:4",
          "--calib", str(tiny_calib), "--nsamples", "8", "--seqlen", "32", "--json", str(tmp_path / "c.json")])
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["summary"]["pattern_ok"] and rep["peak_rss_mb"] > 0
    capsys.readouterr()
    main(["info", str(out), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert all(r["promise_ok"] and r["fits_2_4"] for r in info["linears"].values())
    assert info["squeeze"]["passes"][0]["pass"] == "wanda"
    assert info["zero_fraction_linears"] == 0.5
    import transformers

    import safetensors

    made = {"squeeze_version": squeeze.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "threads": torch.get_num_threads()}
    assert info["squeeze"]["made_with"] == made  # what produced the export, read from its squeeze.json
    assert all(json.loads((out / "squeeze.json").read_text())[k] == v for k, v in made.items())
    main(["info", str(out)])
    assert f"made with: squeeze {squeeze.__version__}, torch {torch.__version__}" in capsys.readouterr().out
    main(["eval", str(out), "--data", str(tiny_calib), "--reference", str(tiny_dir("llama")), "--json",
          str(tmp_path / "e.json")])
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["kl"] > 0 and ev["ppl"] > 1 and ev["rows"] == 16
    same = squeeze.evaluate(tiny_dir("llama"), str(tiny_calib), reference=tiny_dir("llama"))
    assert abs(same["kl"]) < 1e-9


def test_info_on_plain_checkpoint_and_broken_promise(tiny_dir, tiny_calib, tmp_path):
    plain = squeeze.info(tiny_dir("llama"))
    assert plain["squeeze"] is None and not any(r["fits_2_4"] for r in plain["linears"].values())
    out = tmp_path / "o"
    squeeze.compress(tiny_dir("llama"), out, method="magnitude", pattern="2:4", format="dense")  # plain tensors to edit
    from safetensors.torch import load_file, save_file

    t = load_file(out / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] += 1.0  # break the pattern behind squeeze's back
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    info = squeeze.info(out)
    bad = [n for n, r in info["linears"].items() if not r["promise_ok"]]
    assert bad == ["model.layers.1.mlp.up_proj"]


def test_load_returns_ready_model(tiny_dir, tmp_path):
    squeeze.compress(tiny_dir("gpt2"), tmp_path / "o", method="magnitude", sparsity=0.5)
    m = squeeze.load(tmp_path / "o")
    assert not m.training and m.squeeze_record["passes"][0]["pass"] == "magnitude"
    w = m.transformer.h[0].mlp.c_fc.weight  # Conv1D stores [in, out]: rows of W are columns here
    assert ((w == 0).sum(0) == w.shape[0] // 2).all()
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[5, 6, 7]])).logits).all()


def test_strict_and_partial_groups(tmp_path, tiny_calib):
    """A linear whose input dim is not a multiple of M keeps its trailing group dense (reported);
    --strict makes that an error."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=100, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    res = squeeze.compress(tmp_path / "m", tmp_path / "o", method="wanda", pattern="8:16", calib=str(tiny_calib),
                           nsamples=4, seqlen=32)
    down = res.report["linears"]["model.layers.0.mlp.down_proj"]
    assert down["dense_tail_columns"] == 100 % 16 and down["pattern_ok"]
    import pytest

    from squeeze.errors import SqueezeError

    with pytest.raises(SqueezeError, match="not a multiple of 16"):
        squeeze.compress(tmp_path / "m", tmp_path / "o2", method="wanda", pattern="8:16", calib=str(tiny_calib),
                         nsamples=4, seqlen=32, strict=True)
    assert not (tmp_path / "o2").exists()


def test_cli_whole_model_pass_keeps_blocks(tiny_dir, tiny_calib, tmp_path):
    """The CLI streams blocks when nothing needs the model afterwards; a pass that trains the whole
    model in finish() (dReLU recovery) must still get it."""
    out = tmp_path / "o"
    main(["compress", str(tiny_dir("llama")), "--out", str(out), "--method", "drelu", "--recover-steps", "2",
          "--calib", str(tiny_calib), "--nsamples", "8", "--seqlen", "32"])
    record = json.loads((out / "squeeze.json").read_text())
    assert record["passes"][0]["pass"] == "drelu"
