"""dReLU / ReLU-fication: the converted MLP computes relu(gate)*relu(up) (or relu(gate)*up), the
export reloads through squeeze.load with identical outputs, recovery lowers KL and resumes, and
non-gated MLPs are refused with a clear error."""

import json

import pytest
import torch
import torch.nn.functional as F

import squeeze
from squeeze.errors import SqueezeError
from squeeze.runtime import act_sparse

GATED = ["llama", "qwen3", "gemma", "phi3"]


def _mlp_by_hand(mlp, x, variant):
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
    up = up.relu() if variant == "drelu" else up
    return F.linear(gate.relu() * up, mlp.down_proj.weight)


@pytest.mark.parametrize("variant", ["drelu", "relu"])
@pytest.mark.parametrize("arch", GATED)
def test_convert_export_load(arch, variant, tiny_dir, tiny_calib, tmp_path):
    """The reloaded MLP computes the dReLU/ReLU formula (exactness against the in-memory model is the
    conformance grid's job)."""
    out = tmp_path / "o"
    squeeze.compress(tiny_dir(arch), out, method="drelu", variant=variant, calib=str(tiny_calib),
                           nsamples=4, seqlen=32)
    loaded = squeeze.load(out, runtime="sparse")  # the chunk-sparse FFN, whatever this machine measures
    mlp = loaded.model.layers[0].mlp
    x = torch.randn(3, loaded.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), _mlp_by_hand(mlp, x, variant))
        # one token: the input-sparse path on the zeros computes the same formula
        torch.testing.assert_close(mlp(x[:1]), _mlp_by_hand(mlp, x[:1], variant))
    assert any(sp.mode == "zero" for sp in act_sparse.sparsifiers(loaded).values())
    assert json.loads((out / "config.json").read_text())["model_type"] == "squeeze"  # plain loads refuse it


def test_recovery_lowers_kl_and_resumes(tiny_dir, tiny_calib, tmp_path):
    src = tiny_dir("llama")
    kw = dict(method="drelu", calib=str(tiny_calib), nsamples=4, seqlen=32, lr=1e-4, batch=2, progress=False,
              eval_rows=2)
    res = squeeze.compress(src, tmp_path / "a", recover_steps=6, **kw)
    rep = res.report["pass_reports"]["drelu"]
    assert rep["kl_after"] < rep["kl_before"]
    assert rep["down_input_zero_after"] > 0.3
    # export carries the trained weights
    loaded = squeeze.load(tmp_path / "a")
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits, rtol=0, atol=0)
    # resumable: a run interrupted after step 3 (state of step 2 on disk) and rerun ends with the same tensors
    from squeeze.passes import drelu as mod

    folder, real = tmp_path / "state", mod.train

    def interrupted(*a, on_step=None, **k):
        def stop(step, total, loss):
            if step == 3:
                raise KeyboardInterrupt

        return real(*a, on_step=stop, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            squeeze.compress(src, tmp_path / "b", recover_steps=6, resume=str(folder), save_every=2, **kw)
    assert json.loads((folder / "state.json").read_text())["step"] == 2
    res_b = squeeze.compress(src, tmp_path / "b", recover_steps=6, resume=str(folder), save_every=2, **kw)
    assert res_b.report["pass_reports"]["drelu"]["train"]["resumed_from"] == 2
    trained = dict(res.model.named_parameters())
    for n, p in res_b.model.named_parameters():  # same batches and optimizer state: exactly the same model
        assert torch.equal(p, trained[n]), n
    assert not folder.exists()


def test_non_gated_refused(tiny_dir, tmp_path):
    with pytest.raises(SqueezeError, match="gated MLP"):
        squeeze.compress(tiny_dir("gpt2"), tmp_path / "o", method="drelu")
