"""`squeeze bench`: each case in its own process, every figure in the JSON, ratios that are the raw
medians' ratios, bytes on disk that are the files' sizes, a reference that scores perfectly
against itself; its one-line refusals; the batched decode it measures; the decode bound (bytes
read per token, counted exactly on tiny models, and the measured read bandwidth)."""

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


@pytest.fixture
def small_bandwidth(monkeypatch):
    """The bandwidth process streams 32 MiB, not GiBs: the tests check the arithmetic, not the figure."""
    from squeeze import roofline

    monkeypatch.setattr(roofline, "bandwidth_bytes", lambda device="cpu": 32 << 20)


def test_bench_sets_an_export_beside_its_reference(tiny_pruned, tiny_calib, tmp_path, small_bandwidth):
    from squeeze.roofline import PARTS, decode_bytes

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
    # the decode bound: one bandwidth measured with the cases' threads, each case's bytes per token
    # exactly what decode_bytes counts on the model squeeze.load gives (KV at 8 + 4 // 2 tokens)
    bw = rep["bandwidth"]
    assert bw["bytes"] == 32 << 20 and bw["threads"] == 1 and bw["bytes_per_s"] > 0
    assert decode_bytes(squeeze.load(src), 10) == ref["bytes_per_token"]
    for case in (ref, model):
        b = case["bytes_per_token"]
        assert b["context"] == 10 and b["total"] == sum(b[k] for k in PARTS) and b["kv_cache"] > 0
        assert case["bound_tps"] == pytest.approx(bw["bytes_per_s"] / b["total"])
        assert case["of_bound"] == pytest.approx(case["median"]["decode_tps_b1"] / case["bound_tps"])
        assert case["bound_speedup"] == pytest.approx(ref["bytes_per_token"]["total"] / b["total"])
    assert ref["bound_speedup"] == 1.0
    assert "bound x" in r.output and "of bound" in r.output and "read bandwidth" in r.output


def test_bench_python_api_alternates_rounds(tiny_pruned, monkeypatch):
    """Rounds alternate reference, model, reference, model (checked on the order the processes ran),
    and medians / spreads are over the rounds."""
    from squeeze import benchmark

    src, out = tiny_pruned
    order, fake = [], iter(range(100))

    def run(spec, name, stem, threads):
        order.append(name)
        if "bandwidth" in spec:
            return {"bytes_per_s": 1e10}
        k = next(fake)
        return {"decode_tps_b1": 100.0 + k, "decode_tps_b8": 800.0 + k, "prefill_ms": 2.0 + k, "peak_rss_mb": 300.0,
                "load_s": 0.1, "threads": 1, "dtype": "torch.float32", "decode_mode": "plain",
                "new_ids": [k % 2, 1, 2, 3], "bytes_per_token": {"total": 4e7 if name == "w24" else 1e8}}

    monkeypatch.setattr(benchmark, "_run", run)
    rep = squeeze.bench_models([out], src, rounds=3, new_tokens=4, prompt_len=8, eval_data="none")
    assert order == ["bandwidth"] + [Path(src).resolve().name, "w24"] * 3  # the bandwidth once, first
    ref, model = rep["cases"]
    assert [r["decode_tps_b1"] for r in model["rounds"]] == [101.0, 103.0, 105.0]
    assert (model["median"]["decode_tps_b1"], model["min"]["decode_tps_b1"], model["max"]["decode_tps_b1"]) == \
        (103.0, 101.0, 105.0)
    assert model["ratio"]["decode_tps_b1"] == pytest.approx(103.0 / 102.0)
    assert model["ratio"]["prefill_ms"] == pytest.approx(5.0 / 4.0)
    assert model["greedy_match"] == 0.75  # its first round's tokens [1, 1, 2, 3] vs the reference's [0, 1, 2, 3]
    assert rep["settings"]["prompts"].startswith("8 x 8 random token ids")  # --eval-data none: no data for prompts
    assert ref["quality"] == model["quality"] == {"measured": False, "reason": "not measured (--eval-data none)"}
    # bound = bandwidth / bytes: 1e10 / 1e8 = 100 tok/s for the reference, 250 for the model
    assert (ref["bound_tps"], model["bound_tps"]) == (100.0, 250.0)
    assert model["bound_speedup"] == 2.5 and ref["bound_speedup"] == 1.0
    assert model["of_bound"] == pytest.approx(103.0 / 250.0) and ref["of_bound"] == pytest.approx(102.0 / 100.0)
    assert rep["bandwidth"] == {"bytes_per_s": 1e10}


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
    capsys.readouterr()  # a fixture built just now (tiny_dir) printed its progress: not the command's
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


# -- the decode bound's byte count ------------------------------------------------------------------
# the tiny Llama (tests/tiny.py): vocab 128, hidden 64, intermediate 128, 2 layers, 4 heads of 16,
# 2 KV heads, untied head. Its linears [out, in] per layer:
TINY_LINEARS = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
TINY_NORMS = 2 * 2 * 64 + 64  # two norms per layer of 64, the final norm


def _linear_params() -> int:
    return 2 * sum(n * k for n, k in TINY_LINEARS.values())


