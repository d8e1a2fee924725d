"""Orderings the literature predicts, on the real stories260k (KL(dense || pruned) nats/token):
SparseGPT < Wanda < magnitude at 2:4, and DSnoT repair never worse than the mask it starts
from (beyond noise). Small calibration (32 rows x 400 tokens) and 16 eval rows to stay fast."""

import pytest

from tests.conftest import STORIES, STORIES_CALIB, STORIES_EVAL, needs_shared

pytestmark = needs_shared

CASES = {
    "magnitude": [{"pass": "magnitude", "pattern": "2:4"}],
    "wanda": [{"pass": "wanda", "pattern": "2:4"}],
    "sparsegpt": [{"pass": "sparsegpt", "pattern": "2:4"}],
    "wanda+dsnot": [{"pass": "wanda", "pattern": "2:4"}, {"pass": "dsnot"}],
    "sparsegpt+dsnot": [{"pass": "sparsegpt", "pattern": "2:4"}, {"pass": "dsnot"}],
}


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    import squeeze

    ref = squeeze.load(STORIES)
    out = {}
    for name, recipe in CASES.items():
        r = squeeze.compress(STORIES, tmp_path_factory.mktemp(name) / "o", recipe=recipe, calib=str(STORIES_CALIB),
                             nsamples=32, seqlen=400, keep_in_memory=True)
        out[name] = squeeze.evaluate(r.model, str(STORIES_EVAL), reference=ref, max_rows=16)["kl"]
    return out


def test_sparsegpt_beats_wanda_beats_magnitude_at_2_4(kl):
    assert kl["sparsegpt"] < kl["wanda"] < kl["magnitude"], kl


@pytest.mark.parametrize("start", ["wanda", "sparsegpt"])
def test_dsnot_never_worse_than_its_starting_mask(kl, start):
    assert kl[f"{start}+dsnot"] <= 1.02 * kl[start] + 0.005, kl
