"""The training loop (squeeze.train): losses by hand, seeded batches, schedule, zero masks kept,
safetensors resume that ends with exactly the uninterrupted run's tensors."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.train.batches import batch_indices, collate
from squeeze.train.distill import Distiller
from squeeze.train.losses import (
    kl_per_token,
    layerwise_relative_mse,
    masked_mean,
    mean_pool,
    pooled_cosine_loss,
    relative_mse,
)
from squeeze.train.loop import Optimisation, apply_masks, lr_at, train
from squeeze.train.state import STATE_JSON

ROOT = Path(__file__).resolve().parents[1]


# -- pure pieces ---------------------------------------------------------------------------------
def test_kl_per_token_by_hand():
    t = torch.log(torch.tensor([[[0.5, 0.5]]]))
    s = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert torch.allclose(kl_per_token(t, s), expected.reshape(1, 1), atol=1e-6)
    assert torch.allclose(kl_per_token(t + 3.0, t), torch.zeros(1, 1), atol=1e-6)  # shift-invariant, 0 at equality


def test_relative_mse_by_hand():
    t = torch.tensor([[3.0, 4.0]])
    assert float(relative_mse(t, t)) == 0.0
    assert abs(float(relative_mse(t, torch.zeros(1, 2))) - 1.0) < 1e-7
    assert abs(float(relative_mse(t, torch.tensor([[3.0, 3.0]]))) - 1 / 25) < 1e-7


def test_batch_order_is_a_seeded_epoch_permutation():
    n, bs = 10, 4
    first_epoch = [i for s in range(5) for i in batch_indices(s, bs, n, seed=7)][:n]
    assert sorted(first_epoch) == list(range(n))  # every sample once per epoch
    assert batch_indices(3, bs, n, 7) == batch_indices(3, bs, n, 7)
    assert [batch_indices(s, bs, n, 7) for s in range(3)] != [batch_indices(s, bs, n, 8) for s in range(3)]


def test_apply_masks_zeroes_grads_and_weights():
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    mask = p.detach() != 0
    p.grad = torch.ones_like(p)
    apply_masks({"w": p}, {"w": mask}, grads=True)
    assert p.grad.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    p.data += 5
    apply_masks({"w": p}, {"w": mask}, grads=False)
    assert p.data.tolist() == [[6.0, 0.0], [0.0, 7.0]]


def test_relative_mse_ignores_padding():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = relative_mse(t, s, mask)
    s2, t2 = s.clone(), t.clone()
    s2[0, 3:] += 100.0  # garbage at padded positions changes nothing
    t2[0, 3:] -= 50.0
    assert torch.allclose(relative_mse(t2, s2, mask), base)
    assert not torch.allclose(relative_mse(t2, s2), base)  # ... but counts without the mask
    assert float(relative_mse(t, t, mask)) == 0.0



def test_layerwise_relative_mse_is_the_mean_over_blocks():
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    assert float(layerwise_relative_mse(t, [x.clone() for x in t])) == 0.0
    s = [t[0], t[1] + 1.0, t[2]]  # only the middle block differs
    value = layerwise_relative_mse(t, s)
    assert value > 0
    assert torch.allclose(value, relative_mse(t[1], s[1]) / 3)
    with pytest.raises(ValueError):
        layerwise_relative_mse(t, s[:2])



def test_pooled_cosine_loss_matches_the_evaluation_metric():
    from squeeze.evaluation import _embed

    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 6, 4, generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    assert float(pooled_cosine_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(pooled_cosine_loss(t, 3.0 * t, mask)) == pytest.approx(0.0, abs=1e-6)  # direction only
    s = t + torch.randn(3, 6, 4, generator=g)
    s_padded = s.clone()
    s_padded[mask == 0] = 1e3  # padding must not leak into the mean
    loss = pooled_cosine_loss(t, s_padded, mask)
    assert loss > 0

    class Fixed(torch.nn.Module):  # returns a fixed hidden state, as squeeze.evaluate's _embed expects
        def __init__(self, h):
            super().__init__()
            self.h = h

        def forward(self, input_ids, attention_mask):
            return type("O", (), {"last_hidden_state": self.h[:, :input_ids.shape[1]]})()

    rows = [torch.arange(6), torch.arange(3), torch.arange(2)]
    cos = torch.nn.functional.cosine_similarity(_embed(Fixed(s), rows, 0), _embed(Fixed(t), rows, 0), dim=-1)
    assert float(loss) == pytest.approx(float(1 - cos.mean()), abs=1e-5)
    assert torch.allclose(mean_pool(t, mask)[2], t[2, :2].mean(0))



def test_lr_schedule():
    assert [lr_at(s, 10, 1.0, "constant", 0) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, 10, 1.0, "constant", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_at(s, 10, 1.0, "cosine", 2) for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in itertools.pairwise(cos[2:])) and 0 < cos[-1] < 0.05



def test_padded_batch_loss_equals_unpadded_rows(tiny_dir):
    """Per-sentence rows: a padded, masked batch gives each row the loss it has on its own."""
    from transformers import BertModel

    teacher = BertModel.from_pretrained(str(tiny_dir("bert"))).eval()
    student = BertModel.from_pretrained(str(tiny_dir("bert"))).eval()
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = [torch.tensor([1, 5, 9, 11, 2]), torch.tensor([1, 7, 2])]
    ids, mask = collate(rows, pad_id=0)
    d = Distiller(student, teacher, "encoder", {"pooled": 1.0})
    with torch.no_grad():
        each = [float(d.loss(r[None])) for r in rows]
        assert float(d.loss(ids, mask)) == pytest.approx(sum(each) / 2, rel=1e-4)
        assert each[0] > 0 and each[1] > 0
        for terms in ({"last": 1.0}, {"layers": 1.0}, {"layers": 1.0, "pooled": 2.0}):
            assert float(Distiller(teacher, teacher, "encoder", terms).loss(ids, mask)) == pytest.approx(0, abs=1e-6)
            assert float(Distiller(student, teacher, "encoder", terms).loss(ids, mask)) > 0


def test_masked_mean_ignores_padding():
    v = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    assert float(masked_mean(v)) == pytest.approx(4.0)
    assert float(masked_mean(v, torch.tensor([[1, 1, 0], [1, 1, 1]]))) == pytest.approx(3.0)


def test_batch_draws_depend_on_seed_and_step_only():
    for draw in ("distinct", "any"):
        assert batch_indices(3, 4, 10, 7, draw) == batch_indices(3, 4, 10, 7, draw)
        assert [batch_indices(s, 4, 10, 7, draw) for s in range(3)] != [batch_indices(s, 4, 10, 8, draw)
                                                                       for s in range(3)]
        assert all(0 <= i < 10 for i in batch_indices(5, 4, 10, 7, draw))
    assert len(set(batch_indices(2, 8, 10, 1, "distinct"))) == 8  # no row twice within a step
    with pytest.raises(ValueError):
        batch_indices(0, 2, 4, 0, "shuffle")


def test_collate_pads_and_masks():
    ids, mask = collate([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = collate([torch.tensor([5, 6]), torch.tensor([8, 9])], pad_id=0)
    assert mask is None and ids.tolist() == [[5, 6], [8, 9]]


def test_warmup_is_the_linear_ramp_drelu_and_layerskip_used():
    # dReLU and LayerSkip ramped with lr * min(1, (s + 1) / warmup) before using lr_at
    for warmup in (1, 2, 5):
        assert [lr_at(s, 40, 3e-4, "constant", warmup) for s in range(10)] == \
            pytest.approx([3e-4 * min(1.0, (s + 1) / warmup) for s in range(10)], rel=1e-12)


# -- the loop on a hand-made model ---------------------------------------------------------------
class Stop(Exception):
    pass


def _problem(seed=0):
    """A 2-layer MLP regressing a fixed random target; the first weight has zeros that must stay."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0.0
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 6, generator=g), torch.randn(20, 3, generator=g)

    def loss_at(step):
        idx = batch_indices(step, 4, len(x), seed=3)
        return ((model(x[idx]) - y[idx]) ** 2).mean()

    return model, dict(model.named_parameters()), loss_at


