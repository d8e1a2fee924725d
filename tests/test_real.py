"""Real models: the orderings the literature predicts, and measured quality bounds.

stories260k (../shared) numbers match llm-compressor 0.14's anchor on the same data
(Wanda 2:4 KL 1.546, 50% 0.839; see bench/README.md)."""

import pytest

import squeeze
from tests.conftest import STORIES, STORIES_CALIB, STORIES_EVAL, needs_shared


@needs_shared
def test_stories_wanda_beats_magnitude_at_24(tmp_path):
    kl = {}
    for method in ("magnitude", "wanda"):
        squeeze.compress(STORIES, tmp_path / method, method=method, pattern="2:4", calib=str(STORIES_CALIB),
                         nsamples=128, seqlen=400)
        kl[method] = squeeze.evaluate(tmp_path / method, str(STORIES_EVAL), reference=STORIES, max_rows=64)["kl"]
    assert kl["wanda"] < kl["magnitude"]
    # llm-compressor's Wanda 2:4 on this exact setup scores 1.546 on all 128 rows; we must match it closely
    assert 1.2 < kl["wanda"] < 1.8, kl


@needs_shared
def test_stories_wanda_matches_anchor_exactly(tmp_path):
    """Same data, same rule as llm-compressor 0.14's Wanda: 50% unstructured KL 0.839 on the full eval file."""
    squeeze.compress(STORIES, tmp_path / "w", method="wanda", sparsity=0.5, calib=str(STORIES_CALIB),
                     nsamples=128, seqlen=400)
    kl = squeeze.evaluate(tmp_path / "w", str(STORIES_EVAL), reference=STORIES)["kl"]
    assert kl == pytest.approx(0.839, rel=0.02)


@pytest.mark.slow
def test_minilm_wanda_50_keeps_embeddings(minilm_dir, tmp_path):
    """Wanda 50% on all-MiniLM-L6-v2 with the built-in corpus (64 x 128 tokens), scored on 240
    held-out sentences. Measured: mean cosine 0.868 (min 0.781); magnitude 50% gives 0.765 (min 0.615).
    The bound 0.83 sits between the two, so it fails if the activation statistics stop mattering."""
    squeeze.compress(None, tmp_path / "w", method="wanda", sparsity=0.5)
    r = squeeze.evaluate(tmp_path / "w", "builtin-eval", reference=minilm_dir)
    assert r["rows"] == 240
    assert r["cosine_mean"] > 0.83, r
    assert r["cosine_min"] > 0.6, r


@needs_shared
def test_stories_wina_transform_beats_plain_wina(tmp_path):
    """WINA's claim holds on stories260k only with its orthogonal transform (bench/README.md section 5:
    50% uniform KL 0.967 plain vs 0.713 transformed, greedy 0.557 on 20 eval rows). Greedy must not be
    worse than uniform: its trials compare against the dense block, which for rotated sites means the
    sparsifiers installed at 0% (a greedy run without them once scored 2.44)."""
    kl = {}
    for name, kw in (("plain", {}), ("transform", {"transform": True}),
                     ("transform-greedy", {"transform": True, "allocation": "greedy", "greedy_tokens": 512})):
        squeeze.compress(STORIES, tmp_path / name, method="wina", act_sparsity=0.5, calib=str(STORIES_CALIB),
                         nsamples=32, seqlen=400, **kw)
        kl[name] = squeeze.evaluate(tmp_path / name, str(STORIES_EVAL), reference=STORIES, max_rows=20)["kl"]
    assert kl["transform"] < 0.85 * kl["plain"], kl
    assert kl["transform-greedy"] < kl["transform"], kl
