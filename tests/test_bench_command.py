"""`squeeze bench`: each case in its own process, every figure in the JSON, ratios that are the raw
medians' ratios, bytes on disk that are the files' sizes, a reference that scores perfectly
against itself; its one-line refusals; the batched decode it measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze.benchmark import METRICS
from squeeze.cli.main import cli, main
from squeeze.errors import SqueezeError
from squeeze.runtime.speculative import generate, generate_batch


def _files_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_bench_sets_an_export_beside_its_reference(tiny_pruned, tiny_calib, tmp_path):
    src, out = tiny_pruned
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    r = CliRunner().invoke(cli, ["bench", str(out), "--reference", str(src), "--rounds", "1", "--new-tokens", "4",
                                 "--prompt-len", "8", "--threads", "1", "--eval-data", str(tiny_calib),
                                 "--eval-rows", "4", "--json", str(js), "--png", str(png)])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["kind"] == "causal" and rep["settings"]["new_tokens"] == 4 and rep["settings"]["batch"] == 8
    assert str(tiny_calib) in rep["settings"]["prompts"]
    ref, model = rep["cases"]
    assert (ref["role"], model["role"]) == ("reference", "model")
    assert (ref["method"], model["method"]) == ("dense", "wanda 2:4")
    for case, folder in ((ref, src), (model, out)):
        assert case["path"] == str(Path(folder).resolve()) and case["threads"] == 1
        assert len(case["rounds"]) == 1 and set(case["rounds"][0]) == set(METRICS["causal"])
        for m in METRICS["causal"]:
            v = case["rounds"][0][m]
            assert v > 0 and case["median"][m] == case["min"][m] == case["max"][m] == v  # one round
            assert case["ratio"][m] == pytest.approx(v / ref["median"][m], rel=1e-12)
        assert case["bytes_on_disk"] == _files_bytes(Path(folder))
        assert case["ratio"]["bytes_on_disk"] == pytest.approx(case["bytes_on_disk"] / ref["bytes_on_disk"])
        assert case["speedup"] == pytest.approx(case["ratio"]["decode_tps_b1"])
        q = case["quality"]
        assert q["measured"] and q["rows"] == 4 and q["ppl"] > 1 and "ppl_reference" in q
        assert case["decode_mode"] == "plain"
    assert ref["quality"]["kl"] == 0.0 and ref["quality"]["ppl"] == ref["quality"]["ppl_reference"]
    assert ref["greedy_match"] == 1.0 and all(v == 1.0 for v in ref["ratio"].values())
    assert model["quality"]["kl"] > 0 and 0 <= model["greedy_match"] <= 1
    assert model["quality"]["ppl_reference"] == pytest.approx(ref["quality"]["ppl"])
    assert model["ratio"]["bytes_on_disk"] < 0.8  # 2:4 packed: values + 2-bit positions
    # the per-process peak RSS is each process's own: every case loads torch, transformers and a model
    assert all(c["median"]["peak_rss_mb"] > 50 for c in rep["cases"])
    assert "squeeze bench" in r.output and "w24" in r.output and "wanda 2:4" in r.output


def test_bench_python_api_alternates_rounds(tiny_pruned, monkeypatch):
    """Rounds alternate reference, model, reference, model (checked on the order the processes ran),
    and medians / spreads are over the rounds."""
    from squeeze import benchmark

    src, out = tiny_pruned
    order, fake = [], iter(range(100))

    def run(spec, name, stem, threads):
        order.append(name)
        k = next(fake)
        return {"decode_tps_b1": 100.0 + k, "decode_tps_b8": 800.0 + k, "prefill_ms": 2.0 + k, "peak_rss_mb": 300.0,
                "load_s": 0.1, "threads": 1, "dtype": "torch.float32", "decode_mode": "plain",
                "new_ids": [k % 2, 1, 2, 3]}

    monkeypatch.setattr(benchmark, "_run", run)
    rep = squeeze.bench_models([out], src, rounds=3, new_tokens=4, prompt_len=8, eval_data="none")
    assert order == [Path(src).resolve().name, "w24"] * 3
    ref, model = rep["cases"]
    assert [r["decode_tps_b1"] for r in model["rounds"]] == [101.0, 103.0, 105.0]
    assert (model["median"]["decode_tps_b1"], model["min"]["decode_tps_b1"], model["max"]["decode_tps_b1"]) == \
        (103.0, 101.0, 105.0)
    assert model["ratio"]["decode_tps_b1"] == pytest.approx(103.0 / 102.0)
    assert model["ratio"]["prefill_ms"] == pytest.approx(5.0 / 4.0)
    assert model["greedy_match"] == 0.75  # its first round's tokens [1, 1, 2, 3] vs the reference's [0, 1, 2, 3]
    assert rep["settings"]["prompts"].startswith("8 x 8 random token ids")  # --eval-data none: no data for prompts
    assert ref["quality"] == model["quality"] == {"measured": False, "reason": "not measured (--eval-data none)"}


def _run_main(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", ["missing", "other-arch", "encoder-decode", "context", "no-matplotlib", "rounds"])
def test_bench_bad_input_is_one_line(case, tiny_pruned, tiny_dir, tmp_path, capsys, monkeypatch):
    import sys

    src, out = tiny_pruned
    js = tmp_path / "b.json"
    args = {"missing": [str(tmp_path / "nope"), "--reference", str(src)],
            "other-arch": [str(out), "--reference", str(tiny_dir("gpt2"))],
            "encoder-decode": [str(tiny_dir("bert")), "--reference", str(tiny_dir("bert")), "--new-tokens", "8"],
            "context": [str(out), "--reference", str(src), "--prompt-len", "120", "--new-tokens", "16"],
            "no-matplotlib": [str(out), "--reference", str(src), "--png", str(tmp_path / "b.png")],
            "rounds": [str(out), "--reference", str(src), "--rounds", "0"]}[case]
    needle = {"missing": "does not exist", "other-arch": "is a gpt2 model", "encoder-decode": "is an encoder",
              "context": "exceed", "no-matplotlib": "pip install 'squeeze[bench]'", "rounds": "--rounds must be"}[case]
    if case == "no-matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, err = _run_main(["bench", *args, "--json", str(js)], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err
    assert not js.exists()


def test_generate_batch_rows_are_generate_outputs(tiny_dir):
    """The batched decode bench measures gives, row by row, the tokens of `squeeze generate`."""
    model = squeeze.load(tiny_dir("llama"))
    prompts = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    out, st = generate_batch(model, prompts, 5)
    assert out.shape == (3, 11) and torch.equal(out[:, :6], prompts)
    for row in range(3):
        assert torch.equal(out[row], generate(model, prompts[row].tolist(), 5)[0])
    assert st["batch"] == 3 and st["tokens_per_s"] == pytest.approx(3 * 4 / st["decode_seconds"])
    _, single = generate(model, prompts[0].tolist(), 5, return_stats=True)
    assert 0 < single["prefill_seconds"] < single["seconds"]
    with pytest.raises(SqueezeError, match="batch, length"):
        generate_batch(model, prompts[0], 5)
