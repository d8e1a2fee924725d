"""Load-time plans (squeeze.runtime.plan): sparse or dense path from timings measured on this
machine, cached per machine and shape; the dense paths compute what the export means.

Timings are injected through the planner's clock (a fake clock the benchmarked callables advance),
so every decision asserted here is the real decision code's, and nothing asserts a real timing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import squeeze
from squeeze.errors import SqueezeError
from squeeze.runtime import act_sparse, drelu
from squeeze.runtime.plan import Candidate, PlanCache, machine, plan, resolve_mode, summary_line


class FakeClock:
    """A clock only the benchmarked callables move: each call of a path costs its set seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def cost(self, seconds: float):
        def fn():
            self.now += seconds
        return fn


def _candidates(clock, sparse_s, dense_s, applied, key=("64x64", "float32"), n=2, benched=None):
    def bench():
        if benched is not None:
            benched.append(key)
        return clock.cost(sparse_s), clock.cost(dense_s)

    return [Candidate("act_sparse", key, bench, lambda p, i=i: applied.__setitem__(i, p)) for i in range(n)]


@pytest.mark.parametrize("sparse_s, dense_s, want", [(2.0, 1.0, "dense"), (1.0, 2.0, "sparse"),
                                                     (0.98, 1.0, "dense")])  # inside the 5% margin: dense
def test_plan_follows_measured_timings(tmp_path, sparse_s, dense_s, want):
    clock, applied = FakeClock(), {}
    [d] = plan(_candidates(clock, sparse_s, dense_s, applied), "auto", PlanCache(tmp_path), clock=clock)
    assert (d.path, d.how, d.modules) == (want, "measured", 2)
    assert d.ratio == pytest.approx(dense_s / sparse_s)
    assert applied == {0: want, 1: want}  # every module of the key gets the decision


def test_cache_round_trips_keyed_by_shape_and_threads(tmp_path):
    clock, applied, benched = FakeClock(), {}, []
    one = machine(threads=1)
    plan(_candidates(clock, 2.0, 1.0, applied, benched=benched), "auto", PlanCache(tmp_path, one), clock=clock)
    assert benched == [("64x64", "float32")] * 2  # both modules of the key: the timing cycles over them
    # same machine, threads and key: from the file, not measured again
    [d] = plan(_candidates(clock, 1.0, 9.0, applied, benched=benched), "auto", PlanCache(tmp_path, one), clock=clock)
    assert (d.path, d.how, len(benched)) == ("dense", "cached", 2)
    # another shape is another key; another thread count another file
    [d] = plan(_candidates(clock, 1.0, 2.0, applied, key=("128x64", "float32"), benched=benched), "auto",
               PlanCache(tmp_path, one), clock=clock)
    assert (d.path, d.how) == ("sparse", "measured")
    two = PlanCache(tmp_path, machine(threads=2))
    assert two.path != PlanCache(tmp_path, one).path and two.entries == {}
    [d] = plan(_candidates(clock, 1.0, 2.0, applied, benched=benched), "auto", two, clock=clock)
    assert (d.path, d.how) == ("sparse", "measured")
    saved = json.loads(PlanCache(tmp_path, one).path.read_text())
    assert saved["machine"] == one and len(saved["plans"]) == 2


def test_timing_cycles_over_the_modules_of_a_key(tmp_path):
    """Decode reads each weight once per token: the timed calls go to every module of the key in
    turn (up to ROTATE), not to one module whose weights stay in cache."""
    from squeeze.runtime.plan import ROTATE

    clock, calls = FakeClock(), []

    def candidate(i):
        def bench():
            def run(path):
                def fn():
                    calls.append((i, path))
                    clock.now += 1.0
                return fn
            return run("sparse"), run("dense")
        return Candidate("act_sparse", ("64x64", "float32"), bench, lambda p: None)

    plan([candidate(i) for i in range(ROTATE + 3)], "auto", PlanCache(tmp_path), clock=clock)
    timed = calls[2 * ROTATE:]  # after one warm-up call of each path of each module
    assert {i for i, p in calls[:2 * ROTATE]} == set(range(ROTATE))
    assert len({i for i, p in timed if p == "sparse"}) > 1 and len({i for i, p in timed if p == "dense"}) > 1
    assert max(i for i, _ in calls) == ROTATE - 1