def test_decode_bytes_of_a_dense_llama_are_its_weights_one_embedding_row_and_the_kv_cache(tiny_dir):
    from squeeze.roofline import decode_bytes

    model = squeeze.load(tiny_dir("llama"))  # float32
    b = decode_bytes(model, context=10)
    assert b["embedding"] == 64 * 4  # one row of the [128, 64] table
    assert b["lm_head"] == 128 * 64 * 4  # all of it
    assert b["layers"] == (_linear_params() + TINY_NORMS) * 4
    assert b["kv_cache"] == 2 * 2 * 2 * 16 * 10 * 4  # layers x (k, v) x kv heads x head dim x context x fp32
    assert b["total"] == b["embedding"] + b["lm_head"] + b["layers"] + b["kv_cache"]
    # the same weights as the state dict, less the embedding table but one row
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert b["total"] - b["kv_cache"] == params - 127 * 64 * 4
    assert decode_bytes(model)["kv_cache"] == 0  # no context, no cache
    bf16 = decode_bytes(squeeze.load(tiny_dir("llama"), dtype="bfloat16"), context=10)
    assert all(bf16[k] * 2 == b[k] for k in ("embedding", "lm_head", "layers", "kv_cache"))


@pytest.fixture(scope="module")
def tiny_bf16_exports(tiny_dir, tiny_calib, tmp_path_factory):
    """A bf16 tiny Llama (the dtype the CPU quantized kernels run in) and its int8, int4 and TEAL 50%
    exports."""
    from tests.tiny import build

    base = tmp_path_factory.mktemp("bound")
    src = build("llama", base / "src", dtype=torch.bfloat16)
    outs = {}
    for name, kw in {"int8": dict(quantize="int8", quant_solver="rtn"),
                     "int4": dict(quantize="int4", quant_solver="rtn"),
                     "teal50": dict(method="teal", act_sparsity=0.5)}.items():
        outs[name] = base / name
        squeeze.compress(src, outs[name], calib=str(tiny_calib), nsamples=4, seqlen=32, eval_data="none", **kw)
    return src, outs


def test_decode_bytes_count_quantized_codes_and_kept_activation_rows(tiny_bf16_exports):
    from squeeze.roofline import decode_bytes
    from squeeze.runtime.act_sparse import consumers
    from squeeze.runtime.quant import QuantLinear

    src, outs = tiny_bf16_exports
    dense = decode_bytes(squeeze.load(src, dtype="bfloat16"))
    assert dense["layers"] == (_linear_params() + TINY_NORMS) * 2

    int8 = squeeze.load(outs["int8"], dtype="bfloat16", quant_kernels=True)  # tiny weights: forced
    assert sum(isinstance(m, QuantLinear) for m in int8.modules()) == 14  # the kernels run: codes are what is read
    b8 = decode_bytes(int8)
    # 1 byte per weight (K is already a multiple of 16: no padding) + one bf16 scale per output row
    per_layer = sum(n * k + 2 * n for n, k in TINY_LINEARS.values())
    assert b8["layers"] == 2 * per_layer + TINY_NORMS * 2
    assert (b8["lm_head"], b8["embedding"]) == (dense["lm_head"], dense["embedding"])  # left in bf16
    assert 0.5 < (b8["layers"] - TINY_NORMS * 2) / (dense["layers"] - TINY_NORMS * 2) < 0.52

    b4 = decode_bytes(squeeze.load(outs["int4"], dtype="bfloat16", quant_kernels=True))
    # 0.5 B per weight + bf16 scales and zero terms per group: a little over a quarter
    assert 0.25 < (b4["layers"] - TINY_NORMS * 2) / (dense["layers"] - TINY_NORMS * 2) < 0.31

    teal = squeeze.load(outs["teal50"], dtype="bfloat16")
    assert len(consumers(teal)) == 14
    bt = decode_bytes(teal)
    assert bt["act_sparse_consumers"] == 14
    assert bt["layers"] == _linear_params() * 2 // 2 + TINY_NORMS * 2  # every linear keeps half its input rows
    assert bt["lm_head"] == dense["lm_head"]  # the head's input is not sparsified
    # one site (down_proj's input) of one layer at 90%: its one consumer reads a tenth of its rows
    down = teal.model.layers[0].mlp.down_proj
    down.__dict__["_squeeze_sparsifier"].set(0.9)
    n, k = TINY_LINEARS["down_proj"]
    assert decode_bytes(teal)["layers"] == pytest.approx(bt["layers"] - (0.5 - 0.1) * n * k * 2, abs=1)


def test_read_bandwidth_streams_the_bytes_it_is_given(monkeypatch):
    from squeeze import roofline

    # 4x the last-level cache (at least 1 GiB), but never more than half the memory available
    want = max(roofline.BANDWIDTH_BYTES, 4 * roofline.last_level_cache_bytes())
    monkeypatch.setattr(roofline, "_mem_available", lambda: 64 << 30)
    assert roofline.bandwidth_bytes() == want
    monkeypatch.setattr(roofline, "_mem_available", lambda: 1 << 30)
    assert roofline.bandwidth_bytes() == 512 << 20
    assert roofline.bandwidth_bytes("cuda") == roofline.BANDWIDTH_BYTES
    bw = roofline.read_bandwidth(8 << 20, repeats=2)
    assert bw["bytes"] == 8 << 20 and bw["repeats"] == 2 and bw["threads"] == torch.get_num_threads()
    assert bw["bytes_per_s"] == pytest.approx(bw["bytes"] / bw["best_s"])


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """ru_maxrss survives exec on Linux: a measuring process forked by a large parent would report
    the parent's size. peak_rss_mb reads the child's own high-water mark."""
    import subprocess
    import sys

    from squeeze.report import peak_rss_mb

    ballast = torch.ones(300 << 20, dtype=torch.uint8)  # 300 MiB resident in this process
    code = "from squeeze.report import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak_rss_mb() > 300 and child < peak_rss_mb() - 250, (child, peak_rss_mb())
    del ballast
