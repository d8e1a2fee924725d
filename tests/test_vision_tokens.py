"""Vision-token dropping (PyramidDrop, MustDrop-style) on tiny random LLaVA models."""

from __future__ import annotations

import pytest
import torch

from squeeze.compat import cache_kwargs, new_cache, output_cache
from squeeze.loading import read_record
from squeeze.runtime.pyramiddrop import PyramidDropPolicy, topk_keep
from squeeze.runtime.token_drop import install, uninstall
from tests import llava_tiny
from tests.llava_tiny import IMAGE_TOKEN, inputs

NEW = 5


@pytest.fixture(scope="module")
def tiny():
    return llava_tiny.model(layers=4)


@pytest.fixture(scope="module")
def tiny_eager():
    return llava_tiny.model(layers=4, attn="eager")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return llava_tiny.build(tmp_path_factory.mktemp("llava") / "tiny-llava")


def _gen(m, ids, pv, n=NEW, **kw):
    with torch.no_grad():
        return m.generate(input_ids=ids, pixel_values=pv, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          **kw)


def _logits(m, ids, pv, **kw):
    with torch.no_grad():
        return m(input_ids=ids, pixel_values=pv, **kw).logits


class Replay:
    """Keeps exactly the recorded original indices at each boundary (decode-consistency checks)."""

    def __init__(self, kept: dict):
        self.kept = kept

    def layers(self, n):
        return sorted(k for k in self.kept if k >= 0)

    def select(self, rt, index, layer, seq):
        out = torch.zeros_like(seq.image)
        for b, rows in enumerate(self.kept[index]):
            out[b] = torch.isin(seq.orig[b], torch.tensor(rows))
        return out


# --- adapter / layout -------------------------------------------------------------------------


def test_adapter_blocks_and_image_positions(tiny):
    from squeeze.adapters import Adapter
    from squeeze.vision import image_token_positions

    ad = Adapter(tiny)
    assert ad.blocks_path == "model.language_model.layers" and len(ad) == 4
    assert {lin.role for lin in ad.block(0).linears.values()} == {"q", "k", "v", "o", "gate", "up", "down"}
    ids, _ = inputs(batch=2)
    pos = image_token_positions(tiny.config, ids)
    assert [p.tolist() for p in pos] == [list(range(3, 19))] * 2


def test_wanda_on_llava_language_model(llava_dir, tiny_calib, tmp_path):
    import squeeze

    res = squeeze.compress(llava_dir, tmp_path / "w", method="wanda", pattern="2:4", calib=str(tiny_calib),
                           nsamples=8, seqlen=32)
    assert res.report["summary"]["pattern_ok"] and res.report["summary"]["targeted_linears"] == 28
    assert all(k.startswith("model.language_model.layers.") for k in res.report["linears"])
    m = squeeze.load(tmp_path / "w")
    q = m.model.language_model.layers[0].self_attn.q_proj.weight
    assert (q.reshape(-1, 4) == 0).sum(1).ge(2).all()
    assert _gen(m, *inputs()).shape[1] == 24 + NEW


# --- PyramidDrop ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_keep_ratio_one_is_exact(tiny, batch):
    ids, pv = inputs(batch=batch)
    base, gbase = _logits(tiny, ids, pv), _gen(tiny, ids, pv)
    try:
        rt = install(tiny, PyramidDropPolicy([1, 2, 3], [1.0, 1.0, 1.0]))
        assert torch.equal(_logits(tiny, ids, pv), base)
        assert rt.last.layer_lengths == [24] * 4
        assert torch.equal(_gen(tiny, ids, pv), gbase)
    finally:
        uninstall(tiny)
    assert torch.equal(_logits(tiny, ids, pv), base)  # uninstall restores the stock forward


@pytest.mark.parametrize("which", ["tiny", "tiny_eager"])
def test_own_masks_reproduce_the_stock_model(which, request):
    """A stage rebuilt with nothing dropped (the runtime's own gathered rotary tables, masks,
    per-stage cache) matches the stock model, in prefill and in generation."""
    m = request.getfixturevalue(which)
    ids, pv = inputs(batch=2)
    base, gbase = _logits(m, ids, pv), _gen(m, ids, pv)
    pol = PyramidDropPolicy([1, 3], [1.0, 1.0])
    pol.force_compact = True
    try:
        install(m, pol)
        torch.testing.assert_close(_logits(m, ids, pv), base, atol=1e-5, rtol=1e-5)
        out = _gen(m, ids, pv, return_dict_in_generate=True, output_scores=True)
        assert torch.equal(out.sequences, gbase)
    finally:
        uninstall(m)