@pytest.mark.parametrize("garbage", ["{not json", '{"machine": 1, "plans": []}', '{"plans": {"k": {"sparse_s": -1}}}'])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, garbage):
    cache = PlanCache(tmp_path)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text(garbage)
    clock, applied = FakeClock(), {}
    [d] = plan(_candidates(clock, 1.0, 2.0, applied), "auto", PlanCache(tmp_path), clock=clock)
    assert (d.path, d.how) == ("sparse", "measured")
    assert len(json.loads(cache.path.read_text())["plans"]) == 1
    assert not list(cache.path.parent.glob(".*tmp*"))  # written through a temp file, renamed into place


def test_forced_modes_measure_nothing(tmp_path, monkeypatch):
    clock, applied = FakeClock(), {}
    cands = _candidates(clock, 1.0, 2.0, applied)
    for c in cands:
        c.bench = lambda: pytest.fail("measured under a forced mode")
    [d] = plan(cands, "dense", PlanCache(tmp_path), clock=clock)
    assert (d.path, d.how, applied) == ("dense", "forced", {0: "dense", 1: "dense"})
    assert resolve_mode(None) == "auto"
    monkeypatch.setenv("SQUEEZE_RUNTIME", "sparse")
    assert resolve_mode(None) == "sparse" and resolve_mode("dense") == "dense"  # the argument wins
    monkeypatch.setenv("SQUEEZE_RUNTIME", "fast")
    with pytest.raises(SqueezeError, match="SQUEEZE_RUNTIME"):
        resolve_mode(None)
    with pytest.raises(SqueezeError, match="runtime must be one of"):
        resolve_mode("fastest")


# -- the run-times ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teal_export(tiny_dir, tiny_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "teal"
    squeeze.compress(tiny_dir("llama"), out, method="teal", act_sparsity=0.6, calib=str(tiny_calib),
                     nsamples=8, seqlen=32)
    return out


def _decode_logits(model, ids):
    """Logits of the last of ``ids`` fed one token at a time (batch-1 decode: the planned path)."""
    from squeeze.compat import cache_kwargs, new_cache

    cache, out = new_cache(model.config), None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits
    return out


