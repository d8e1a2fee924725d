"""MustDrop-style stages and FLOPs accounting on hand-made tensors and a tiny random LLaVA."""

from __future__ import annotations

import math

import pytest
import torch

from squeeze.compat import cache_kwargs, layer_kv, new_cache, output_cache
from squeeze.loading import read_record
from squeeze.runtime.mustdrop import (
    MustDropPolicy,
    attention_drop,
    cls_attention,
    key_set,
    mean_pairwise_cosine,
    merge_windows,
)
from squeeze.runtime.token_drop import install, uninstall
from tests import llava_tiny
from tests.llava_tiny import IMAGE_TOKEN, inputs


@pytest.fixture(scope="module")
def tiny():
    return llava_tiny.model(layers=4)


def _cls_importance(m, pv):
    """The vision tower's own (eager) attention of CLS over the patches at its last layer."""
    vt = m.model.vision_tower
    vt.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = vt(pv, output_attentions=True).attentions[-1]  # (N, H, 1 + P, 1 + P)
    finally:
        vt.set_attn_implementation("sdpa")
    return att[:, :, 0].mean(1)[:, 1:]  # (N, P)


# --- pure functions -------------------------------------------------------------------------


def test_mean_pairwise_cosine_hand_checked():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # pairs: (0,1) 0, (0,2) 1/sqrt2, (1,2) 1/sqrt2
    assert math.isclose(float(mean_pairwise_cosine(x)), (2 / math.sqrt(2)) / 3, rel_tol=1e-6)


