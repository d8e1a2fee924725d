"""The sequential runner: block-by-block propagation reproduces the model's own forward (per-layer
masks and rotary embeddings included), it does exactly two forwards per block, and streaming the
blocks from disk (keep_in_memory=False) gives the same export as keeping them."""

import pytest
import torch
from safetensors.torch import load_file
from squeeze.calib import Calibration
from squeeze.calib.runner import BlockRunner

import squeeze
from squeeze.adapters import Adapter
from squeeze.checkpoint import Checkpoint
from squeeze.modeling import WeightMap, build_skeleton, load_config
from squeeze.passes.base import BlockPass


class BlockOutputs(BlockPass):
    """Records each block's output on its calibration inputs (ctx.replay)."""

    name = "test-block-outputs"

    def prepare(self, sweep):
        self.outs = {}

    def targets(self, block):
        return [next(iter(block.linears.values()))]

    def observed(self, block):
        return []

    def decide(self, ctx):
        return [ctx.replay(batch=k).clone() for k in range(len(ctx.batches))]

    def apply(self, ctx, outputs):
        self.outs[ctx.index] = outputs


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "bert", "opt"])
def test_runner_matches_full_forward(arch, tiny_dir):
    src = tiny_dir(arch)
    ckpt = Checkpoint(src)
    model = build_skeleton(load_config(ckpt), attn_implementation="eager")
    adapter, weights = Adapter(model), WeightMap(model, ckpt)
    samples = [torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    p = BlockOutputs()
    BlockRunner(model, adapter, weights, [p], Calibration(samples, "t", "rows", 40, 0)).run()
    with torch.no_grad():
        hs = model(input_ids=torch.stack(samples), output_hidden_states=True).hidden_states
    for i in range(len(adapter) - 1):  # the last hidden state may include the final norm
        torch.testing.assert_close(torch.cat(p.outs[i]), hs[i + 1], rtol=1e-4, atol=1e-5)


def test_two_forwards_per_block(tiny_dir, tiny_calib, tmp_path):
    res = squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="wanda", pattern="2:4",
                           calib=str(tiny_calib), nsamples=16, seqlen=32)
    assert res.report["forwards_per_block"] == 2


def test_streaming_equals_in_memory(tiny_dir, tiny_calib, tmp_path):
    kw = dict(method="wanda", sparsity=0.5, calib=str(tiny_calib), nsamples=16, seqlen=32)
    a = squeeze.compress(tiny_dir("qwen2"), tmp_path / "a", keep_in_memory=True, **kw)
    b = squeeze.compress(tiny_dir("qwen2"), tmp_path / "b", keep_in_memory=False, **kw)
    assert b.model is None and a.model is not None
    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_sharded_checkpoint_export_keeps_sharding(tiny_dir, tiny_calib, tmp_path):
    from tests.tiny import build

    src = tmp_path / "sharded"
    build("llama", src)
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(src)
    m.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    res = squeeze.compress(src, tmp_path / "o", method="wanda", pattern="2:4", calib=str(tiny_calib),
                           nsamples=16, seqlen=32)
    shards = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors") if p.name != "squeeze.safetensors")
    assert shards == sorted(Checkpoint(src).shards) and len(shards) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, res.model(ids).logits)


def test_export_dtype(tiny_dir, tiny_calib, tmp_path):
    res = squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="magnitude", pattern="2:4",
                           dtype="bfloat16")
    t = load_file(tmp_path / "o" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in t.values() if v.is_floating_point())
    import json

    from squeeze.autoload import unmark

    cfg = unmark(json.loads((tmp_path / "o" / "config.json").read_text()))  # packed by default: marked
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert squeeze.load(tmp_path / "o").dtype == torch.bfloat16
    assert res.report["summary"]["pattern_ok"]
