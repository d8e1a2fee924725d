"""Compressed 2:4 storage end to end: compress a tiny Llama with --format compressed, reload with
squeeze.load, identical logits to the dense-format export, file <= 0.6x the dense export (fp16)."""

import json

import pytest
import torch
from squeeze.cli.main import main

import squeeze


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compressed_roundtrip(arch, tiny_dir, tiny_calib, tmp_path):
    src = tiny_dir(arch)
    kw = dict(method="wanda", pattern="2:4", calib=str(tiny_calib), nsamples=8, seqlen=32, dtype="float16")
    squeeze.compress(src, tmp_path / "dense", **kw)
    squeeze.compress(src, tmp_path / "comp", format="compressed", **kw)
    rec = json.loads((tmp_path / "comp" / "squeeze.json").read_text())
    assert rec["format"]["kind"] == "compressed-2:4" and len(rec["format"]["linears"]) > 0
    dense, comp = squeeze.load(tmp_path / "dense"), squeeze.load(tmp_path / "comp")
    runtime = squeeze.load(tmp_path / "comp", sparse24=True)
    from squeeze.runtime.sparse24 import Sparse24Linear

    assert sum(isinstance(m, Sparse24Linear) for m in runtime.modules()) == len(rec["format"]["linears"])
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = dense(ids).logits, comp(ids).logits, runtime(ids).logits
    assert a.dtype == b.dtype == torch.float16
    assert torch.equal(a, b) and torch.equal(a, c)
    d_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    c_bytes = (tmp_path / "comp" / "model.safetensors").stat().st_size
    lin_frac = sum(p.numel() for n, p in dense.named_parameters() if n.endswith("weight") and p.ndim == 2
                   and (".layers." in n or ".h." in n)) / sum(p.numel() for p in dense.parameters())
    # 2:4 linears shrink to 0.5625x; embeddings/head stay dense
    assert c_bytes < d_bytes * (1 - lin_frac * (1 - 0.5625)) + 64 * 1024


def test_compressed_file_ratio_realistic_llama(tmp_path, tiny_calib):
    """A Llama where the blocks dominate (as in real models): the compressed export is <= 0.6x."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(tmp_path / "m")
    for fmt in ("dense", "compressed"):
        main(["compress", str(tmp_path / "m"), "--out", str(tmp_path / fmt), "--method", "magnitude", "--pattern",
              "2:4", "--format", fmt])
    d = (tmp_path / "dense" / "model.safetensors").stat().st_size
    c = (tmp_path / "compressed" / "model.safetensors").stat().st_size
    assert c <= 0.6 * d, (c, d)
    with torch.no_grad():
        ids = torch.randint(3, 128, (1, 12))
        assert torch.equal(squeeze.load(tmp_path / "dense")(ids).logits, squeeze.load(tmp_path / "compressed")(ids).logits)
    assert squeeze.info(tmp_path / "compressed")["linears"]  # info reads the compressed layout too


@pytest.mark.parametrize("quant", [None, "int8", "int4-asym-g24", "fp8-g16"])
@pytest.mark.parametrize("sparsity", ["none", "2:4", "unstructured"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_codec_decodes_exactly(quant, sparsity, dtype):
    """pack_linear -> unpack_linear gives back the exported weight bit for bit, for every
    combination of sparsity layout and quantization (odd widths, partial groups, fp8 bytes)."""
    from squeeze.algorithms.quant import QuantSpec, rtn
    from squeeze.formats import pack_linear, unpack_linear
    from squeeze.sparsity import nm_mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 48, generator=g)
    if sparsity == "2:4":
        w = w * nm_mask(w.abs(), 2, 4)
    elif sparsity == "unstructured":
        w = w * (torch.rand(6, 48, generator=g) > 0.7)
    q = None
    if quant:
        bits, *rest = quant.split("-")
        spec = QuantSpec.parse(bits, symmetric="asym" not in rest,
                               group_size=int(rest[-1][1:]) if rest and rest[-1].startswith("g") else None)
        w, _, scale, zero = rtn(w, spec, keep=(w != 0) if sparsity != "none" else None)
        q = (spec, scale, zero)
    w = w.to(dtype)
    entry = pack_linear(w, "x", quant=q)
    if quant is None and sparsity == "none":
        assert entry is None  # nothing to gain: stored dense
        return
    stored = entry.pop("tensors")
    assert sum(t.numel() * t.element_size() for t in stored.values()) < w.numel() * w.element_size()
    got = unpack_linear(json.loads(json.dumps(entry)), stored.__getitem__)  # the entry survives squeeze.json
    assert got.dtype == dtype and torch.equal(got, w)
    if sparsity != "none":
        assert torch.equal(got != 0, w != 0)  # the zeros are the mask, nothing refilled
