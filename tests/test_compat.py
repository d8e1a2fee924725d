"""squeeze.compat: the one seam to transformers' unstable surface, and the rule that nothing else
reaches past it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from squeeze import compat
from squeeze.errors import SqueezeError

ROOT = Path(__file__).resolve().parents[1]

# What only squeeze/compat.py may use: private transformers names, the cache keyword (renamed in
# 5.24), reading/writing the attention implementation, auto-mapping internals, and the sniffing
# tricks (signatures, sys.modules) that silently change meaning when upstream moves.
FORBIDDEN = {
    "private transformers import": re.compile(r"from transformers[\w.]* import [^#\n]*\b_[a-zA-Z]"),
    "private transformers module or attribute": re.compile(r"transformers(\.\w+)*\._[a-zA-Z]"),
    "`past_key_values` (the cache argument is renamed across releases: use compat.cache_kwargs)":
        re.compile(r"past_key_values"),
    "private model/config attribute": re.compile(
        r"\._(attn_implementation|model_mapping|from_config|no_split_modules|tied_weights_keys|"
        r"checkpoint_conversion_mapping|update_causal_mask|prepare_4d)"),
    "signature sniffing": re.compile(r"inspect\.signature"),
    "sys.modules lookups": re.compile(r"sys\.modules\["),
    "cache layer tensors (.layers[i].keys/.values)": re.compile(r"\.layers\[[^\]]+\]\.(keys|values)\b"),
}
SCANNED = ("squeeze", "calib", "cli", "kernels", "bench", "tests")
ALLOWED = {ROOT / "squeeze" / "compat.py", Path(__file__).resolve()}


def _sources():
    for top in SCANNED:
        for f in sorted((ROOT / top).rglob("*.py")):
            if f.resolve() not in ALLOWED:
                yield f


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_unstable_transformers_api_only_in_compat(what):
    pattern = FORBIDDEN[what]
    hits = []
    for f in _sources():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, f"{what} outside squeeze/compat.py:\n" + "\n".join(hits)


def _filled_cache(lengths, batch=2, heads=2, dim=4):
    """A DynamicCache whose layer i holds lengths[i] positions; position p of row b, head h holds
    the value 1000 * b + 100 * h + p in every feature, so crops and gathers are readable."""
    cache = compat.new_cache()
    for i, n in enumerate(lengths):
        t = torch.arange(n, dtype=torch.float32)[None, None, :, None].expand(batch, heads, n, dim)
        rows, heads_ = torch.arange(batch)[:, None, None, None], torch.arange(heads)[None, :, None, None]
        t = t + 1000 * rows + 100 * heads_
        cache.update(t.clone(), -t.clone(), i)
    return cache


def test_crop_cache_keeps_the_first_positions_of_every_layer():
    cache = _filled_cache([7, 5, 3])
    compat.crop_cache(cache, 4)
    assert [cache.get_seq_length(i) for i in range(3)] == [4, 4, 3]  # shorter layers untouched
    keys, values = compat.layer_kv(cache, 0)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 2, 3] and torch.equal(values, -keys)
    compat.crop_cache(cache, 4)  # nothing to remove is a no-op (some releases read crop(0) as "empty")
    assert [cache.get_seq_length(i) for i in range(3)] == [4, 4, 3]


def test_gather_positions_keeps_each_rows_chosen_positions_in_order():
    cache = _filled_cache([6])
    compat.gather_positions(cache, 0, torch.tensor([[0, 2, 5], [1, 3, 4]]))
    keys, values = compat.layer_kv(cache, 0)
    assert cache.get_seq_length(0) == 3
    assert keys[0, 1, :, 0].tolist() == [100, 102, 105] and keys[1, 0, :, 0].tolist() == [1001, 1003, 1004]
    assert torch.equal(values, -keys)


def test_follow_row_ops_runs_after_the_caches_own_reorder():
    cache = _filled_cache([3, 3])
    seen = []
    compat.follow_row_ops(cache, lambda idx, *a, **k: seen.append(("select", idx.tolist())),
                          lambda n, *a, **k: seen.append(("repeat", n)))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert compat.layer_kv(cache, 1)[0][:, 0, 0, 0].tolist() == [1000, 0]  # the stock reorder still ran
    cache.batch_repeat_interleave(2)
    assert compat.layer_kv(cache, 0)[0].shape[0] == 4
    assert seen == [("select", [1, 0]), ("repeat", 2)]


def test_cache_keyword_round_trip():
    cache = compat.new_cache()
    kwargs = {"x": 1, **compat.cache_kwargs(cache)}
    assert list(compat.cache_kwargs(cache)) == [compat.CACHE_ARG]
    assert compat.pop_cache(kwargs) is cache and kwargs == {"x": 1}
    for name in ("cache", "past_key_values"):  # a replacement forward accepts both spellings
        assert compat.pop_cache({name: cache}) is cache
    assert compat.pop_cache({"cache": None, "past_key_values": None}) is None
    with pytest.raises(SqueezeError, match="both"):
        compat.pop_cache({"cache": cache, "past_key_values": compat.new_cache()})


def test_model_calls_through_compat_match_the_stock_forward():
    """A cached two-step forward using compat's cache keyword and output field equals one
    uncached forward, and the mask compat builds is the one the model builds itself."""
    from tests.test_depth import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = compat.new_cache(model.config)
        first = model(input_ids=ids[:, :6], use_cache=True, **compat.cache_kwargs(cache))
        assert compat.output_cache(first) is cache and cache.get_seq_length() == 6
        second = model(input_ids=ids[:, 6:], use_cache=True, **compat.cache_kwargs(cache)).logits
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(torch.cat([first.logits, second], 1), full, **tol)

    seen = {}
    layer0 = model.model.layers[0]
    hook = layer0.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    emb = model.model.embed_tokens(ids)
    pos = torch.arange(9)[None]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    mine = compat.causal_mask(model.config, emb, None, None, pos)
    assert (mine is None) == (seen["attention_mask"] is None)
    if mine is not None:
        assert torch.equal(mine, seen["attention_mask"])


def test_instantiate_sets_the_attention_implementation():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)
    for impl in ("eager", "sdpa"):
        model = compat.instantiate(LlamaForCausalLM, cfg, impl)
        assert compat.attn_implementation(model.config) == impl


def test_auto_class_and_tied_parameters():
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, tie_word_embeddings=True)
    assert compat.auto_class_for(llama) is LlamaForCausalLM
    assert compat.auto_class_for(CLIPVisionConfig()) is CLIPVisionModel  # no causal-LM class: the base model
    assert compat.tied_parameters(LlamaForCausalLM(llama)) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "LlamaDecoderLayer" in compat.no_split_modules(LlamaForCausalLM(llama))