def test_merged_token_is_the_weighted_average_of_its_window():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.1], [1.5, 0.0], [3.0, 0.2],  # window 0: near-parallel
                      [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # window 1: dissimilar
    w = torch.tensor([1.0, 3.0, 0.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    out, keep = merge_windows(x, [[0, 1, 2, 3], [4, 5, 6, 7]], w, torch.zeros(8, dtype=torch.bool), 0.9)
    expected = (1 * x[0] + 3 * x[1] + 0 * x[2] + 4 * x[3]) / 8
    torch.testing.assert_close(out[0], expected)
    assert keep.tolist() == [True, False, False, False] + [True] * 4
    torch.testing.assert_close(out[1:], x[1:])  # other rows untouched
    prot = torch.zeros(8, dtype=torch.bool)
    prot[2] = True  # a key token in the window: left alone
    out, keep = merge_windows(x, [[0, 1, 2, 3]], w, prot, 0.9)
    assert keep.all() and torch.equal(out, x)


def test_key_set_and_dual_threshold_rule():
    assert key_set(torch.tensor([0.1, 0.7, 0.3, 0.9, 0.2]), 0.3).tolist() == [False, True, False, True, False]
    # 2 text queries (rows) over 4 keys; keys 1..3 are image tokens, key 3 protected
    a = torch.tensor([[[0.90, 0.02, 0.05, 0.03],
                       [0.50, 0.001, 0.40, 0.099]]])
    image = torch.tensor([[False, True, True, True]])
    prot = torch.tensor([[False, False, False, True]])
    # global: sum < 0.05 * 2 = 0.1 -> key 1 (0.021) yes, key 2 (0.45) no; individual: max < 0.03 -> key 1 yes
    drop = attention_drop(a, image, prot, 0.05, 0.03)
    assert drop.tolist() == [[False, True, False, False]]
    assert attention_drop(a, image, prot, 0.05, 0.01).sum() == 0  # key 1 peaks at 0.02 >= 0.01: kept


def test_cls_attention_matches_the_vision_tower(tiny):
    _, pv = inputs()
    vt = tiny.model.vision_tower
    with torch.no_grad():
        hs = vt(pv, output_hidden_states=True).hidden_states[-2]
        mine = cls_attention(vt.encoder.layers[-1], hs)[:, 1:]
    torch.testing.assert_close(mine, _cls_importance(tiny, pv), atol=1e-6, rtol=1e-5)


# --- end to end -------------------------------------------------------------------------------


def test_merge_before_the_llm(tiny):
    """Every 2x2 window merges (threshold -1, no key set): the LLM's first layer sees 4 image
    tokens, each the CLS-attention-weighted average of its window's projected features, at the
    window's top-left slot with that slot's original position."""
    ids, pv = inputs()
    with torch.no_grad():
        feats = tiny.model.get_image_features(pixel_values=pv).pooler_output[0]  # (16, C)
    w = _cls_importance(tiny, pv)[0]
    seen = {}
    layer0 = tiny.model.language_model.layers[0]
    h = layer0.register_forward_pre_hook(lambda mod, args, kw: seen.update(x=args[0], pos=kw["position_ids"]),
                                         with_kwargs=True)
    try:
        rt = install(tiny, MustDropPolicy([3], 0.0, 0.0, merge_threshold=-1.0, window=2, key_fraction=0.0))
        with torch.no_grad():
            tiny(input_ids=ids, pixel_values=pv)
    finally:
        h.remove()
        uninstall(tiny)
    assert rt.last.layer_lengths == [8 + 4] * 4
    windows = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert seen["pos"][0].tolist() == [0, 1, 2] + [3 + win[0] for win in windows] + [19, 20, 21, 22, 23]
    for slot, win in enumerate(windows):
        expected = (w[win, None] * feats[win]).sum(0) / w[win].sum()
        torch.testing.assert_close(seen["x"][0, 3 + slot], expected, atol=1e-5, rtol=1e-5)


def test_key_set_survives_aggressive_dropping_and_caches_are_trimmed(tiny):
    ids, pv = inputs()
    top4 = _cls_importance(tiny, pv)[0].topk(4).indices.sort().values + 3  # image tokens start at 3
    try:
        rt = install(tiny, MustDropPolicy([1, 2], 1.0, 1.0, window=1, key_fraction=0.25))
        cache = new_cache(tiny.config.text_config)
        with torch.no_grad():
            tiny(input_ids=ids, pixel_values=pv, use_cache=True, **cache_kwargs(cache))
        kept = rt.last.kept[1][0]
        assert [i for i in kept if ids[0, i] == IMAGE_TOKEN] == top4.tolist()  # only the key set is left
        assert rt.last.layer_lengths == [24, 12, 12, 12]
        assert [cache.get_seq_length(i) for i in range(4)] == [24, 12, 12, 12]
        out = tiny.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            return_dict_in_generate=True)
        assert out.sequences.shape[1] == 24 + 6
        assert [output_cache(out).get_seq_length(i) for i in range(4)] == [29, 17, 17, 17]
    finally:
        uninstall(tiny)


class FixedDrops:
    """Keeps fixed original indices at fixed layers (exercises the runtime's stage-3 trim)."""

    def __init__(self, kept: dict, trim: bool):
        self.kept, self.trim_after_prefill = kept, trim

    def layers(self, n):
        return sorted(self.kept)

    def select(self, rt, index, layer, seq):
        return torch.isin(seq.orig, torch.tensor(self.kept[index]))


def test_trim_cuts_earlier_stages_to_the_survivors(tiny):
    ids, pv = inputs(batch=1)
    a = list(range(3)) + [3, 5, 6, 9, 12, 14, 17, 18] + list(range(19, 24))  # 8 image tokens at layer 1
    b = list(range(3)) + [5, 12, 17] + list(range(19, 24))  # 3 of them at layer 3
    caches = {}
    try:
        for trim in (False, True):
            rt = install(tiny, FixedDrops({1: a, 3: b}, trim))
            caches[trim] = new_cache(tiny.config.text_config)
            with torch.no_grad():
                tiny(input_ids=ids, pixel_values=pv, use_cache=True, **cache_kwargs(caches[trim]))
        assert rt.last.layer_lengths == [24, 16, 16, 11]
        full, cut = caches[False], caches[True]
        assert [full.get_seq_length(i) for i in range(4)] == [24, 16, 16, 11]
        assert [cut.get_seq_length(i) for i in range(4)] == [24, 11, 11, 11]
        rows = torch.tensor([a.index(i) for i in b])
        for i in (1, 2):  # the trimmed layers hold exactly the survivors' rows of their own cache
            (ck, cv), (fk, fv) = layer_kv(cut, i), layer_kv(full, i)
            assert torch.equal(ck, fk[:, :, rows]) and torch.equal(cv, fv[:, :, rows])
        for i in (0, 3):  # before the first drop and after the last, nothing to trim
            assert all(torch.equal(c, f) for c, f in zip(layer_kv(cut, i), layer_kv(full, i)))
        assert rt.state(cut).layer_stage == [0, 2, 2, 2]
        with torch.no_grad():
            nxt = torch.tensor([[7]])
            step = tiny(input_ids=nxt, use_cache=True, **cache_kwargs(cut)).logits
        assert torch.isfinite(step).all() and [cut.get_seq_length(i) for i in range(4)] == [25, 12, 12, 12]
    finally:
        uninstall(tiny)


def test_mustdrop_settings_survive_export_and_load(tmp_path):
    import squeeze

    src = llava_tiny.build(tmp_path / "src")
    squeeze.compress(src, tmp_path / "md", method="mustdrop", layers=[1, 2], global_threshold=0.5,
                     individual_threshold=0.2, window=2, merge_threshold=0.5, key_fraction=0.1)
    entry = read_record(tmp_path / "md")["passes"][0]
    assert entry["layers"] == [1, 2] and entry["global_threshold"] == 0.5 and entry["window"] == 2
    m = squeeze.load(tmp_path / "md")
    pol = MustDropPolicy([1, 2], 0.5, 0.2, 0.5, 2, 0.1, True, None)
    assert m.squeeze_token_drop.policy == pol
    ids, pv = inputs()
    with torch.no_grad():
        got = m(input_ids=ids, pixel_values=pv).logits
    ref = llava_tiny.model(layers=4)
    install(ref, pol)
    with torch.no_grad():
        torch.testing.assert_close(got, ref(input_ids=ids, pixel_values=pv).logits)


# --- FLOPs ------------------------------------------------------------------------------------


def test_flops_formulas_hand_checked():
    from types import SimpleNamespace

    from squeeze.vision.flops import decode_flops, prefill_flops

    cfg = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                          intermediate_size=16, vocab_size=10)
    linear = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)  # q, k, v, o, gate/up/down per token
    r = prefill_flops(cfg, [6, 6, 3])
    assert r["stages"] == [{"first_layer": 0, "layers": 2, "tokens": 6, "flops": 2 * (6 * linear + 32 * 21)},
                           {"first_layer": 2, "layers": 1, "tokens": 3, "flops": 3 * linear + 32 * 6}]
    assert r["total"] == r["layers_flops"] + 2 * 8 * 10
    assert decode_flops(cfg, [6, 3]) == 2 * linear + 32 * 7 + 32 * 4 + 160


