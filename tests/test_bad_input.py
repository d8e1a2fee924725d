"""Bad input, more of it (issue 15 item 6): each case is one line on stderr naming what was wrong and
what to do, exit code 2, and nothing written where the output would go."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from squeeze.cli.main import main


def run_cli(args, capsys):
    capsys.readouterr()  # not what building the fixtures printed
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err.strip()


def assert_refused(args, needle, capsys, out=None, folder=None):
    """Exit 2, one `error: ...` line holding ``needle``, nothing at ``out``, nothing new in ``folder``."""
    before = sorted(p.name for p in folder.iterdir()) if folder else None
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err
    if out is not None:
        assert not Path(out).exists()
    if folder is not None:
        assert sorted(p.name for p in folder.iterdir()) == before, "left files behind"
    return err


def copy_of(src, dest):
    shutil.copytree(src, dest)
    return dest


def test_eval_reference_of_another_architecture(tiny_dir, tiny_calib, tmp_path, capsys):
    # same vocabulary (128), other family: the logits have one width, but the token ids mean different things
    err = assert_refused(["eval", tiny_dir("llama"), "--data", tiny_calib, "--reference", tiny_dir("gpt2"),
                          "--json", tmp_path / "r.json"], "is a gpt2 model", capsys, out=tmp_path / "r.json")
    assert "the reference must be the checkpoint the model was made from" in err


def test_eval_reference_with_another_vocabulary(tiny_dir, tiny_calib, tmp_path, capsys):
    other = copy_of(tiny_dir("llama"), tmp_path / "wide")
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 256  # the config is read before any weight: a mismatch never gets to the forward
    (other / "config.json").write_text(json.dumps(cfg))
    assert_refused(["eval", tiny_dir("llama"), "--data", tiny_calib, "--reference", other],
                   "(vocabulary 256)", capsys)


@pytest.mark.parametrize("command", [
    ["compress", "meta-llama/Llama-3.2-1B", "--out", "o", "--method", "wanda", "--pattern", "2:4"],
    ["info", "meta-llama/Llama-3.2-1B"],
    ["eval", "meta-llama/Llama-3.2-1B"],
    ["drop-layers", "meta-llama/Llama-3.2-1B", "--remove", "1", "--by", "even", "--out", "o"],
    ["finetune", "meta-llama/Llama-3.2-1B", "--recipe", "layerskip", "--out", "o"],
    ["recover", "org/pruned-model", "--reference", "meta-llama/Llama-3.2-1B", "--out", "o"],
])
def test_hub_id_as_model_folder(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no folder of that name can exist here
    err = assert_refused(command, "huggingface-cli download", capsys, out=tmp_path / "o", folder=tmp_path)
    assert "--local-dir DIR" in err and "does not exist" in err


def test_a_missing_relative_folder_is_not_called_a_hub_id(tmp_path, capsys):
    err = assert_refused(["info", tmp_path / "nope" / "model"], "does not exist", capsys)
    assert "hub" not in err


def test_format_compressed_refused_upfront_when_no_linear_holds_a_group(tiny_dir, tmp_path, capsys):
    # the tiny llama's linears are at most 128 wide: a 2:256 pattern prunes nothing anywhere
    out = tmp_path / "o"
    assert_refused(["compress", tiny_dir("llama"), "--out", out, "--method", "magnitude", "--pattern", "2:256",
                    "--format", "compressed", "--eval-data", "none"], "no targeted linear fits pattern 2:256",
                   capsys, out=out, folder=tmp_path)


def test_format_compressed_refused_before_commit_when_nothing_packed(tiny_dir, tmp_path, capsys, monkeypatch):
    # 2:128 on linears 64 wide along the input leaves every weight dense (the input groups never fill),
    # though up/gate are 128 long along the output: only the assembled export can tell
    out = tmp_path / "o"
    from squeeze import compressor

    calls = []
    real = compressor.write_checkpoint
    monkeypatch.setattr(compressor, "write_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_refused(["compress", tiny_dir("llama"), "--out", out, "--method", "magnitude", "--pattern", "2:128",
                    "--ignore", "down_proj", "--format", "compressed", "--eval-data", "none"],
                   "no linear came out sparse or quantized enough", capsys, out=out, folder=tmp_path)
    assert calls, "the refusal should come from the assembled export, not the upfront check"


def test_finetune_interrupted_says_how_to_resume(tiny_dir, tiny_calib, tmp_path, capsys, monkeypatch):
    from squeeze.depth.layerskip import state_dir
    from squeeze.train import loop

    out = tmp_path / "o"
    args = ["finetune", tiny_dir("llama"), "--recipe", "layerskip", "--calib", tiny_calib, "--steps", "4",
            "--batch-size", "2", "--seqlen", "16", "--nsamples", "8", "--save-every", "2", "--out", out]
    real = loop.save_state

    def save_then_ctrl_c(*a, **k):  # Ctrl-C right after the first state is on disk
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_ctrl_c)
    code, err = run_cli(args, capsys)
    assert code == 130 and "re-run the same command with --resume" in err and str(state_dir(out)) in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
    monkeypatch.setattr(loop, "save_state", real)
    main([str(a) for a in args] + ["--resume"])  # what the line says works
    assert (out / "squeeze.json").is_file() and not state_dir(out).exists()


def test_finetune_interrupted_before_any_state(tiny_dir, tiny_calib, tmp_path, capsys, monkeypatch):
    from squeeze.train import loop

    out = tmp_path / "o"

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", ctrl_c)  # the first step, before any save
    code, err = run_cli(["finetune", tiny_dir("llama"), "--recipe", "layerskip", "--calib", tiny_calib, "--steps",
                         "4", "--batch-size", "2", "--seqlen", "16", "--nsamples", "8", "--out", out], capsys)
    assert code == 130 and "before the first saved state" in err and "--resume" not in err, err
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB tmpfs (we are root in CI and here); skipped, with the reason, where mounting is not allowed."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or r.returncode}): disk-full test skipped")
    yield d
    busy = subprocess.run(["umount", str(d)], capture_output=True, text=True)
    if busy.returncode:  # something still maps a (deleted) file there: detach it anyway, then say so
        subprocess.run(["umount", "-l", str(d)])
        pytest.fail(f"the failed export left files open or mapped on the full disk: {busy.stderr.strip()}")


def test_disk_full_during_export_leaves_nothing(tiny_dir, tiny_calib, small_disk, capsys):
    src = tiny_dir("llama")  # ~360 KB of fp32 weights: the spill plus the dense export need about twice that
    assert sum(f.stat().st_size for f in src.iterdir()) > 300 * 1024
    out = small_disk / "o"
    err = assert_refused(["compress", src, "--out", out, "--method", "magnitude", "--pattern", "2:4", "--format",
                          "dense", "--eval-data", "none"], "no space left on device writing", capsys, out=out,
                         folder=small_disk)
    assert "choose another --out" in err
    assert list(small_disk.iterdir()) == []  # no staging folder, no spill


@pytest.fixture
def sharded(tiny_dir, tmp_path):
    """The tiny llama split in two shards with an index."""
    d = copy_of(tiny_dir("llama"), tmp_path / "sharded")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, d / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in zip(names, halves) for k in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d, weight_map, names


def test_index_names_a_missing_shard(sharded, tmp_path, capsys):
    d, _, names = sharded
    (d / names[1]).unlink()
    out = tmp_path / "o"
    assert_refused(["compress", d, "--out", out, "--method", "magnitude", "--pattern", "2:4"],
                   f"shard {names[1]} named in model.safetensors.index.json is missing", capsys, out=out)


def test_index_puts_a_tensor_in_the_wrong_shard(sharded, tmp_path, capsys):
    d, weight_map, names = sharded
    key = next(k for k, s in weight_map.items() if s == names[0])
    weight_map[key] = names[1]
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "o"
    assert_refused(["compress", d, "--out", out, "--method", "magnitude", "--pattern", "2:4"],
                   f"index says {key} is in {names[1]} but it is not", capsys, out=out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_tensor(tiny_dir, tiny_calib, tmp_path, capsys, value):
    d = copy_of(tiny_dir("llama"), tmp_path / "bad")
    tensors = load_file(d / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight"  # one entry, in the second block: found as it is read
    tensors[key][0, 3] = value
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    err = assert_refused(["compress", d, "--out", out, "--calib", tiny_calib, "--nsamples", "4", "--seqlen", "16",
                          "--method", "wanda", "--pattern", "2:4"], f"tensor {key} holds non-finite values",
                         capsys, out=out, folder=tmp_path)
    assert "1 of " in err


def test_finite_check_reads_in_bounded_chunks(monkeypatch):
    from squeeze import modeling
    from squeeze.errors import SqueezeError

    monkeypatch.setattr(modeling, "FINITE_CHUNK", 7)
    t = torch.zeros(5, 9)
    modeling.check_finite(t, "w", "here")
    t[4, 8] = float("-inf")  # the very last entry, in the last (partial) chunk
    with pytest.raises(SqueezeError, match="tensor w holds non-finite values \\(1 of 45"):
        modeling.check_finite(t, "w", "here")
    modeling.check_finite(torch.full((45,), 3e38), "huge", "here")  # the sum overflows; every entry is finite
    fp8 = torch.zeros(5, 9).to(torch.float8_e4m3fn)  # no isfinite kernel of its own
    modeling.check_finite(fp8, "w8", "here")
    fp8[2, 2] = float("nan")
    with pytest.raises(SqueezeError, match="tensor w8 holds non-finite values \\(1 of 45"):
        modeling.check_finite(fp8, "w8", "here")


def test_layerskip_with_a_pattern_points_to_finetune(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert_refused(["compress", tiny_dir("llama"), "--out", out, "--method", "layerskip", "--pattern", "2:4"],
                   "squeeze finetune", capsys, out=out)
