"""Streaming a model larger than memory (issue 15 item 3): what the sweep holds is one block and the
calibration activations, not the embeddings or the head; shards are written one tensor at a time;
the printed bound is computed from the shapes; the report says where the time went. The memory
cap itself is proven by bench/cases/streaming.py (a cgroup; bench/README.md, streaming)."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from squeeze.calib import Calibration
from squeeze.calib.runner import BlockRunner, forward_tokens

import squeeze
from squeeze.adapters import Adapter
from squeeze.checkpoint import Checkpoint
from squeeze.modeling import WeightMap, build_skeleton, load_config
from squeeze.passes.base import BlockPass
from squeeze.memory import FORWARD_BYTES, MAX_BATCH_TOKENS, memory_bound
from squeeze.shard_writer import ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16), "a.codes": torch.randint(
        -128, 127, (3, 4), dtype=torch.int8, generator=g), "mask": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "z.f16": torch.randn(2, 2, 2, generator=g).half()}


def test_shard_writer_is_a_safetensors_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "s.safetensors"
    order = ["scalar", "z.f16", "mask", "b.weight", "empty", "a.codes"]  # not the announced order
    with ShardWriter(path, sorted(tensors), {"format": "pt"}) as w:
        for name in order:
            w.add(name, tensors[name])
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0  # the data starts 8-byte aligned
    # the same bytes of tensor data as safetensors' own writer, only the header's padding differs
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    assert path.stat().st_size - n == ref.stat().st_size - struct.unpack("<Q", ref.read_bytes()[:8])[0]


def test_shard_writer_moves_the_data_when_the_header_outgrows_its_room(tmp_path):
    # 8 dims (4 are reserved for) and offsets past 10^6: the header is written first, the data moved
    big = {"t": torch.arange(2**18, dtype=torch.int32).reshape(1, 1, 1, 1, 2, 2, 2, 2**15),
           "u": torch.ones(1, 1, 1, 1, 1, 1, 1, 3)}
    with ShardWriter(tmp_path / "m.safetensors", list(big)) as w:
        w.reserve = 16  # as if the names alone had been reserved for
        w.file.seek(8 + w.reserve)
        for k, t in big.items():
            w.add(k, t)
    back = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(back[k], t) for k, t in big.items())
    assert not list(tmp_path.glob("*.moving"))


def test_shard_writer_refuses_unannounced_and_missing(tmp_path):
    t = torch.ones(2)
    with pytest.raises(ValueError, match="not announced"):
        with ShardWriter(tmp_path / "x.safetensors", ["a"]) as w:
            w.add("b", t)
    with pytest.raises(ValueError, match="not written"):
        with ShardWriter(tmp_path / "y.safetensors", ["a", "b"]) as w:
            w.add("a", t)
    with pytest.raises(ValueError, match="twice"):
        with ShardWriter(tmp_path / "z.safetensors", ["a"]) as w:
            w.add("a", t)
            w.add("a", t)


class OutsideOnMeta(BlockPass):
    """Records, at every block, which parameters outside the blocks are in memory."""

    name = "test-outside-on-meta"

    def prepare(self, sweep):
        self.loaded = []

    def targets(self, block):
        return [next(iter(block.linears.values()))]

    def observed(self, block):
        return []

    def decide(self, ctx):
        return None

    def apply(self, ctx, _):
        model = self.model
        self.loaded.append(sorted(n for n, p in model.named_parameters()
                                  if not n.startswith("model.layers.") and p.device.type != "meta"))


def _runner(tiny_dir, keep):
    ckpt = Checkpoint(tiny_dir("llama"))
    model = build_skeleton(load_config(ckpt))
    adapter, weights = Adapter(model), WeightMap(model, ckpt)
    samples = [torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    p = OutsideOnMeta()
    p.model = model
    return model, BlockRunner(model, adapter, weights, [p], Calibration(samples, "t", "rows", 24, 0), keep=keep), p


def test_streamed_sweep_holds_no_embedding_or_head(tiny_dir):
    model, runner, p = _runner(tiny_dir, keep=False)
    runner.run()
    assert len(p.loaded) == len(runner.adapter) and all(loaded == [] for loaded in p.loaded)
    phases = runner.result.seconds
    assert {"load", "capture", "propagate"} <= phases.keys() and all(v >= 0 for v in phases.values())


def test_kept_sweep_returns_the_whole_model(tiny_dir):
    model, runner, p = _runner(tiny_dir, keep=True)
    runner.run()
    assert all(q.device.type != "meta" for q in model.parameters())
    assert p.loaded[0]  # embeddings and norm stay for the caller


def test_forward_tokens_from_the_widest_linear(tiny_dir):
    ckpt = Checkpoint(tiny_dir("llama"))
    adapter = Adapter(build_skeleton(load_config(ckpt)))
    assert forward_tokens(adapter) == MAX_BATCH_TOKENS  # a tiny model keeps whole 4096-token batches
    wide = torch.nn.Linear(8, 5632, device="meta")
    adapter.blocks[0].mlp.up_proj = wide
    assert forward_tokens(adapter) == FORWARD_BYTES // (16 * 5632) < MAX_BATCH_TOKENS


def test_memory_bound_from_shapes(tiny_dir):
    ckpt = Checkpoint(tiny_dir("llama"))
    model = build_skeleton(load_config(ckpt))
    adapter, weights = Adapter(model), WeightMap(model, ckpt)
    samples = [torch.zeros(24, dtype=torch.long)] * 4
    b = memory_bound(adapter, weights, Calibration(samples, "t", "rows", 24, 0), base_bytes=100 << 20)
    block = sum(q.numel() for q in adapter.blocks[0].parameters()) * 4
    hidden = model.config.hidden_size
    stored = sum(ckpt.get(k).numel() * ckpt.get(k).element_size() for k in ckpt.keys() if k.startswith("model.layers.0."))
    assert b["block_fp32_mb"] == round(block / 2**20, 1)
    assert b["block_stored_mb"] == round(stored / 2**20, 1)
    assert b["activations_mb"] == round(4 * 24 * hidden * 4 / 2**20, 1)
    assert b["interpreter_mb"] == 100.0
    head = sum(q.numel() for q in model.lm_head.parameters()) * 4 if not model.config.tie_word_embeddings else 0
    outside = sum(q.numel() for n, q in model.named_parameters() if not n.startswith("model.layers.")) * 4 - head
    assert b["outside_fp32_mb"] == round(outside / 2**20, 1)
    expect = (100 << 20) + max(outside + 4 * 24 * hidden * 4, 2 * block + stored + 2 * 4 * 24 * hidden * 4 + FORWARD_BYTES)
    assert b["total_mb"] == round(expect / 2**20, 1)


def test_report_has_bound_when_streamed_and_phases(tiny_dir, tiny_calib, tmp_path):
    kw = dict(method="wanda", pattern="2:4", calib=str(tiny_calib), nsamples=8, seqlen=32)
    streamed = squeeze.compress(tiny_dir("llama"), tmp_path / "s", keep_in_memory=False, **kw).report
    kept = squeeze.compress(tiny_dir("llama"), tmp_path / "k", keep_in_memory=True, **kw).report
    assert streamed["memory_bound"]["total_mb"] > streamed["memory_bound"]["interpreter_mb"] > 0
    assert "memory_bound" not in kept
    phases = streamed["seconds_by_phase"]
    assert list(phases)[:2] == ["model code", "calibration"] and list(phases)[-1] == "write"
    assert {"load", "capture", "statistics", "solve", "propagate", "spill"} <= phases.keys()
    assert sum(phases.values()) <= streamed["seconds"] + 1e-3
    # the two exports are the same model: streaming changes what is held, not what is computed
    for f in (tmp_path / "s").glob("model*.safetensors"):
        a, b = load_file(str(f)), load_file(str(tmp_path / "k" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "s" / "squeeze.json").read_text())["linears"] == \
        json.loads((tmp_path / "k" / "squeeze.json").read_text())["linears"]


def test_memory_bound_counts_hessians_of_second_order_passes(tiny_dir):
    from squeeze.calib.stats import HESSIAN_TEMP_BYTES

    ckpt = Checkpoint(tiny_dir("llama"))
    model = build_skeleton(load_config(ckpt))
    adapter, weights = Adapter(model), WeightMap(model, ckpt)
    calib = Calibration([torch.zeros(24, dtype=torch.long)] * 2, "t", "rows", 24, 0)

    class Second(BlockPass):
        name, hessians = "test-second-order", True

        def observed(self, block):
            return list(block.linears.values())

    plain = memory_bound(adapter, weights, calib, 0)
    second = memory_bound(adapter, weights, calib, 0, [Second()])
    ins = [lin.in_features for lin in adapter.block(0).linears.values()]
    square = [n * n * 8 for n in ins]
    # the sums, the solve's two matrices, and one batch's product being added
    expect = max(sum(square[j:]) + 2 * square[j] for j in range(len(square))) + HESSIAN_TEMP_BYTES
    assert plain["hessians_mb"] == 0 and second["hessians_mb"] == round(expect / 2**20, 1)
    assert second["total_mb"] > plain["total_mb"]