def test_teal_dense_path_is_the_unmasked_model_and_sparse_keeps_the_export(teal_export, tiny_dir):
    """runtime="dense": every consumer runs the dense path, which is the unmasked source's model
    (the thresholds only serve the sparse kernel); runtime="sparse" is exactly the masked model
    compress scored (the sparsifier's mask, then the module's own forward), at decode and prefill."""
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    dense = squeeze.load(teal_export, runtime="dense")
    assert {f.path for f in map(lambda m: m.__dict__["forward"], act_sparse.consumers(dense).values())} == {"dense"}
    assert dense.squeeze_runtime["summary"]["act_sparse"]["dense"] == len(act_sparse.consumers(dense))
    src = squeeze.load(tiny_dir("llama"))
    torch.testing.assert_close(_decode_logits(dense, ids), _decode_logits(src, ids), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, src(input_ids=ids).logits, rtol=0, atol=0)
    sparse = squeeze.load(teal_export, runtime="sparse")
    ref = squeeze.load(teal_export, runtime="sparse")
    for sp in act_sparse.sparsifiers(ref).values():
        sp.sparse_decode = False  # the general path: sparsifier.forward, then nn.Linear.forward
    masked = _decode_logits(ref, ids)
    assert (masked - _decode_logits(src, ids)).abs().max() > 1e-3  # thresholding changes outputs
    torch.testing.assert_close(_decode_logits(sparse, ids), masked, rtol=1e-5, atol=1e-5)  # kernel sum order
    with torch.inference_mode():  # tensors without a version counter: the shared mask keys on identity
        torch.testing.assert_close(sparse(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_teal_sparse_and_dense_paths_agree_to_rounding(teal_export):
    """One consumer, one decode token: the input-sparse kernel and the dense GEMV sum the same
    products in another order, so they agree within in_features * eps(fp32) * sum|x w|."""
    model = squeeze.load(teal_export, runtime="sparse")
    name, lin = next((n, m) for n, m in act_sparse.consumers(model).items() if n.endswith("down_proj"))
    assert "_squeeze_wt" not in lin.__dict__  # the kernel's transposed copy: built on first sparse call
    sp = lin.__dict__["_squeeze_sparsifier"]
    x = act_sparse.synthetic_input(sp, lin.in_features, 0.4, torch.float32)
    with torch.no_grad():
        sparse = lin(x)
        assert "_squeeze_wt" in lin.__dict__
        act_sparse.set_path(lin, "dense")
        assert "_squeeze_wt" not in lin.__dict__  # the dense path holds no second copy of the weight
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # the dense path: unmasked
        assert act_sparse.masked_input(lin, x) is x
        xm = sp.forward(x)
        dense = F.linear(xm, lin.weight, lin.bias)
        bound = lin.in_features * torch.finfo(torch.float32).eps * (xm.abs() @ lin.weight.abs().t())
    assert (xm == 0).float().mean() > 0.3  # the synthetic input hits the site's threshold
    assert ((sparse - dense).abs() <= bound).all()


def test_plan_times_each_path_as_decode_runs_it(teal_export):
    """The timed callables keep one forward each and feed a new tensor every call, so the sparse
    path masks each input as a decode token does (no per-input cache answers), and the dense
    callable is the unmasked forward."""
    model = squeeze.load(teal_export, runtime="dense")
    cand = next(c for c in act_sparse.plan_candidates(model) if c.key[0].endswith("x128"))  # a down_proj
    assert cand.dense_means == act_sparse.DENSE_MEANS
    sparse_fn, dense_fn = cand.bench()
    forward = next(c.cell_contents for c in sparse_fn.__closure__
                   if isinstance(c.cell_contents, act_sparse._SiteForward))
    sp = forward._module().__dict__["_squeeze_sparsifier"]
    seen = []
    forward._sparse = lambda x, _run=forward._sparse: seen.append(x) or _run(x)  # the input of each call
    with torch.no_grad():
        sparse_fn()  # the warm-up call the planner makes
        seen.clear()
        for _ in range(4):
            sparse_fn()
        y = dense_fn()
    assert seen[0] is not seen[1] and seen[0] is seen[2] and seen[1] is seen[3]  # a new tensor each call
    lin = forward._module()
    x = act_sparse.synthetic_input(sp, lin.in_features, float(cand.key[4].split("=")[1]), lin.weight.dtype)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))


def test_auto_decides_from_the_measured_plan(teal_export, monkeypatch):
    """squeeze.load's auto mode applies the planner's decision, measured through the clock seam:
    consumers run the path the (injected) timings favour."""
    from squeeze.runtime import plan as plan_mod

    real = plan_mod.time_paths
    for favour in ("sparse", "dense"):
        # the sparse callable costs 1 s and the dense 3 s (or the reverse) on a fake clock
        def fake(sparse_fn, dense_fn, repeats=5, clock=None, _f=favour):
            c = FakeClock()
            s, d = (1.0, 3.0) if _f == "sparse" else (3.0, 1.0)
            return real(lambda: (sparse_fn(), c.cost(s)()), lambda: (dense_fn(), c.cost(d)()), repeats, c)

        monkeypatch.setattr(plan_mod, "time_paths", fake)
        monkeypatch.setenv("SQUEEZE_CACHE", str(teal_export.parent / f"cache-{favour}"))
        model = squeeze.load(teal_export)
        paths = {m.__dict__["forward"].path for m in act_sparse.consumers(model).values()}
        assert paths == {favour}
        if favour == "dense":  # timing the sparse path left no transposed weight copies behind
            assert not any("_squeeze_wt" in m.__dict__ for m in act_sparse.consumers(model).values())
        s = model.squeeze_runtime["summary"]["act_sparse"]
        assert s["how"] == "measured"
        assert s["ratio_min"] == pytest.approx(3.0 if favour == "sparse" else 1 / 3, abs=1e-3)


