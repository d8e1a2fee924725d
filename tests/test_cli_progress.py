"""What the commands show while they work, when stderr is not a terminal: log lines per phase."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from squeeze.cli.main import main

LAYERS = 4


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A tiny random Llama with 4 blocks (the sweep's total must be the block count)."""
    import transformers
    from tests.tiny import COMMON

    folder = tmp_path_factory.mktemp("llama4")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(COMMON, num_hidden_layers=LAYERS))
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def _progress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("[squeeze] ")]


def _every_step(monkeypatch):
    # a line for every step (the default waits 2 s, then writes at most one line per 10 s)
    monkeypatch.setenv("SQUEEZE_PROGRESS", "auto")
    monkeypatch.setenv("SQUEEZE_PROGRESS_INTERVAL", "0")


def test_compress_logs_calibration_and_every_block(llama4, tiny_calib, tmp_path, capsys, monkeypatch):
    _every_step(monkeypatch)
    main(["compress", str(llama4), "--out", str(tmp_path / "c"), "--method", "wanda", "--pattern", "2:4",
          "--calib", str(tiny_calib), "--nsamples", "8", "--seqlen", "16"])
    err = capsys.readouterr().err
    lines = _progress_lines(err)
    assert "\x1b" not in err
    sweep = [ln for ln in lines if ln.startswith("[squeeze] compress: ")]
    # the total is known from the first line on, and every block is counted
    assert sweep[0].startswith(f"[squeeze] compress: block 0/{LAYERS} (0%)")
    for i in range(1, LAYERS + 1):
        assert any(ln.startswith(f"[squeeze] compress: block {i}/{LAYERS} ") for ln in sweep), (i, sweep)
    assert re.fullmatch(rf"\[squeeze\] compress: done, block {LAYERS}/{LAYERS} in \d+\.\d s", sweep[-1])
    assert any(ln.startswith("[squeeze] calibration capture: batch ") for ln in lines), lines
    assert any(ln.startswith("[squeeze] calibration data: done in ") for ln in lines), lines
    assert any(ln.startswith("[squeeze] writing export: done, tensor ") for ln in lines), lines
    # the phases come in the order they run
    first = {name: next(i for i, ln in enumerate(lines) if ln.startswith(f"[squeeze] {name}"))
             for name in ("calibration data", "calibration capture", "compress:", "writing export")}
    assert list(first) == sorted(first, key=first.get)


def test_recover_logs_its_steps(llama4, tiny_calib, tmp_path, capsys, monkeypatch):
    import squeeze

    pruned = squeeze.compress(llama4, tmp_path / "p", method="wanda", pattern="2:4", calib=str(tiny_calib),
                              nsamples=8, seqlen=16).out
    _every_step(monkeypatch)
    main(["recover", str(pruned), "--reference", str(llama4), "--out", str(tmp_path / "r"), "--calib",
          str(tiny_calib), "--steps", "3", "--nsamples", "8", "--seqlen", "16", "--batch-size", "4"])
    lines = _progress_lines(capsys.readouterr().err)
    steps = [ln for ln in lines if ln.startswith("[squeeze] recovery: ")]
    for i in range(1, 4):
        assert any(re.match(rf"\[squeeze\] recovery: step {i}/3 \(\d+%\), loss \d", ln) for ln in steps), steps
    assert steps[-1].startswith("[squeeze] recovery: done, step 3/3 in ")


def test_interrupted_recover_stops_the_log_then_says_how_to_resume(llama4, tiny_calib, tmp_path, capsys,
                                                                   monkeypatch):
    import squeeze
    import squeeze.recovery

    pruned = squeeze.compress(llama4, tmp_path / "p", method="magnitude", pattern="2:4").out
    real = squeeze.recovery.recover

    def interrupted(*a, **k):  # Ctrl-C right after step 2 (a checkpoint was written at step 2)
        def stop(step, total, loss):
            if step == 2:
                raise KeyboardInterrupt
        return real(*a, on_step=stop, **k)

    monkeypatch.setattr(squeeze.recovery, "recover", interrupted)
    _every_step(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["recover", str(pruned), "--reference", str(llama4), "--out", str(tmp_path / "r"), "--calib",
              str(tiny_calib), "--steps", "5", "--nsamples", "8", "--seqlen", "16", "--batch-size", "4",
              "--checkpoint-every", "2"])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("[squeeze] recovery: interrupted at step 2/5 after ")
    assert err[-1].startswith("interrupted; --out was not written") and "--resume" in err[-1]


@pytest.mark.slow  # a subprocess pays the full import
def test_entry_point_logs_progress_through_a_pipe(llama4, tiny_calib, tmp_path):
    exe = shutil.which("squeeze") or str(Path(sys.executable).parent / "squeeze")
    env = {**__import__("os").environ, "SQUEEZE_PROGRESS_INTERVAL": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("SQUEEZE_PROGRESS", None)
    r = subprocess.run([exe, "compress", str(llama4), "--out", str(tmp_path / "c"), "--method", "wanda",
                        "--pattern", "2:4", "--calib", str(tiny_calib), "--nsamples", "8", "--seqlen", "16"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = _progress_lines(r.stderr)
    assert "\x1b" not in r.stderr
    assert any(ln.startswith(f"[squeeze] compress: block 1/{LAYERS} ") for ln in lines), lines
    assert any(ln.startswith(f"[squeeze] compress: done, block {LAYERS}/{LAYERS} in ") for ln in lines), lines
    assert any(ln.startswith("[squeeze] calibration capture: ") for ln in lines), lines
