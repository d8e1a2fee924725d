"""write_checkpoint: the one export writer (renamed / left-out keys, shards, index, config, record)."""

import json

import pytest
import torch
from safetensors import safe_open

from squeeze.checkpoint import Checkpoint
from squeeze.depth.layerdrop import config_updates, remove_layers, renumbered_keys
from squeeze.export import RECORD, commit, staging_dir, write_checkpoint


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_renumbered_keys():
    keys = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
            "model.layers.10.input_layernorm.weight", "model.layers.2.self_attn.q_proj.weight"]
    assert renumbered_keys(keys, "model.layers.", [0, 2, 10]) == {
        "model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight": None,
        "model.layers.10.input_layernorm.weight": "model.layers.2.input_layernorm.weight",
        "model.layers.2.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
    }


@pytest.mark.parametrize("sharded", [False, True])
def test_dropped_layer_export_round_trip(tmp_path, sharded):
    from transformers import AutoModelForCausalLM

    from tests.test_depth import tiny_model

    src = tmp_path / "src"
    tiny_model("llama", layers=4).save_pretrained(src, max_shard_size="40KB" if sharded else "5GB")
    ckpt = Checkpoint(src)
    assert bool(ckpt.index_file) == sharded
    keep = [0, 3]
    keys = renumbered_keys(ckpt.key_to_shard, "model.layers.", keep)
    out = tmp_path / "out"
    with staging_dir(out) as tmp:
        write_checkpoint(ckpt, tmp, None, config_updates(ckpt.config_dict, keep, 4), {"passes": []}, keys=keys)
        commit(tmp, out)

    before, after = _tensors(src), _tensors(out)
    want = {keys.get(k, k): t for k, t in before.items() if keys.get(k, k) is not None}
    assert sorted(after) == sorted(want)
    assert "model.layers.1.self_attn.q_proj.weight" in after and "model.layers.2.mlp.up_proj.weight" not in after
    for k, t in want.items():  # the very same tensors, only renamed
        assert after[k].dtype == t.dtype and torch.equal(after[k], t), k
    assert torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.3.mlp.up_proj.weight"])
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(after)
        old_of = {new: old for old, new in keys.items() if new is not None}
        for k, shard in index["weight_map"].items():  # every tensor stays in its source shard
            assert shard == ckpt.key_to_shard[old_of.get(k, k)], k
        assert len(set(index["weight_map"].values())) > 1
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert "passes" in json.loads((out / RECORD).read_text())

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = remove_layers(AutoModelForCausalLM.from_pretrained(src).eval(), [1, 2])
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, ref(input_ids=ids).logits)
