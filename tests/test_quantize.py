"""The quantize pass end to end: quality on the real stories260k against the issue's targets,
pruning + quantization keeping the pattern exact, the compressed export's size and its weight-only
kernels, and the errors a user can make. (Exact reloads on every tiny arch: the conformance grid;
the layout and the OBS math: test_quant.py; the kernels alone: tests/kernels/.)"""

from __future__ import annotations

import json

import pytest
import torch

import squeeze
from squeeze.errors import SqueezeError
from squeeze.sparsity import satisfies_nm
from tests.conftest import STORIES, STORIES_CALIB, STORIES_EVAL

CAL = {"calib": str(STORIES_CALIB), "nsamples": 64, "seqlen": 256}


@pytest.fixture(scope="module")
def kl_of(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")

    def run(name, **kw):
        res = squeeze.compress(STORIES, root / name, **CAL, **kw)
        ev = squeeze.evaluate(res.out, data=str(STORIES_EVAL), reference=STORIES, max_rows=64)
        return ev["kl"], res

    return run


@pytest.mark.shared
@pytest.mark.slow
def test_quality_targets_on_stories(kl_of):
    int8, _ = kl_of("int8", quantize="int8")
    assert int8 <= 0.001, int8  # the target for int8 alone (llm-compressor GPTQ W8A16: 0.00031)
    obs4, _ = kl_of("int4-obs", quantize="int4", group_size=32)
    rtn4, _ = kl_of("int4-rtn", quantize="int4", group_size=32, quant_solver="rtn")
    assert obs4 < rtn4, (obs4, rtn4)  # error compensation pays
    sparse, _ = kl_of("24", method="sparsegpt", pattern="2:4")
    both, res = kl_of("24-int8", method="sparsegpt", pattern="2:4", quantize="int8")
    assert both <= 1.10 * sparse, (both, sparse)  # int8 on top of 2:4 costs < 10% of the 2:4 model's KL
    lins = res.report["linears"]
    assert lins and all(rec["pattern_ok"] for rec in lins.values())  # GPTQ never refilled a pruned entry


def _bf16_export(tiny_dir, tiny_calib, tmp_path, **kw):
    return squeeze.compress(tiny_dir("llama"), tmp_path / "q", calib=str(tiny_calib), nsamples=4, seqlen=32,
                            dtype="bfloat16", format="compressed", **kw).out


@pytest.mark.parametrize("kw", [{"quantize": "int8"}, {"quantize": "int4", "group_size": 32},
                                {"quantize": "int4", "group_size": 64, "asymmetric": True}])
def test_cpu_kernels_run_the_codes(kw, tiny_dir, tiny_calib, tmp_path):
    """bf16 on CPU: the quantized linears run torch's int8/int4 ops on the stored codes, within the
    bf16 tolerance of the exact dequantized weight (the kernels round scales to bf16 and sum in
    another order); quant_kernels=False keeps the exact dense path."""
    out = _bf16_export(tiny_dir, tiny_calib, tmp_path, **kw)
    fast, exact = squeeze.load(out, quant_kernels=True), squeeze.load(out, quant_kernels=False)
    swapped = {n: m for n, m in fast.named_modules() if type(m).__name__ == "QuantLinear"}
    assert swapped and not any(type(m).__name__ == "QuantLinear" for m in exact.modules())
    eps = torch.finfo(torch.bfloat16).eps
    for name, q in swapped.items():
        w = exact.get_submodule(name).weight.float()
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        want = x.float() @ w.T
        bound = 4 * eps * (x.float().abs() @ w.abs().T) + 1e-6  # output rounding + bf16 scales + reordering
        assert ((q(x).float() - want).abs() <= bound).all(), name


def test_codes_inside_a_sparse_layout_stay_decoded(tiny_dir, tiny_calib, tmp_path):
    """bf16 50% unstructured + int8 is stored as bitmask + codes: no whole-weight codes for a kernel,
    so loading decodes them exactly (it used to look for a whole-weight codes tensor and fail)."""
    out = _bf16_export(tiny_dir, tiny_calib, tmp_path, method="wanda", sparsity=0.5, quantize="int8")
    assert squeeze.info(out)["format"] == "compressed-bitmask+int8"
    fast, exact = squeeze.load(out, quant_kernels=True), squeeze.load(out, quant_kernels=False)
    assert not any(type(m).__name__ == "QuantLinear" for m in fast.modules())
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).logits, exact(input_ids=ids).logits)


