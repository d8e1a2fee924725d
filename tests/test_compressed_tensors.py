"""``--format compressed-tensors``: the layout by hand and against compressed-tensors' own
compressor, round trips through plain transformers + compressed-tensors in a process that never
imports squeeze (tiny Llama, GPT-2, BERT; stories260k with ``shared``), ``squeeze convert``, the
decoder without compressed-tensors, and the refusals.

Tolerance: none is needed. The export sets ``dequantize: true``, so transformers decodes the codes
while loading from the checkpoint's fp32 scales, (q - zp) · s in fp32 and then the model dtype,
which is what squeeze computes: the weights must be bit-identical, and so must the logits of the
same model class on the same ids with the same thread count. (Without ``dequantize``, transformers
casts the scales to the model dtype first: see test_bf16_without_dequantize_stays_within_its_bound.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import squeeze
from squeeze.algorithms.quant import QuantSpec, dequantize, rtn
from squeeze.errors import SqueezeError
from squeeze.formats_ct import CompressedTensorsView, linear_tensors, pack_int32, squeeze_codes, unpack_int32
from squeeze.sparsity import satisfies_nm
from tests.conftest import STORIES, STORIES_CALIB

FMT = "compressed-tensors"
IDS = [[5, 17, 42, 99, 3, 64, 7, 120, 33, 8, 91, 12, 57, 4, 110, 26]]

# name -> (arch, compress settings); rtn needs no calibration, wanda/obs calibrate on tiny_calib
TINY = {
    "int8": ("llama", {"quantize": "int8"}),
    "int4-g32": ("llama", {"quantize": "int4", "group_size": 32}),
    "int4-asym-g32": ("llama", {"quantize": "int4", "group_size": 32, "asymmetric": True, "quant_solver": "rtn"}),
    "int8-asym-bf16": ("llama", {"quantize": "int8", "asymmetric": True, "dtype": "bfloat16"}),
    "int4-g16-bf16": ("llama", {"quantize": "int4", "group_size": 16, "dtype": "bfloat16", "quant_solver": "rtn"}),
    "fp8": ("llama", {"quantize": "fp8", "quant_solver": "rtn"}),
    "2:4+int4-g32": ("llama", {"method": "wanda", "pattern": "2:4", "quantize": "int4", "group_size": 32}),
    "50%+int8": ("llama", {"method": "wanda", "sparsity": 0.5, "quantize": "int8"}),
    "2:4": ("llama", {"method": "wanda", "pattern": "2:4"}),
    "gpt2-2:4": ("gpt2", {"method": "wanda", "pattern": "2:4"}),
    "bert-int8": ("bert", {"quantize": "int8", "quant_solver": "rtn"}),
}

# one process, no squeeze: load each export with the auto class (and, when given, transformers'
# `dequantize` loading attribute), dump weights, outputs, dtype
PLAIN = """
import json, sys, torch, transformers
torch.set_num_threads({threads})
cases, dump = json.loads(sys.argv[1]), sys.argv[2]
got = {{}}
for name, (path, auto, dequantize) in cases.items():
    kw = {{}} if dequantize is None else {{"quantization_config": transformers.CompressedTensorsConfig(dequantize=dequantize)}}
    model = getattr(transformers, auto).from_pretrained(path, **kw)
    with torch.no_grad():
        out = model(input_ids=torch.tensor({ids}))
    got[name] = {{"state": model.state_dict(), "out": out.logits if auto != "AutoModel" else out.last_hidden_state,
                 "dtype": str(model.dtype)}}
