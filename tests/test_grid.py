"""Every adapter x {magnitude, wanda} x {2:4, 4:8, 50%} on tiny random checkpoints: the promised
pattern holds on every targeted linear, and the export loads with plain from_pretrained and gives
the same outputs as the in-memory compressed model."""

import pytest
import torch

import squeeze
from squeeze.adapters import Adapter
from squeeze.modeling import model_class
from squeeze.sparsity import satisfies_nm
from tests.tiny import ARCHS

SETTINGS = [("pattern", "2:4"), ("pattern", "4:8"), ("sparsity", 0.5)]


def _outputs(model, ids):
    out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).detach()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_grid(arch, method, tiny_dir, tiny_calib, tmp_path):
    src = tiny_dir(arch)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for key, value in SETTINGS:
        out = tmp_path / f"{key}-{value}".replace(":", "of")
        res = squeeze.compress(src, out, method=method, calib=str(tiny_calib), nsamples=16, seqlen=32,
                               **{key: value})
        lin = res.report["linears"]
        adapter = Adapter(res.model)
        expected = sum(len(adapter.block(i).linears) for i in range(len(adapter)))
        assert len(lin) == expected > 0
        for name, rec in lin.items():
            w = res.model.get_submodule(name).weight
            w = w if isinstance(res.model.get_submodule(name), torch.nn.Linear) else w.t()
            if key == "pattern":
                n, m = map(int, value.split(":"))
                assert rec["pattern_ok"] and satisfies_nm(w, n, m), name
                assert abs(rec["sparsity"] - (1 - n / m)) < 1e-6
            else:
                per_row = (w == 0).sum(1)
                assert (per_row >= int(w.shape[1] * value)).all(), name
        # embeddings / LM head untouched
        assert all(".layers." in n or ".h." in n or ".layer." in n for n in lin)
        cls = model_class(res.model.config)
        reloaded = cls.from_pretrained(out).eval()
        with torch.no_grad():
            a, b = _outputs(reloaded, ids), _outputs(res.model, ids)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (out / "squeeze.json").is_file() and (out / "config.json").is_file()
