"""Resumable compress (squeeze.resume): a run killed mid-sweep and re-run with --resume writes the
very bytes an uninterrupted run writes; a resume with other settings is refused; success leaves
no work folder behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import squeeze
from squeeze.errors import SqueezeError
from squeeze.resume import work_dir
from tests.tiny import ARCHS, COMMON, build, token_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 12


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def assert_same_files(a: Path, b: Path) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files differ: {differ}"


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """A tiny Llama with many blocks, wide enough that one block of SparseGPT takes a visible
    fraction of a second: the kill lands inside the sweep without any hook in the code."""
    ARCHS.setdefault("llama-deep", ("LlamaConfig", "LlamaForCausalLM",
                                    dict(COMMON, num_hidden_layers=BLOCKS, hidden_size=128, intermediate_size=512)))
    folder = tmp_path_factory.mktemp("deep")
    return build("llama-deep", folder / "model"), write_jsonl(token_rows(32, 64), folder / "ids.jsonl")


def _cli(src, out, calib, *extra) -> list[str]:
    return [sys.executable, "-m", "squeeze.cli.main", "compress", str(src), "--out", str(out), "--method", "sparsegpt",
            "--pattern", "2:4", "--calib", str(calib), "--nsamples", "32", "--seqlen", "64", "--eval-data", "none",
            *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SQUEEZE_PROGRESS": "off"}


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _kill_mid_sweep(cmd, work: Path, sig=signal.SIGKILL) -> int:
    """Start ``cmd`` and send it ``sig`` once its work folder records 2+ finished blocks (and
    several remain); returns the last finished block the state said before the signal."""
    # SIGINT as a terminal's Ctrl-C: a child inherits SIG_IGN from a shell's background job (which
    # Python then leaves ignored), so the run would finish instead
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _kill_mid_sweep.proc = proc  # the caller reads its exit status and stderr
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = json.loads((work / "state.json").read_text())["done"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                done = -1
            if done >= 1:
                os.kill(proc.pid, sig)
                proc.wait(timeout=120)
                assert done < BLOCKS - 2, "the sweep ran too far before the kill to prove anything"
                return done
            time.sleep(0.01)
        raise AssertionError(f"the run ended (rc {proc.poll()}) before 2 blocks were recorded: {proc.stderr.read()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(deep_llama, tmp_path):
    src, calib = deep_llama
    ref = tmp_path / "ref"
    r = _run(_cli(src, ref, calib))
    assert r.returncode == 0, r.stderr
    assert not work_dir(ref).exists()  # success removes the work folder

    out = tmp_path / "out"
    killed_after = _kill_mid_sweep(_cli(src, out, calib), work_dir(out))
    assert not out.exists() and work_dir(out).is_dir()

    other = _run(_cli(src, out, calib, "--resume", "--seed", "1"))  # another run's settings: refused
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0 and "drop --resume" in other.stderr, other.stderr
    again = _run(_cli(src, out, calib))  # the same run without --resume: told how to continue
    assert again.returncode == 2 and "re-run with --resume" in again.stderr, again.stderr
    assert work_dir(out).is_dir() and not out.exists()  # neither touched the saved progress

    resumed = _run(_cli(src, out, calib, "--resume", "--json", str(tmp_path / "r.json")))
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resumed_from_block"] >= killed_after + 1 >= 2  # it continued rather than started over
    assert not work_dir(out).exists()
    assert_same_files(ref, out)


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(deep_llama, tmp_path):
    src, calib = deep_llama
    out = tmp_path / "out"
    _kill_mid_sweep(_cli(src, out, calib), work_dir(out), signal.SIGINT)
    proc = _kill_mid_sweep.proc
    assert proc.returncode == 130
    last = proc.stderr.read().strip().splitlines()[-1]
    assert "re-run with --resume" in last and str(work_dir(out)) in last, last
    assert (work_dir(out) / "state.json").is_file() and not out.exists()


# In-process interrupts (KeyboardInterrupt from the per-block hook, as Ctrl-C would) for the passes
# that carry state across blocks: OWL's plan, TEAL/WINA's sampling generator, DSnoT's report, the
# quantizer after a mask.
CARRIED = {
    "owl": [{"pass": "wanda", "sparsity": 0.5, "sparsity_profile": "owl"}],
    "teal-topk": [{"pass": "teal", "act_sparsity": 0.4, "mode": "topk", "sample_tokens": 16}],
    "wina-greedy": [{"pass": "wina", "act_sparsity": 0.4, "allocation": "greedy", "mode": "topk", "sample_tokens": 16}],
    "wanda+dsnot+int4": [{"pass": "wanda", "pattern": "2:4"}, {"pass": "dsnot"},
                         {"pass": "quantize", "bits": "int4", "group_size": 32}],
}


class _Stop:
    def __init__(self, at: int):
        self.at = at

    def __call__(self, i, n, seconds):
        if i == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("case", list(CARRIED))
def test_interrupted_then_resumed_matches(case, tiny_calib, tmp_path):
    ARCHS.setdefault("llama4", ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, num_hidden_layers=4)))
    src = build("llama4", tmp_path / "src")
    kw = dict(recipe=CARRIED[case], calib=str(tiny_calib), nsamples=4, seqlen=32)
    ref = squeeze.compress(src, tmp_path / "ref", **kw).out
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as stopped:
        squeeze.compress(src, out, on_block=_Stop(1), **kw)
    assert stopped.value.resumable == work_dir(out)  # what the CLI names in its "re-run with --resume"
    res = squeeze.compress(src, out, resume=True, **kw)
    assert res.report["resumed_from_block"] == 1
    assert res.model is None  # the blocks before were never loaded into this process
    assert_same_files(ref, out)


def test_resume_without_work_folder_starts_over_and_cleans_up(tiny_dir, tiny_calib, tmp_path):
    out = tmp_path / "out"
    res = squeeze.compress(tiny_dir("llama"), out, method="wanda", pattern="2:4", calib=str(tiny_calib),
                           nsamples=4, seqlen=32, resume=True)
    assert "resumed_from_block" not in res.report and not work_dir(out).exists()


def test_a_stale_folder_of_another_run_is_replaced(tiny_dir, tiny_calib, tmp_path):
    src, out = tiny_dir("llama"), tmp_path / "out"
    kw = dict(calib=str(tiny_calib), nsamples=4, seqlen=32)
    with pytest.raises(KeyboardInterrupt):
        squeeze.compress(src, out, method="wanda", pattern="2:4", on_block=_Stop(1), **kw)
    with pytest.raises(SqueezeError, match="drop --resume"):
        squeeze.compress(src, out, method="magnitude", pattern="2:4", resume=True, **kw)
    squeeze.compress(src, out, method="magnitude", pattern="2:4", **kw)  # no --resume: the old work goes
    assert out.is_dir() and not work_dir(out).exists()


def test_work_files_read_back_exactly(tmp_path):
    """The work folder's own safetensors writer (streamed, no in-memory copy of the file) round-trips
    every dtype a spill holds, bit for bit, metadata included."""
    import torch
    from safetensors import safe_open

    from squeeze.resume import save_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"h": torch.randn(3, 5, generator=g), "bf": torch.randn(4, generator=g).bfloat16(),
               "codes": torch.randint(-8, 8, (2, 7), dtype=torch.int8, generator=g), "mask": torch.rand(9) > 0.5,
               "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "t": torch.randn(4, 3, generator=g).t()}
    save_tensors(tensors, tmp_path / "x.safetensors", {"packed": "{}"})
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"packed": "{}"} and sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