def test_topk_keep_hand_checked():
    scores = torch.tensor([[0.10, 0.50, 0.30, 0.20, 0.90, 0.30]])
    cand = torch.tensor([[False, True, True, True, False, True]])
    keep = topk_keep(scores, cand, torch.tensor([2]))
    # 0.90 is text (not a candidate); among candidates 0.50 then a 0.30 tie -> the earlier one
    assert keep.tolist() == [[False, True, True, False, False, False]]
    assert topk_keep(scores, cand, torch.tensor([0])).sum() == 0


def test_head_mean_probs_hand_checked():
    from squeeze.vision.attention import head_mean_probs

    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, H=2, Q=1, D=2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]] * 2])  # (1, 2, 3, 2)
    allowed = torch.tensor([[[True, True, False]]])
    p = head_mean_probs(q, k, 1.0, allowed)
    e = torch.e
    expected = 0.5 * torch.tensor([e / (e + 1), 1 / (e + 1), 0.0]) + 0.5 * torch.tensor([1 / (e + 1), e / (e + 1), 0])
    torch.testing.assert_close(p[0, 0], expected)


def _manual_last_token_scores(m, ids, pv, layer_idx):
    """Independent recomputation: the stock model's input to ``layer_idx``, its norm, q/k,
    rotary (rotate-half form), causal softmax from the last token, mean over heads."""
    with torch.no_grad():
        hs = m(input_ids=ids, pixel_values=pv, output_hidden_states=True).hidden_states[layer_idx]
        layer = m.model.language_model.layers[layer_idx]
        attn, cfg = layer.self_attn, m.config.text_config
        x = layer.input_layernorm(hs)[0]  # (T, C)
        T, hd = x.shape[0], attn.head_dim
        q = attn.q_proj(x[-1:]).view(1, cfg.num_attention_heads, hd)
        k = attn.k_proj(x).view(T, cfg.num_key_value_heads, hd)
        inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(T).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def rot(v, c, s):
            return v * c + torch.cat([-v[..., hd // 2:], v[..., :hd // 2]], -1) * s

        q = rot(q, cos[-1:, None], sin[-1:, None])
        k = rot(k, cos[:, None], sin[:, None]).repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 1)
        logits = torch.einsum("qhd,khd->hk", q, k) / hd ** 0.5  # last token sees every key
        return torch.softmax(logits, -1).mean(0)  # (T,)


def test_kept_tokens_are_topk_of_last_token_attention(tiny):
    ids, pv = inputs(batch=1)
    scores = _manual_last_token_scores(tiny, ids, pv, 2)
    img = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    expected = img[scores[img].topk(4).indices].sort().values  # 0.25 x 16 image tokens
    try:
        rt = install(tiny, PyramidDropPolicy([2], [0.25]))
        _logits(tiny, ids, pv)
        kept = rt.last.kept[2][0]
    finally:
        uninstall(tiny)
    text = [i for i in range(24) if i not in img.tolist()]
    assert kept == sorted(text + expected.tolist())
    assert rt.last.layer_lengths == [24, 24, 12, 12]


def test_generation_after_dropping_has_consistent_caches(tiny):
    ids, pv = inputs(batch=2)
    try:
        rt = install(tiny, PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125]))
        out = _gen(tiny, ids, pv, n=7, return_dict_in_generate=True)
        assert out.sequences.shape == (2, 24 + 7)
        assert rt.last.layer_lengths == [24, 16, 12, 10]
        cache = output_cache(out)
        # every layer holds its stage's kept tokens plus the 6 tokens fed back during decoding
        assert [cache.get_seq_length(i) for i in range(4)] == [24 + 6, 16 + 6, 12 + 6, 10 + 6]
        state = rt.state(cache)
        assert state.total == 30 and [s.orig.shape[1] for s in state.stages] == [30, 22, 18, 16]
        assert state.stages[-1].orig[0, -6:].tolist() == list(range(24, 30))  # original positions continue
    finally:
        uninstall(tiny)