got["squeeze imported"] = "squeeze" in sys.modules
torch.save(got, dump)
"""


def plain_load(cases: dict, dump: Path, dequantize: bool | None = None) -> dict:
    """{name: (folder, auto class)} loaded by transformers + compressed-tensors in a fresh process
    (the same thread count as here: the same GEMM blocking)."""
    code = PLAIN.format(threads=torch.get_num_threads(), ids=IDS)
    cases = {k: [str(p), a, dequantize] for k, (p, a) in cases.items()}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases), str(dump)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(dump)
    assert got.pop("squeeze imported") is False
    return got


def squeeze_side(path) -> tuple[dict, torch.Tensor, torch.nn.Module]:
    model = squeeze.load(path)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS))
    return model.state_dict(), out.logits if hasattr(out, "logits") else out.last_hidden_state, model


def assert_identical(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module")
def tiny_exports(tiny_dir, tiny_calib, tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    root = tmp_path_factory.mktemp("ct")
    return {name: squeeze.compress(tiny_dir(arch), root / name.replace(":", "").replace("%", ""),
                                   calib=str(tiny_calib), nsamples=4, seqlen=32, format=FMT, **kw)
            for name, (arch, kw) in TINY.items()}


@pytest.fixture(scope="module")
def tiny_plain(tiny_exports, tmp_path_factory):
    auto = {"bert": "AutoModel"}
    cases = {n: (r.out, auto.get(TINY[n][0], "AutoModelForCausalLM")) for n, r in tiny_exports.items()}
    return plain_load(cases, tmp_path_factory.mktemp("plain") / "dump.pt")


# -- the layout --------------------------------------------------------------------------------


def test_pack_int32_by_hand():
    u4 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15]])  # 9 nibbles: one full word, one with 1 and 7 pad zeros
    words = pack_int32(u4, 4)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() == 0x87654321 - 2**32  # element j in bits 4j.., low first (a negative int32)
    assert words[0, 1].item() == 15
    assert torch.equal(unpack_int32(words, 4, 9), u4.to(torch.uint8))
    u8 = torch.tensor([[0x80, 1, 0xFF, 0x7F, 9]])
    words = pack_int32(u8, 8)
    assert words.tolist() == [[0x7FFF0180, 9]]
    assert torch.equal(unpack_int32(words, 8, 5), u8.to(torch.uint8))


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, symmetric=False, group_size=16), QuantSpec(4, group_size=8),
                                  QuantSpec(4, symmetric=False), QuantSpec(8, format="fp8", group_size=16)],
                         ids=lambda s: s.name)
def test_linear_tensors_round_trip(spec):
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    _, codes, scale, zero = rtn(w, spec)
    t = linear_tensors(codes, spec, scale, zero)
    if spec.format == "fp8":
        assert set(t) == {"weight", "weight_scale"} and t["weight"].dtype == torch.float8_e4m3fn
    else:
        assert t["weight_packed"].shape == (12, 32 * spec.bits // 32) and t["weight_shape"].tolist() == [12, 32]
        assert ("weight_zero_point" in t) == (not spec.symmetric)
        if not spec.symmetric:  # packed along the output dimension: 12 rows of 4 bits -> 2 words
            assert t["weight_zero_point"].shape == (-(-12 * spec.bits // 32), spec.groups(32))
    assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].shape == (12, spec.groups(32))
    back, s2, z2 = squeeze_codes(t, spec)
    assert torch.equal(back.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(s2, scale)
    assert (z2 is None and zero is None) or torch.equal(z2, zero)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 16), (4, False, 16), (8, True, None), (8, False, None)])
def test_same_bytes_as_compressed_tensors_compressor(bits, symmetric, group):
    """Our writer and compressed-tensors' own compressor store the same codes the same way, and its
    decompressor gives squeeze's dequantized weight exactly (fp32)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = QuantSpec(bits, symmetric=symmetric, group_size=group)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    w_hat, codes, scale, zero = rtn(w, spec)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group" if group else "channel",
                            group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    state = {"weight": w_hat, "weight_scale": scale}
    if not symmetric:  # compressed-tensors keeps signed zero points: zp = z - 2^(b-1)
        state["weight_zero_point"] = (zero.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    theirs = compressor.compress(state, scheme)
    ours = linear_tensors(codes, spec, scale, zero)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(compressor.decompress(ours, scheme)["weight"], dequantize(codes, spec, scale, zero))


def test_group_size_must_divide_the_input_dimension():
    spec = QuantSpec(4, group_size=24)
    _, codes, scale, zero = rtn(torch.randn(4, 64), spec)
    with pytest.raises(SqueezeError, match="64 is not a multiple of 24"):
        linear_tensors(codes, spec, scale, zero)


# -- through plain transformers ------------------------------------------------------------------


@pytest.mark.slow  # one subprocess pays the full import
@pytest.mark.parametrize("name", list(TINY))
def test_plain_transformers_loads_what_squeeze_load_gives(name, tiny_exports, tiny_plain):
    res, theirs = tiny_exports[name], tiny_plain[name]
    assert res.report["loads_with"] == "transformers + compressed-tensors"
    ours, out, model = squeeze_side(res.out)
    assert theirs["dtype"] == str(model.dtype)
    assert_identical(ours, theirs["state"])
    assert torch.equal(out, theirs["out"])
    # and both are the model compress computed (kept in fp32; the export holds it in its dtype)
    assert_identical(ours, {k: v.to(model.dtype) if v.is_floating_point() else v
                            for k, v in res.model.state_dict().items()})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["2:4+int4-g32", "2:4", "gpt2-2:4"])