def test_small_weights_keep_the_exact_path(tiny_dir, tiny_calib, tmp_path):
    out = squeeze.compress(tiny_dir("llama"), tmp_path / "q", calib=str(tiny_calib), nsamples=4, seqlen=32,
                           quantize="int8", format="compressed").out
    # 64 x 128 weights: a kernel call costs more than their bytes save (kernels.quant_cpu.MIN_KERNEL_WEIGHTS)
    for dtype in ("float32", "bfloat16"):
        assert not any(type(m).__name__ == "QuantLinear" for m in squeeze.load(out, dtype=dtype).modules())


@pytest.mark.parametrize("native", [True, False])
def test_fp32_int8_runs_our_kernel_from_512x512_weights(native, tiny_calib, tmp_path, monkeypatch):
    """fp32 activations: torch's int8 op runs a scalar loop there (slower than dense), ours does
    not, so with it built the linears of 512 x 512 weights and more (q, o: 512 x 512; the MLP's
    512 x 1024) run the codes and the smaller k / v (128 x 512) stay decoded; without it none is
    swapped. The swapped ones agree with the exact dequantized weight within fp32 sums of K terms."""
    import transformers

    from squeeze.kernels import cpu_native

    if native and cpu_native.library() is None:
        pytest.skip(f"our native kernels are unavailable here: {cpu_native.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    out = squeeze.compress(tmp_path / "src", tmp_path / "q", calib=str(tiny_calib), nsamples=2, seqlen=16,
                           quantize="int8", quant_solver="rtn", format="compressed").out
    fast, exact = squeeze.load(out), squeeze.load(out, quant_kernels=False)
    swapped = {n.rsplit(".", 1)[-1]: m for n, m in fast.model.layers[0].named_modules() if type(m).__name__ == "QuantLinear"}
    if not native:
        assert not swapped
        return
    assert sorted(swapped) == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj"]
    for name, q in swapped.items():
        w = getattr(exact.model.layers[0].self_attn if name[0] in "qo" else exact.model.layers[0].mlp, name).weight
        x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(1))
        want = x.double() @ w.double().T
        bound = (w.shape[1] + 4) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
        assert ((q(x).double() - want).abs() <= bound).all(), name


def test_user_errors(tiny_dir, tiny_calib, tmp_path):
    kw = {"calib": str(tiny_calib), "nsamples": 4, "seqlen": 32}
    src = tiny_dir("llama")
    with pytest.raises(SqueezeError, match="add --quantize"):
        squeeze.compress(src, tmp_path / "a", method="wanda", pattern="2:4", group_size=32, **kw)
    with pytest.raises(SqueezeError, match="add --quantize"):
        squeeze.compress(src, tmp_path / "a", method="wanda", pattern="2:4", quant_observer="mse", **kw)
    with pytest.raises(SqueezeError, match="bad quantization group size"):
        squeeze.compress(src, tmp_path / "a", quantize="int4", group_size=0, **kw)
    with pytest.raises(SqueezeError, match="unknown quantization"):
        squeeze.compress(src, tmp_path / "a", quantize="int3", **kw)
    with pytest.raises(SqueezeError, match="fp8 .* has no zero point"):
        squeeze.compress(src, tmp_path / "a", quantize="fp8", asymmetric=True, **kw)
    with pytest.raises(SqueezeError, match="promises neither"):
        squeeze.compress(src, tmp_path / "a", method="teal", act_sparsity=0.5, format="compressed", **kw)
    for fmt in ("compressed", "dense"):  # already quantized, whether packed or not
        done = squeeze.compress(src, tmp_path / fmt, quantize="int8", format=fmt, **kw).out
        with pytest.raises(SqueezeError, match="already quantized"):
            squeeze.compress(done, tmp_path / "a", quantize="int4", **kw)
    teal = squeeze.compress(src, tmp_path / "t", method="teal", act_sparsity=0.5, **kw).out
    with pytest.raises(SqueezeError, match="run-time state .teal."):  # its thresholds would be dropped
        squeeze.compress(teal, tmp_path / "a", quantize="int8", **kw)
    assert not (tmp_path / "a").exists()  # nothing half-written