def test_info_shows_the_decision(teal_export, monkeypatch, capsys):
    from squeeze.cli.main import main

    monkeypatch.setenv("SQUEEZE_RUNTIME", "dense")
    try:
        main(["info", str(teal_export), "--threads", "1"])
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    n = len(act_sparse.consumers(squeeze.load(teal_export)))
    assert "run-time paths on this machine (1 threads, runtime dense)" in out
    assert f"act_sparse: dense path on {n} modules, activations unmasked (forced)" in out
    assert summary_line("act_sparse", {"sparse": 2, "dense": 0, "how": "measured", "ratio_min": 1.5,
                                       "ratio_max": 2.0}) == \
        "act_sparse: sparse path on 2 modules (sparse path runs at 1.50-2.00x the dense path's speed; measured)"


@pytest.mark.parametrize("variant", ["drelu", "relu"])
def test_relu_ffn_dense_path_is_the_module_forward(variant, tiny_dir, tiny_calib, tmp_path):
    out = tmp_path / "o"
    squeeze.compress(tiny_dir("llama"), out, method="drelu", variant=variant, calib=str(tiny_calib),
                     nsamples=4, seqlen=32)
    model = squeeze.load(out, runtime="dense")
    mlps = drelu.fast_mlps(model)
    assert mlps and {m.__dict__["forward"].path for m in mlps.values()} == {"dense"}
    mlp = next(iter(mlps.values()))
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert mlp.down_proj.__dict__["forward"].path == "dense"  # its own zero-marking site follows the MLP
    with torch.no_grad():
        own = type(mlp).forward(mlp, x)  # gate, act, up with its ReLU hook, down: the module's own forward
        torch.testing.assert_close(mlp(x), own, rtol=0, atol=0)
        drelu.set_path(mlp, "sparse")
        torch.testing.assert_close(mlp(x), own)  # the chunk-sparse FFN: the same function, to fp32 rounding


def test_sparse24_on_cpu_dense_path_is_the_decoded_linear(tiny_pruned):
    from squeeze.runtime.sparse24 import Sparse24Linear

    _, export = tiny_pruned
    dense, sparse = squeeze.load(export, runtime="dense"), squeeze.load(export, runtime="sparse")
    n24 = sum(isinstance(m, Sparse24Linear) for m in sparse.modules())
    assert n24 and not any(isinstance(m, Sparse24Linear) for m in dense.modules())
    assert sparse.squeeze_runtime["summary"]["sparse24"]["sparse"] == n24
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    # the same decoded weights and F.linear; a GEMV on another allocation may round differently
    torch.testing.assert_close(_decode_logits(dense, ids), _decode_logits(sparse, ids))


def test_speculative_only_by_default_when_it_paid():
    from torch import nn

    from squeeze.runtime.speculative import speculative_pays

    m = nn.Linear(1, 1)
    for record, want in (({}, False), ({"self_speculative": {"exit_layer": 1, "speedup": 0.8}}, False),
                         ({"self_speculative": {"exit_layer": 1, "speedup": 1.3}}, True),
                         ({"self_speculative": {"exit_layer": 1}}, True)):  # set by hand: as asked
        m.squeeze_record = record
        assert speculative_pays(m) is want