def test_decode_step_matches_full_forward_with_the_same_drops(tiny):
    """A cached decode step after dropping equals a cache-free forward over prompt + token that
    drops the very same tokens: positions, per-stage masks and caches line up."""
    ids, pv = inputs(batch=2, seed=3)
    try:
        rt = install(tiny, PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125]))
        cache = new_cache(tiny.config.text_config)
        with torch.no_grad():
            first = tiny(input_ids=ids, pixel_values=pv, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
            nxt = first.argmax(-1, keepdim=True)
            step = tiny(input_ids=nxt, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
        kept = rt.last.kept
        install(tiny, Replay(kept))
        full = _logits(tiny, torch.cat([ids, nxt], 1), pv, use_cache=False)[:, -1]
    finally:
        uninstall(tiny)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_text_only_input_is_untouched(tiny):
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        base = tiny(input_ids=ids).logits
        try:
            install(tiny, PyramidDropPolicy([1], [0.1]))
            assert torch.equal(tiny(input_ids=ids).logits, base)
        finally:
            uninstall(tiny)


def test_bad_settings_are_clear_errors():
    from squeeze.errors import SqueezeError
    from squeeze.passes import get_pass

    with pytest.raises(SqueezeError, match="one keep ratio per layer"):
        get_pass("pyramiddrop")(layers="8,16", ratios="0.5,0.25,0.1")
    with pytest.raises(SqueezeError, match=r"\[0, 1\]"):
        get_pass("pyramiddrop")(ratios=[1.5])
    with pytest.raises(SqueezeError, match="comma-separated"):
        get_pass("pyramiddrop")(layers="a,b")
    with pytest.raises(SqueezeError, match="increasing"):
        get_pass("mustdrop")(layers=[4, 2])


# --- export / load ----------------------------------------------------------------------------


def test_pyramiddrop_settings_survive_export_and_load(llava_dir, tmp_path):
    import squeeze

    res = squeeze.compress(llava_dir, tmp_path / "pd", method="pyramiddrop", layers="1,2,3",
                           ratios="0.5,0.25,0.125")
    assert res.report["calibration"] is None  # no calibration data needed
    entry = read_record(tmp_path / "pd")["passes"][0]
    assert entry == {"pass": "pyramiddrop", "layers": [1, 2, 3], "ratios": [0.5, 0.25, 0.125]}
    m = squeeze.load(tmp_path / "pd")
    assert m.squeeze_token_drop.policy == PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125])
    ids, pv = inputs()
    got = _logits(m, ids, pv)
    assert got.shape[1] == 10 and m.squeeze_token_drop.last.layer_lengths == [24, 16, 12, 10]
    assert _gen(m, ids, pv).shape[1] == 24 + NEW
    ref = llava_tiny.model(layers=4)
    install(ref, PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125]))
    torch.testing.assert_close(got, _logits(ref, ids, pv))


def test_default_quarters_recorded(llava_dir, tmp_path):
    import squeeze

    squeeze.compress(llava_dir, tmp_path / "pd", method="pyramiddrop")
    entry = read_record(tmp_path / "pd")["passes"][0]
    assert entry["layers"] == [1, 2, 3] and entry["ratios"] == [0.5, 0.25, 0.125]


def test_recipe_pruning_then_dropping(llava_dir, tiny_calib, tmp_path):
    import squeeze

    recipe = [{"pass": "wanda", "pattern": "2:4"}, {"pass": "pyramiddrop", "layers": [2], "ratios": [0.5]}]
    res = squeeze.compress(llava_dir, tmp_path / "r", recipe=recipe, calib=str(tiny_calib), nsamples=8, seqlen=32)
    assert res.report["summary"]["pattern_ok"]
    m = squeeze.load(tmp_path / "r")
    assert [p["pass"] for p in m.squeeze_record["passes"]] == ["wanda", "pyramiddrop"]
    ids, pv = inputs()
    _logits(m, ids, pv)
    assert m.squeeze_token_drop.last.layer_lengths == [24, 24, 16, 16]


