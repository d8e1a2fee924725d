"""Every user mistake: a one-line reason on stderr, exit code 2, nothing written."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from squeeze.cli.main import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.fixture
def bad_models(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    made = {}

    def copy(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = copy("noconfig")
    (d / "config.json").unlink()
    made["noconfig"] = d
    d = copy("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    made["truncated"] = d
    d = copy("corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    made["corrupt"] = d
    d = copy("unsupported")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "frobnicator", ["FrobnicatorForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    made["unsupported"] = d
    d = copy("nonfinite")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.down_proj.weight"].fill_(float("nan"))
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    made["nonfinite"] = d
    return made


def test_error_cases(tiny_dir, tiny_calib, bad_models, tmp_path, capsys):
    src = str(tiny_dir("llama"))
    cal = str(tiny_calib)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("Some words here.\n\nMore words there.\n")
    out = tmp_path / "out"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    base = ["compress", src, "--out", str(out), "--calib", cal, "--nsamples", "4", "--seqlen", "16"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- {pass: wanda, sparsity: 0.5}\n")
    cases = {
        "does not exist": ["compress", str(tmp_path / "nope"), "--out", str(out), "--method", "magnitude",
                           "--pattern", "2:4"],
        "no config.json": ["compress", str(bad_models["noconfig"]), "--out", str(out), "--method", "magnitude",
                           "--pattern", "2:4"],
        "truncated": ["compress", str(bad_models["truncated"]), "--out", str(out), "--method", "magnitude",
                      "--pattern", "2:4"],
        "corrupted": ["compress", str(bad_models["corrupt"]), "--out", str(out), "--method", "magnitude",
                      "--pattern", "2:4"],
        "unsupported architecture": ["compress", str(bad_models["unsupported"]), "--out", str(out), "--method",
                                     "magnitude", "--pattern", "2:4"],
        "bad pattern '3:2'": base + ["--method", "wanda", "--pattern", "3:2"],
        "bad pattern '2:0'": base + ["--method", "wanda", "--pattern", "2:0"],
        "bad pattern 'a:b'": base + ["--method", "wanda", "--pattern", "a:b"],
        "strictly between 0 and 1": base + ["--method", "wanda", "--sparsity", "1.5"],
        "is empty": ["compress", src, "--out", str(out), "--calib", str(empty), "--method", "wanda",
                     "--pattern", "2:4"],
        "holds 3 tokens": ["compress", src, "--out", str(out), "--calib", str(short), "--method", "wanda",
                           "--pattern", "2:4", "--nsamples", "1", "--seqlen", "16"],
        "no tokenizer": ["compress", src, "--out", str(out), "--calib", str(text), "--method", "wanda",
                         "--pattern", "2:4"],
        "unknown method 'frob'": base + ["--method", "frob", "--pattern", "2:4"],
        "already exists": ["compress", src, "--out", str(existing), "--calib", cal, "--nsamples", "4", "--seqlen",
                           "16", "--method", "wanda", "--pattern", "2:4"],
        "non-finite": ["compress", str(bad_models["nonfinite"]), "--out", str(out), "--calib", cal, "--nsamples", "4",
                       "--seqlen", "16", "--method", "wanda", "--pattern", "2:4"],
        "holds 512 tokens": base[:-4] + ["--nsamples", "64", "--seqlen", "32", "--method", "wanda", "--pattern",
                                         "2:4"],
        "exceeds the model's context": base[:-2] + ["--seqlen", "4096", "--method", "wanda", "--pattern", "2:4"],
        "give exactly one of pattern": base + ["--method", "wanda"],
        "unknown setting": base + ["--method", "wanda", "--pattern", "2:4", "--set", "colour=blue"],
        "disagree: give it once": base + ["--method", "drelu", "--recover-steps", "2", "--set", "recover_steps=3"],
        "--recipe was given together with sparsity_profile": base + ["--recipe", str(recipe), "--sparsity-profile",
                                                                     "owl"],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for needle, args in cases.items():
        code, err = run_cli(args, capsys)
        assert code == 2, (needle, err)
        assert needle in err, (needle, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert not out.exists(), needle
        assert sorted(p.name for p in tmp_path.iterdir()) == before, f"{needle}: left files behind"
    assert (existing / "keep.txt").read_text() == "mine"


def test_overwrite_replaces(tiny_dir, tiny_calib, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    main(["compress", str(tiny_dir("llama")), "--out", str(out), "--method", "magnitude", "--pattern", "2:4",
          "--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "squeeze.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_input_checkpoint_untouched(tiny_dir, tiny_calib, tmp_path):
    src = tiny_dir("gpt2")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    main(["compress", str(src), "--out", str(tmp_path / "o"), "--calib", str(tiny_calib), "--nsamples", "8",
          "--seqlen", "32", "--method", "wanda", "--pattern", "2:4"])
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.slow  # a subprocess pays the full import
def test_entry_point_exit_code(tmp_path):
    """The installed console script: a user mistake gives exit 2 and one line, no traceback."""
    exe = shutil.which("squeeze") or str(__import__("pathlib").Path(sys.executable).parent / "squeeze")
    r = subprocess.run([exe, "compress", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--method",
                        "wanda", "--pattern", "2:4"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