def test_the_2_4_pattern_is_exact_in_what_transformers_loads(name, tiny_exports, tiny_plain):
    state, lins = tiny_plain[name]["state"], tiny_exports[name].report["linears"]
    assert lins
    for lin, rec in lins.items():
        w = state[f"{lin}.weight"]
        w = w.t() if name.startswith("gpt2") else w  # Conv1D stores [in, out]
        assert rec["pattern"] == "2:4" and satisfies_nm(w, 2, 4), lin


def test_export_records_what_was_done(tiny_exports):
    res = tiny_exports["2:4+int4-g32"]
    config = json.loads((res.out / "config.json").read_text())
    q = config["quantization_config"]
    assert config["model_type"] == "llama"  # not marked for squeeze
    assert q["quant_method"] == FMT and q["format"] == "pack-quantized" and q["dequantize"] is True
    assert q["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": 32, "dynamic": False}
    assert q["ignore"] == ["lm_head"]
    assert q["sparsity_config"]["format"] == "dense" and q["sparsity_config"]["sparsity_structure"] == "2:4"
    assert len(q["sparsity_config"]["targets"]) == 2 * 2 * 7  # 7 linears x 2 layers, with and without "model."
    record = json.loads((res.out / "squeeze.json").read_text())
    assert [p["pass"] for p in record["passes"]] == ["wanda", "quantize"]
    assert record["format"]["kind"] == FMT and "linears" not in record["format"]
    assert len(record["format"]["quantized_linears"]) == 14
    assert not list(res.out.parent.glob(".*tmp-squeeze*"))  # the staging folder is gone
    assert res.report["format"]["kind"] == "compressed-tensors (pack-quantized, int4-g32, 2:4)"
    from safetensors import safe_open

    with safe_open(str(res.out / "model.safetensors"), "pt") as f:  # only codes: a loader that did not decode
        keys = set(f.keys())                                          # them would have no weight to load
    assert "model.layers.0.mlp.down_proj.weight" not in keys and "model.layers.0.mlp.down_proj.weight_packed" in keys
    info = squeeze.info(res.out)  # squeeze info reads it too, and re-measures every promise from the decoded weights
    assert info["format"] == FMT and all(rec["promise_ok"] for rec in info["linears"].values())
    # compressed-tensors itself accepts the config
    ct = pytest.importorskip("compressed_tensors.quantization")
    assert ct.QuantizationConfig.model_validate(q).config_groups["group_0"].weights.group_size == 32


def test_in_process_transformers_with_compressed_tensors(tiny_exports):
    """The same load in this process (squeeze imported: it must not get in the way)."""
    import transformers

    for name in ("int4-asym-g32", "int8-asym-bf16"):
        path = tiny_exports[name].out
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == "LlamaForCausalLM"
        ours, out, dense = squeeze_side(path)
        assert_identical(ours, model.state_dict())
        with torch.no_grad():
            assert torch.equal(out, model(input_ids=torch.tensor(IDS)).logits)
        assert getattr(dense.config, "quantization_config", None) is None  # squeeze.load's model saves as dense


@pytest.mark.slow
def test_bf16_without_dequantize_stays_within_its_bound(tiny_exports, tmp_path):
    """transformers' other route (``dequantize=False`` passed to from_pretrained: codes kept until
    the first forward) casts the fp32 scales to bf16 and multiplies in bf16: w' = rnd(q · rnd(s))
    against squeeze's w = rnd(q · s) (q · rnd(s) is exact in fp32: 8 + 8 significant bits). bf16
    keeps 8 significant bits, so each rnd moves a value by at most 2^-8 of it: |w' - w| <= 3 · 2^-8
    |q s| (1 + 2^-8), and |q s| <= |w| / (1 - 2^-8), so |w' - w| < 2^-6 |w| (zeros stay exact)."""
    path = tiny_exports["int4-g16-bf16"].out
    got = plain_load({"raw": (path, "AutoModelForCausalLM")}, tmp_path / "dump.pt", dequantize=False)["raw"]
    ours, _, _ = squeeze_side(path)
    differ = 0
    for key, w in ours.items():
        theirs = got["state"][key]
        assert theirs.dtype == torch.bfloat16
        bound = 2.0 ** -6 * w.float().abs()
        assert bool(((theirs.float() - w.float()).abs() <= bound).all()), key
        differ += int((theirs != w).sum())
    assert differ > 0  # the route really rounds differently (else this test would check nothing)