def test_cli_layers_ratios(llava_dir, tmp_path):
    from squeeze.cli.main import main

    main(["compress", str(llava_dir), "--method", "pyramiddrop", "--layers", "1,3", "--ratios", "0.5,0.25",
          "--out", str(tmp_path / "c")])

    assert read_record(tmp_path / "c")["passes"][0]["ratios"] == [0.5, 0.25]
    import json

    main(["eval", str(tmp_path / "c"), "--flops", "--flops-text-tokens", "8", "--json", str(tmp_path / "f.json")])
    rep = json.loads((tmp_path / "f.json").read_text())
    assert "ppl" not in rep  # --flops alone skips the quality evaluation
    assert rep["flops_image_tokens"] == 16 and rep["flops"]["cache_lengths"] == [24, 16, 16, 12]
    assert 0 < rep["flops_prefill_ratio"] < 1 and rep["flops_prefill"] < rep["flops_prefill_dense"]
    with pytest.raises(SystemExit) as e:
        main(["compress", str(llava_dir), "--method", "pyramiddrop", "--layers", "1,3", "--ratios", "0.5",
              "--out", str(tmp_path / "d")])
    assert e.value.code == 2


# --- LLaVA-NeXT (anyres tiles + image_newline features, all on image placeholders) -------------


def test_llava_next_pyramiddrop():
    from squeeze.adapters import Adapter
    from squeeze.vision import image_token_positions

    m = llava_tiny.next_model()
    ids, pv, sizes = llava_tiny.next_inputs()
    assert Adapter(m).blocks_path == "model.language_model.layers"
    assert image_token_positions(m.config, ids)[0].tolist() == list(range(3, 55))
    kw = {"pixel_values": pv, "image_sizes": sizes}
    with torch.no_grad():
        base = m(input_ids=ids, **kw).logits
        gbase = m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kw)
        rt = install(m, PyramidDropPolicy([1, 2, 3], [1.0, 1.0, 1.0]))
        assert torch.equal(m(input_ids=ids, **kw).logits, base)
        assert torch.equal(m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kw),
                           gbase)
        rt = install(m, PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125]))
        out = m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kw)
    assert out.shape[1] == 60 + 4
    assert rt.last.layer_lengths == [60, 8 + 26, 8 + 13, 8 + 6]


@pytest.mark.parametrize("policy", ["pyramiddrop", "mustdrop"])
def test_left_padded_batch_generates_like_each_row_alone(tiny, policy):
    """Rows keep different tokens (MustDrop: different counts, filled with invalid slots); with a
    left-padded row in the batch, every row's logits match generating that row on its own."""
    from squeeze.runtime.mustdrop import MustDropPolicy

    ids, pv = inputs(batch=2, seed=5)
    pad_ids, am = ids.clone(), torch.ones_like(ids)
    pad_ids[1, :2], am[1, :2] = 0, 0
    pol = PyramidDropPolicy([1, 2, 3], [0.5, 0.25, 0.125]) if policy == "pyramiddrop" else \
        MustDropPolicy([1, 2], 0.04, 0.05, window=2, merge_threshold=0.3, key_fraction=0.1)
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True,
          "output_logits": True}
    try:
        rt = install(tiny, pol)
        with torch.no_grad():
            both = tiny.generate(input_ids=pad_ids, attention_mask=am, pixel_values=pv, **kw)
            kept_batch = rt.last.kept
            alone = [tiny.generate(input_ids=ids[:1], pixel_values=pv[:1], **kw),
                     tiny.generate(input_ids=ids[1:, 2:], pixel_values=pv[1:], **kw)]
    finally:
        uninstall(tiny)
    assert kept_batch  # something was dropped
    for row, single in enumerate(alone):
        assert torch.equal(both.sequences[row, -5:], single.sequences[0, -5:])
        for lb, ls in zip(both.logits, single.logits):
            torch.testing.assert_close(lb[row], ls[0], atol=1e-5, rtol=1e-5)


def test_beam_search_with_rows_of_different_lengths(tiny):
    from squeeze.runtime.mustdrop import MustDropPolicy

    ids, pv = inputs(batch=2, seed=5)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "num_beams": 2,
          "return_dict_in_generate": True, "output_scores": True}
    try:
        rt = install(tiny, MustDropPolicy([1, 2], 0.04, 0.05, window=2, merge_threshold=0.3, key_fraction=0.1))
        with torch.no_grad():
            both = tiny.generate(input_ids=ids, pixel_values=pv, **kw)
            counts = {len(r) for r in rt.last.kept[-1]}
            alone = [tiny.generate(input_ids=ids[i:i + 1], pixel_values=pv[i:i + 1], **kw) for i in range(2)]
    finally:
        uninstall(tiny)
    assert len(counts) == 2  # the rows really keep different numbers of tokens
    for i, single in enumerate(alone):
        assert torch.equal(both.sequences[i], single.sequences[0])
        torch.testing.assert_close(both.sequences_scores[i], single.sequences_scores[0])