OPTS = [Optimisation(1e-2), Optimisation(1e-2, "adamw", "cosine", warmup=2, clip=0.5)]


@pytest.mark.parametrize("opt", OPTS, ids=["adam", "adamw-cosine-clip"])
def test_resume_gives_exactly_the_uninterrupted_tensors(opt, tmp_path):
    model, params, loss_at = _problem()
    full = train(params, loss_at, 7, opt, keep_zero=["0.weight"], folder=tmp_path / "a", save_every=2)
    want = {n: p.detach().clone() for n, p in params.items()}

    def stop_at_5(step, total, loss):
        if step == 5:
            raise Stop

    model, params, loss_at = _problem()
    with pytest.raises(Stop):
        train(params, loss_at, 7, opt, keep_zero=["0.weight"], folder=tmp_path / "b", save_every=2,
              on_step=stop_at_5)
    state = json.loads((tmp_path / "b" / STATE_JSON).read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert sorted(f.name for f in (tmp_path / "b").iterdir()) == ["state-00000004.safetensors", STATE_JSON]
    model, params, loss_at = _problem()  # a fresh process: untrained weights, resumed from the folder
    resumed = train(params, loss_at, 7, opt, keep_zero=["0.weight"], folder=tmp_path / "b", resume=True,
                    save_every=2)
    assert resumed.start == 4 and resumed.losses == full.losses and len(full.losses) == 7
    for n, p in params.items():
        assert torch.equal(p.detach(), want[n]), n
    assert not any(p.requires_grad or p.grad is not None for p in params.values())


def test_zeros_stay_zero_and_the_rest_moves():
    model, params, loss_at = _problem()
    before = {n: p.detach().clone() for n, p in params.items()}
    r = train(params, loss_at, 5, Optimisation(5e-2), keep_zero=["0.weight"])
    w = params["0.weight"].detach()
    assert torch.equal(r.masks["0.weight"], before["0.weight"] != 0)
    assert torch.all(w[:, ::2] == 0) and not torch.equal(w[:, 1::2], before["0.weight"][:, 1::2])
    assert not torch.equal(params["2.weight"], before["2.weight"])
    assert r.start == 0 and len(r.losses) == 5


def test_progress_baseline_and_state_checks(tmp_path):
    calls, seen, folder = [], [], tmp_path / "state"

    def stop_at_3(step, total, loss):
        seen.append((step, total))
        if step == 3:
            raise Stop

    model, params, loss_at = _problem()
    with pytest.raises(Stop):
        train(params, loss_at, 6, Optimisation(1e-2), folder=folder, save_every=2, on_step=stop_at_3,
              identity={"data": "x"}, baseline=lambda: calls.append(1) or {"before": 1.5})
    assert seen == [(1, 6), (2, 6), (3, 6)] and calls == [1]
    model, params, loss_at = _problem()
    with pytest.raises(SqueezeError, match="different training run"):  # other data in the fingerprint
        train(params, loss_at, 6, Optimisation(1e-2), folder=folder, resume=True, identity={"data": "y"})
    with pytest.raises(SqueezeError, match="different training run"):  # other optimisation too
        train(params, loss_at, 6, Optimisation(2e-2), folder=folder, resume=True, identity={"data": "x"})
    with pytest.raises(SqueezeError, match="past --steps 1"):
        train(params, loss_at, 1, Optimisation(1e-2), folder=folder, resume=True, identity={"data": "x"})
    r = train(params, loss_at, 6, Optimisation(1e-2), folder=folder, resume=True, identity={"data": "x"},
              baseline=lambda: calls.append(1) or {"before": 9.0})
    assert r.start == 2 and r.baseline == {"before": 1.5} and calls == [1]  # measured once, kept in the state
    model, params, loss_at = _problem()  # without resume a saved state is dropped: a fresh run
    r = train(params, loss_at, 1, Optimisation(1e-2), folder=folder, identity={"data": "x"})
    assert r.start == 0 and not folder.exists()


def test_diverging_loss_is_a_clear_error():
    model, params, _ = _problem()
    with pytest.raises(SqueezeError, match="recovery diverged at step 1"):
        train(params, lambda step: torch.tensor(float("nan"), requires_grad=True), 2, Optimisation(1e-2),
              what="recovery")


def test_no_pickled_state_anywhere():
    """Training state is safetensors + JSON: no torch.save / torch.load left in the code."""
    bad = [str(f.relative_to(ROOT)) for d in ("squeeze", "calib", "cli", "kernels") for f in (ROOT / d).rglob("*.py")
           if "torch.save(" in f.read_text() or "torch.load(" in f.read_text()]
    assert bad == []