# -- other architectures and the real tiny Llama ------------------------------------------------


@pytest.mark.shared
@pytest.mark.slow
def test_stories260k_round_trips(tmp_path):
    pytest.importorskip("compressed_tensors")
    cal = {"calib": str(STORIES_CALIB), "nsamples": 32, "seqlen": 128, "format": FMT}
    # stories260k's MLP is 172 wide: int4 groups of 4 (or one per row) divide every input dimension
    cases = {"int8": {"quantize": "int8"},
             "int4-ch": {"recipe": [{"pass": "quantize", "bits": "int4", "group_size": "channel"}]},
             "int4-asym-g4": {"quantize": "int4", "group_size": 4, "asymmetric": True},
             "fp8": {"quantize": "fp8"},
             "2:4+int4-g4": {"method": "sparsegpt", "pattern": "2:4", "quantize": "int4", "group_size": 4}}
    outs = {n: squeeze.compress(STORIES, tmp_path / n.replace(":", ""), **cal, **kw) for n, kw in cases.items()}
    got = plain_load({n: (r.out, "AutoModelForCausalLM") for n, r in outs.items()}, tmp_path / "dump.pt")
    for name, res in outs.items():
        ours, out, _ = squeeze_side(res.out)
        assert_identical(ours, got[name]["state"])
        assert torch.equal(out, got[name]["out"]), name
        assert_identical(ours, res.model.state_dict())  # fp32 throughout: the model compress computed
        assert res.report["size_bytes"]["export"] < res.report["size_bytes"]["source"], name