def test_flops_report_from_a_loaded_model(tiny):
    from squeeze.vision.flops import flops_report
    from squeeze.runtime.pyramiddrop import PyramidDropPolicy

    base = flops_report(tiny, text_tokens=8)
    assert base["prefill_ratio"] == 1.0 and base["image_tokens"] == 16
    try:
        install(tiny, PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125]))
        r = flops_report(tiny, text_tokens=8)
    finally:
        uninstall(tiny)
    assert [s["tokens"] for s in r["prefill"]["stages"]] == [24, 16, 12, 10]
    assert r["cache_lengths"] == [24, 16, 12, 10]
    assert r["prefill_ratio"] < 0.8 and r["decode_ratio"] < 1.0


def test_prefill_drops_follow_the_dual_rule_on_recomputed_attention(tiny):
    """Independent recomputation at layer 1 (stock hidden states, causal softmax of every text
    query, head mean) -> the dual-threshold rule -> exactly the tokens the runtime dropped."""
    ids, pv = inputs()
    cfg = tiny.config.text_config
    with torch.no_grad():
        hs = tiny(input_ids=ids, pixel_values=pv, output_hidden_states=True).hidden_states[1]
        layer = tiny.model.language_model.layers[1]
        attn = layer.self_attn
        x = layer.input_layernorm(hs)[0]
        T, hd, H = x.shape[0], attn.head_dim, cfg.num_attention_heads
        pos = torch.arange(T)[None]
        cos, sin = tiny.model.language_model.rotary_emb(x[None], pos)
        q = attn.q_proj(x).view(T, H, hd).transpose(0, 1)
        k = attn.k_proj(x).view(T, -1, hd).transpose(0, 1)
        rot = lambda v: v * cos[0] + torch.cat([-v[..., hd // 2:], v[..., :hd // 2]], -1) * sin[0]
        q, k = rot(q), rot(k).repeat_interleave(H // k.shape[0], 0)
        logits = (q @ k.transpose(-1, -2)) / hd ** 0.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.softmax(logits, -1).mean(0)  # (T, T)
    image = ids[0] == IMAGE_TOKEN
    a_text = a[~image]
    g, ind = 0.04, 0.05
    dropped = image & (a_text.sum(0) < g * a_text.sum()) & (a_text.max(0).values < ind)
    assert 0 < int(dropped.sum()) < 16  # the case is not trivial
    try:
        rt = install(tiny, MustDropPolicy([1], g, ind, window=1, key_fraction=0.0))
        with torch.no_grad():
            tiny(input_ids=ids, pixel_values=pv)
    finally:
        uninstall(tiny)
    assert rt.last.kept[1][0] == (~dropped).nonzero().flatten().tolist()
