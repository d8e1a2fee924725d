"""Grid: SparseGPT, DaSS, DSnoT and OWL on every tiny architecture, at 2:4 and at 50%.

Each case checks the promised pattern / sparsity on every targeted linear, that the export
reloads with plain ``from_pretrained`` and gives the outputs of the in-memory compressed model.
To stay fast, each run chains passes: every pass meets every architecture and both targets.
"""

import pytest
import torch

from tests.tiny import ARCHS

RECIPES = {
    # 2:4: DaSS on the MLP, SparseGPT on attention, then DSnoT everywhere
    "dass+sparsegpt-2:4+dsnot": [{"pass": "dass", "pattern": "2:4", "attn_method": "sparsegpt"},
                                 {"pass": "dsnot", "threshold": 0.0}],
    # 50% with OWL per-layer targets: the same trio
    "dass+sparsegpt-50%-owl+dsnot": [{"pass": "dass", "sparsity": 0.5, "sparsity_profile": "owl",
                                      "attn_method": "sparsegpt"}, {"pass": "dsnot", "threshold": 0.0}],
    # SparseGPT alone on every linear (MLPs included)
    "sparsegpt-2:4": [{"pass": "sparsegpt", "pattern": "2:4"}],
    "sparsegpt-50%": [{"pass": "sparsegpt", "sparsity": 0.5}],
}
CASES = [(a, r) for a in ARCHS for r in list(RECIPES)[:2]] + [
    (a, r) for a in ("llama", "phi3", "gpt2", "opt") for r in list(RECIPES)[2:]]


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch,recipe", CASES)
def test_pass_grid(arch, recipe, tiny_dir, tiny_calib, tmp_path):
    import transformers

    import squeeze

    out = tmp_path / "o"
    r = squeeze.compress(tiny_dir(arch), out, recipe=RECIPES[recipe], calib=str(tiny_calib), nsamples=4,
                         seqlen=32, keep_in_memory=True)
    recs = r.report["linears"]
    assert recs, "no linear was pruned"
    for name, rec in recs.items():
        if "pattern" in rec:
            assert rec["pattern_ok"], name
        else:
            target = rec.get("sparsity_target", 0.5)
            assert rec["sparsity"] >= target - 1.0 / rec["shape"][1] - 1e-9, name
    if "owl" in recipe:
        assert len({rec["sparsity_target"] for rec in recs.values()}) == 2
    info = squeeze.info(out)
    assert all(v["promise_ok"] for v in info["linears"].values() if "promise_ok" in v)
    cls = getattr(transformers, ARCHS[arch][1])
    plain = cls.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_outputs(plain, ids), _outputs(r.model.eval(), ids), atol=1e-5, rtol=1e-4)