def test_minilm_int4_loads_through_automodel(minilm_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    res = squeeze.compress(minilm_dir, tmp_path / "m", quantize="int4", group_size=32, quant_solver="rtn", format=FMT)
    got = transformers.AutoModel.from_pretrained(res.out)
    ours, _, _ = squeeze_side(res.out)
    assert_identical(ours, got.state_dict())
    assert (res.out / "tokenizer.json").is_file() or (res.out / "vocab.txt").is_file()  # tokenizer kept


def test_sharded_source_gives_sharded_export(tmp_path):
    """Each linear's tensors stay in the shard its weight came from; the index names them all."""
    pytest.importorskip("compressed_tensors")
    import transformers

    from squeeze.checkpoint import Checkpoint
    from tests.test_depth import tiny_model

    src = tmp_path / "src"
    tiny_model("llama", layers=4).save_pretrained(src, max_shard_size="40KB")
    source = Checkpoint(src)
    out = squeeze.compress(src, tmp_path / "out", quantize="int8", quant_solver="rtn", format=FMT).out
    ckpt = Checkpoint(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(ckpt.keys())
    for key, shard in index["weight_map"].items():
        stem, _, part = key.rpartition(".weight")
        assert shard == source.key_to_shard[f"{stem}.weight" if part.startswith("_") else key], key
    assert index["metadata"]["total_size"] == sum(ckpt.get(k).numel() * ckpt.get(k).element_size() for k in ckpt.keys())
    ours, _, _ = squeeze_side(out)
    assert_identical(ours, transformers.AutoModelForCausalLM.from_pretrained(out).state_dict())


# -- one mechanism: convert a compact export ------------------------------------------------------


def test_convert_writes_what_compress_writes(tiny_dir, tiny_calib, tiny_exports, tmp_path):
    from safetensors.torch import load_file

    from squeeze.cli.main import main

    kw = dict(calib=str(tiny_calib), nsamples=4, seqlen=32, **TINY["2:4+int4-g32"][1])
    compact = squeeze.compress(tiny_dir("llama"), tmp_path / "compact", format="auto", **kw).out
    main(["convert", str(compact), "--out", str(tmp_path / "ct"), "--json", str(tmp_path / "r.json")])
    direct = tiny_exports["2:4+int4-g32"].out
    a, b = load_file(str(tmp_path / "ct" / "model.safetensors")), load_file(str(direct / "model.safetensors"))
    assert_identical(a, b)
    assert json.loads((tmp_path / "ct" / "config.json").read_text()) == json.loads((direct / "config.json").read_text())
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["loads_with"] == "transformers + compressed-tensors"
    # the compact 2:4 + int4 layout (3K/8 bytes a row) is smaller than compressed-tensors' dense codes (K/2)
    assert report["size_bytes"]["export"] == tiny_exports["2:4+int4-g32"].report["size_bytes"]["export"]
    assert report["size_bytes"]["source"] < report["size_bytes"]["export"]


def test_convert_a_dense_sparse_export(tiny_dir, tiny_calib, tmp_path):
    """A sparse-only --format dense export already holds its zeros: convert only adds the metadata."""
    pytest.importorskip("compressed_tensors")
    import transformers

    from squeeze.export_ct import convert

    dense = squeeze.compress(tiny_dir("llama"), tmp_path / "dense", method="magnitude", sparsity=0.5,
                             format="dense").out
    report = convert(dense, tmp_path / "ct")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["config_groups"] == {} and q["sparsity_config"]["sparsity_structure"] == "unstructured"
    assert q["sparsity_config"]["global_sparsity"] == 0.5 and report["format"]["packed_linears"] == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(dense).state_dict()
    assert_identical(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").state_dict(), plain)
    assert_identical(squeeze_side(tmp_path / "ct")[0], plain)


@pytest.mark.slow
def test_squeeze_needs_no_compressed_tensors(tiny_dir, tiny_exports, tmp_path):
    """Writing and squeeze.load both work where compressed-tensors cannot be imported, and give what
    they give where it can."""
    kw = dict(quantize="int4", group_size=32, asymmetric=True, quant_solver="rtn", format=FMT)
    code = f"""
import importlib.abc, sys

class NoCompressedTensors(importlib.abc.MetaPathFinder):  # every attempt to import it fails
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "compressed_tensors":
            raise ModuleNotFoundError("compressed_tensors is blocked in this process")

sys.meta_path.insert(0, NoCompressedTensors())
import torch, squeeze
squeeze.compress({str(tiny_dir("llama"))!r}, {str(tmp_path / "w")!r}, **{kw!r})
torch.save(squeeze.load({str(tiny_exports["int4-asym-g32"].out)!r}).state_dict(), {str(tmp_path / "s.pt")!r})
print("BLOCKED", not any(m.startswith("compressed_tensors") for m in sys.modules))
import transformers
try:  # while transformers needs it for the export: it is what decodes the codes there
    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "w")!r})
    print("LOADED")
except ImportError:
    print("REFUSED")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == ["BLOCKED True", "REFUSED"]
    from safetensors.torch import load_file

    here = tiny_exports["int4-asym-g32"].out  # the same settings, written where compressed-tensors imports
    assert_identical(load_file(str(tmp_path / "w" / "model.safetensors")), load_file(str(here / "model.safetensors")))
    assert_identical(torch.load(tmp_path / "s.pt"), squeeze.load(here).state_dict())


def test_squeeze_load_reads_a_compressed_tensors_checkpoint_it_did_not_write(tiny_dir, tmp_path):
    """A checkpoint compressed-tensors' own ModelCompressor wrote (as llm-compressor saves one)
    decodes to what transformers + compressed-tensors loads."""
    pytest.importorskip("compressed_tensors")
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            spec = QuantSpec(4, symmetric=False, group_size=32)
            _, _, scale, zero = rtn(module.weight.data, spec)
            module.weight_scale.data, module.weight_zero_point.data = scale, (zero.to(torch.int16) - 8).to(torch.int8)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "llmc")
    compressor.update_config(tmp_path / "llmc")
    with warnings.catch_warnings():  # "loading attributes ... will be overwritten": the point here
        warnings.simplefilter("ignore", UserWarning)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "llmc", quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    ours, _, _ = squeeze_side(tmp_path / "llmc")
    assert_identical(ours, theirs.state_dict())


# -- refusals ----------------------------------------------------------------------------------------


def _nothing_written(tmp_path):
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("arch,kw,message", [
    ("llama", {"method": "teal", "act_sparsity": 0.5}, "teal needs squeeze's run-time"),
    ("llama", {"quantize": "int4", "group_size": 24}, "has 64 \\(not a multiple of 24\\)"),
    ("llama", {"quantize": "int4"}, "not a multiple of 128"),  # int4's default group of 128 > K = 64
    ("gpt2", {"quantize": "int8"}, "GPT-2 Conv1D"),
])
def test_refused_before_any_work(arch, kw, message, tiny_dir, tiny_calib, tmp_path):
    with pytest.raises(SqueezeError, match=message):
        squeeze.compress(tiny_dir(arch), tmp_path / "out", calib=str(tiny_calib), nsamples=4, seqlen=32,
                         format=FMT, **kw)
    assert _nothing_written(tmp_path)


def test_recipe_that_promises_nothing_is_refused():
    from squeeze.export_ct import check_recipe

    class Quiet:
        name = "magnitude"

        def promise(self):
            return {}

    with pytest.raises(SqueezeError, match="promises neither"):
        check_recipe([Quiet()], [Quiet()], adapter=None)


def test_convert_refuses_what_it_cannot_write(tiny_dir, tiny_calib, tiny_exports, tmp_path):
    from squeeze.cli.main import main
    from squeeze.export_ct import convert

    dense = squeeze.compress(tiny_dir("llama"), tmp_path / "dense", quantize="int8", quant_solver="rtn",
                             format="dense").out
    with pytest.raises(SqueezeError, match="does not store the scales"):
        convert(dense, tmp_path / "out")
    with pytest.raises(SqueezeError, match="has no squeeze.json"):
        convert(tiny_dir("llama"), tmp_path / "out")
    with pytest.raises(SqueezeError, match="already in the compressed-tensors layout"):
        convert(tiny_exports["int8"].out, tmp_path / "out")
    teal = squeeze.compress(tiny_dir("llama"), tmp_path / "teal", method="teal", act_sparsity=0.5,
                            calib=str(tiny_calib), nsamples=4, seqlen=32).out
    with pytest.raises(SystemExit) as done:  # the CLI: one line, exit code 2
        main(["convert", str(teal), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    assert _nothing_written(tmp_path)
    with pytest.raises(SqueezeError, match="already quantized"):  # read through the decoder, then refused
        squeeze.compress(tiny_exports["int8"].out, tmp_path / "out", quantize="int8")
    with pytest.raises(SqueezeError, match="is quantized"):
        squeeze.recover(tiny_exports["int8"].out, reference=tiny_dir("llama"), out=tmp_path / "out", steps=1)
    assert _nothing_written(tmp_path)


def test_a_compressed_tensors_export_is_a_source_like_any_export(tiny_exports, tmp_path):
    """Prune into compressed-tensors, then quantize that export: the mask stays promised and exact."""
    pytest.importorskip("compressed_tensors")
    import transformers

    res = squeeze.compress(tiny_exports["2:4"].out, tmp_path / "q", quantize="int4", group_size=32,
                           quant_solver="rtn", format=FMT)
    record = json.loads((res.out / "squeeze.json").read_text())
    assert [p["pass"] for p in record["passes"]] == ["wanda", "quantize"]
    assert record["format"]["sparsity_structure"] == "2:4" and len(record["format"]["quantized_linears"]) == 14
    state = transformers.AutoModelForCausalLM.from_pretrained(res.out).state_dict()
    assert_identical(squeeze_side(res.out)[0], state)
    assert all(satisfies_nm(state[f"{lin}.weight"], 2, 4) for lin in record["linears"])


def test_decoder_refuses_what_it_does_not_read(tiny_exports):
    from squeeze.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny_exports["int8"].out)
    q = json.loads((ckpt.path / "config.json").read_text())["quantization_config"]
    w8a8 = json.loads(json.dumps(q))
    w8a8["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token",
                                                             "dynamic": True}
    with pytest.raises(SqueezeError, match="activations are quantized too"):
        CompressedTensorsView(ckpt, w8a8)
    nvfp4 = json.loads(json.dumps(q))
    nvfp4["config_groups"]["group_0"]["weights"].update(type="float", num_bits=4)
    with pytest.raises(SqueezeError, match="not a layout squeeze decodes"):
        CompressedTensorsView(ckpt, nvfp4)