@pytest.mark.parametrize("settings, actorder, observer", [
    ({"bits": "int4"}, "static", "mse"),
    ({"bits": "int4", "solver": "rtn"}, None, "mse"),
    ({"bits": "int8"}, "static", "mse"),
    ({"bits": "int8", "solver": "rtn"}, None, "minmax"),
    ({"bits": "fp8"}, "static", "mse"),
    ({"bits": "fp8", "solver": "rtn"}, None, "minmax"),
    ({"bits": "int4", "symmetric": False}, "static", "minmax"),
    ({"bits": "int4", "actorder": "none", "observer": "minmax"}, "none", "minmax"),
])
def test_the_pass_resolves_and_records_its_defaults(settings, actorder, observer):
    from squeeze.passes.base import get_pass

    desc = get_pass("quantize")(**settings).describe()  # what squeeze.json records
    assert desc.get("actorder") == actorder and desc["observer"] == observer


def test_the_order_and_observer_flags_reach_the_pass(tiny_dir, tiny_calib, tmp_path):
    from squeeze.cli.main import main as cli

    out = tmp_path / "q"
    args = ["compress", str(tiny_dir("llama")), "--out", str(out), "--calib", str(tiny_calib), "--nsamples", "4",
            "--seqlen", "32", "--quantize", "int4", "--quant-actorder", "none", "--quant-observer", "minmax",
            "--no-verify"]
    cli(args)  # returns on success (errors exit with code 2)
    record = json.loads((out / "squeeze.json").read_text())
    q = next(p for p in record["passes"] if p["pass"] == "quantize")
    assert (q["actorder"], q["observer"]) == ("none", "minmax")


@pytest.mark.parametrize("settings, match", [
    ({"actorder": "weight"}, "unknown actorder 'weight': use static"),
    ({"solver": "rtn", "actorder": "static"}, "actorder is the order of the OBS sweep; solver rtn has none"),
    ({"observer": "percentile"}, "unknown observer 'percentile': use minmax or mse"),
])
def test_the_pass_refuses_bad_quantize_settings(settings, match):
    from squeeze.passes.base import get_pass

    with pytest.raises(SqueezeError, match=match):
        get_pass("quantize")(**settings)


def test_the_compressed_export_is_smaller(tiny_dir, tiny_calib, tmp_path):
    kw = {"calib": str(tiny_calib), "nsamples": 4, "seqlen": 32}
    sizes = {}
    for name, extra in {"dense": {}, "24": {"method": "wanda", "pattern": "2:4", "format": "compressed"},
                        "int4": {"quantize": "int4", "group_size": 32, "format": "compressed"},
                        "24int4": {"method": "wanda", "pattern": "2:4", "quantize": "int4", "group_size": 32,
                                   "format": "compressed"}}.items():
        if name == "dense":
            res = squeeze.compress(tiny_dir("llama"), tmp_path / name, method="wanda", pattern="2:4", format="dense",
                                   **kw)
        else:
            res = squeeze.compress(tiny_dir("llama"), tmp_path / name, **extra, **kw)
        sizes[name] = res.report["size_bytes"]["export"]
        if name == "24int4":
            w = squeeze.load(res.out).model.layers[0].mlp.up_proj.weight
            assert satisfies_nm(w, 2, 4)
    assert sizes["24int4"] < sizes["int4"] < sizes["24"] < sizes["dense"], sizes


def test_cli_group_size_channel_or_number(tiny_dir, tiny_calib, tmp_path):
    from click.testing import CliRunner

    from squeeze.cli.main import cli

    base = ["compress", str(tiny_dir("llama")), "--calib", str(tiny_calib), "--nsamples", "4", "--seqlen", "16",
            "--quantize", "int4", "--quant-solver", "rtn"]
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "c"), "--group-size", "channel",
                                        "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text())["passes"][-1]["quant"] == "int4"  # one scale per row
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "g"), "--group-size", "16"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "squeeze.json").read_text())["passes"][-1]["quant"] == "int4-g16"
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "x"), "--group-size", "rows"])
    assert r.exit_code == 2 and "neither a whole number" in r.output and not (tmp_path / "x").exists()
