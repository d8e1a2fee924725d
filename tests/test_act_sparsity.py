"""Activation sparsity (TEAL / WINA): threshold math on hand-made tensors, the run-time decode path
against dense, and the pass x every tiny architecture: compress -> export -> squeeze.load gives
the same outputs as the in-memory sparse model, the requested sparsity holds, 0% is exact."""

import pytest
import torch

import squeeze
from squeeze.errors import SqueezeError
from squeeze.algorithms.actsparse import (
    column_norms,
    greedy_allocation,
    mask_threshold,
    mask_topk,
    scores,
    threshold_for,
    weighted_sparsity,
)
from squeeze.runtime import act_sparse
from tests.tiny import ARCHS


def _heavy_tailed(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n, d)) if seed is None else \
        torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.2) ** 2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.8])
def test_threshold_hits_sparsity_on_held_out(target, weighted):
    calib, held = _heavy_tailed(2048, 64, 0), _heavy_tailed(2048, 64, 1)
    scale = torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5 if weighted else None
    t = threshold_for(scores(calib, scale).flatten().sort().values, target)
    got = (mask_threshold(held, t, scale) == 0).float().mean().item()
    assert abs(got - target) < 0.02, (got, target)


def test_threshold_and_topk_by_hand():
    x = torch.tensor([[0.1, -3.0, 0.5, 2.0], [-0.2, 0.05, 4.0, -1.0]])
    assert threshold_for(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5) == 2.0
    assert threshold_for(torch.tensor([1.0, 2.0]), 0.0) == 0.0
    assert torch.equal(mask_threshold(x, 0.5), torch.tensor([[0.0, -3.0, 0.0, 2.0], [0.0, 0.0, 4.0, -1.0]]))
    assert torch.equal(mask_topk(x, 0.5), torch.tensor([[0.0, -3.0, 0.0, 2.0], [0.0, 0.0, 4.0, -1.0]]))
    # WINA: a small input feeding a large column survives
    scale = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert mask_topk(x, 0.5, scale)[0, 0] == 0.1 and mask_topk(x, 0.5, scale)[0, 2] == 0.0
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert torch.allclose(column_norms(w), torch.tensor([5.0, 1.0]))


def test_greedy_puts_sparsity_where_it_is_cheap():
    sizes = {"a": 100, "b": 300}
    cost = {"a": 10.0, "b": 1.0}
    alloc = greedy_allocation(sizes, 0.5, lambda s: sum(cost[k] * v ** 2 for k, v in s.items()), step=0.05)
    assert abs(weighted_sparsity(alloc, sizes) - 0.5) < 1e-6
    assert alloc["b"] > alloc["a"]


def _logits(model, ids):
    out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).detach()


def test_zero_sparsity_is_exactly_dense(tiny_dir, tiny_calib, tmp_path):
    src = tiny_dir("llama")
    res = squeeze.compress(src, tmp_path / "o", method="teal", act_sparsity=0.0, calib=str(tiny_calib),
                           nsamples=8, seqlen=32)
    assert act_sparse.sparsifiers(res.model)  # installed, but pass-through
    dense = squeeze.load(src)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_logits(res.model, ids), _logits(dense, ids))
        assert torch.equal(_logits(res.model, ids[:1, :1]), _logits(dense, ids[:1, :1]))


def test_bad_settings(tiny_dir, tmp_path):
    with pytest.raises(SqueezeError, match="act-sparsity"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="teal", act_sparsity=1.5)
    with pytest.raises(SqueezeError, match="allocation"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="wina", allocation="best")


def _down_input_sparsity(model, ids):
    """Fraction of zero inputs reaching every MLP-intermediate consumer (after the mask)."""
    from squeeze.adapters import Adapter

    adapter = Adapter(model)
    zeros, total, hs = [0], [0], []
    for i in range(len(adapter)):
        for lin in adapter.block(i).by_role("down"):
            def hook(m, args, out):
                x = act_sparse.masked_input(m, args[0])  # what it multiplies (the mask runs in its forward)
                zeros[0] += int((x == 0).sum())
                total[0] += x.numel()
            hs.append(lin.module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    return zeros[0] / max(total[0], 1)


GREEDY_ARCHS = ("llama", "gpt2")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_calibration_hits_target_on_every_arch(arch, tiny_dir, tiny_calib, tmp_path):
    """TEAL (uniform) and WINA (greedy on a few archs, else uniform) reach the asked sparsity on every
    architecture, and TEAL's thresholds hold it on held-out tokens. (That the exports reload to the
    same outputs, full and one-token calls, is the conformance grid's job.)"""
    src = tiny_dir(arch)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = _logits(squeeze.load(src), ids)
    for method in ("teal", "wina"):
        allocation = "greedy" if method == "wina" and arch in GREEDY_ARCHS else "uniform"
        res = squeeze.compress(src, tmp_path / method, method=method, act_sparsity=0.5, allocation=allocation,
                               calib=str(tiny_calib), nsamples=4, seqlen=32, greedy_step=0.1,
                               greedy_tokens=64)
        rep = res.report["pass_reports"][method]
        assert len(rep) == 2 and all(abs(b["weighted"] - 0.5) < 0.01 for b in rep.values())
        with torch.no_grad():
            assert not torch.allclose(_logits(res.model, ids), d)  # the sparsity does something
        if method == "teal":
            held = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(5))
            got = _down_input_sparsity(res.model, held)
            assert abs(got - 0.5) < 0.15, got  # held-out tokens, tiny random model


@pytest.mark.parametrize("tokens, method", [(1, "site"), (3, "site"), (1, "bag"), (4, "gather")])
def test_decode_path_equals_dense_path(tiny_dir, tiny_calib, tmp_path, monkeypatch, tokens, method):
    """squeeze.load-ed decode through the kernels' input-sparse linear (forced to one method;
    "site": our C call from the unmasked input, "bag" / "gather": the torch-side paths on the
    masked input) gives the logits of the same model with the sparse path off."""
    from squeeze.kernels import cpu_input_sparse as kern
    from squeeze.kernels import cpu_native

    if method == "site" and cpu_native.library() is None:
        pytest.skip(f"native kernels unavailable here: {cpu_native.unavailable_reason()}")
    src = tiny_dir("llama")
    squeeze.compress(src, tmp_path / "o", method="teal", act_sparsity=0.7, calib=str(tiny_calib),
                     nsamples=8, seqlen=32)
    model = squeeze.load(tmp_path / "o", runtime="sparse")  # the kernels, whatever this machine measures
    ids = torch.randint(3, 128, (1, tokens), generator=torch.Generator().manual_seed(3))
    forced = kern.InputSparsePlan(1e9, 0.0) if method != "gather" else kern.InputSparsePlan(0.0, 1.0)
    monkeypatch.setattr(act_sparse, "plan_for", lambda dtype, t: forced)
    if method != "site":
        monkeypatch.setattr(act_sparse._SiteForward, "_native", lambda *a: None)
    calls = []
    for name in ("linear_rows_bag", "linear_rows_gather"):
        orig = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    site = cpu_native.SiteRows.__call__
    monkeypatch.setattr(cpu_native.SiteRows, "__call__", lambda *a: calls.append("site") or site(*a))
    searched = []
    monkeypatch.setattr(act_sparse, "nonzero_entries", lambda y: searched.append(1) or kern.nonzero_entries(y))
    with torch.no_grad():
        sparse = _logits(model, ids)
        assert set(calls) == {method if method == "site" else f"linear_rows_{method}"}, calls
        if method == "bag":  # one search of the non-zeros per site input, shared by q/k/v and gate/up
            sites = len(act_sparse.sparsifiers(model))
            assert len(searched) == sites < len(calls) == len(act_sparse.consumers(model)), (searched, calls)
        if method == "site":  # no torch search at all
            assert not searched and len(calls) == len(act_sparse.consumers(model))
        calls.clear()
        for sp in act_sparse.sparsifiers(model).values():
            sp.sparse_decode = False
        dense = _logits(model, ids)
        assert not calls
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["teal", "wina", "rotated", "zero"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_site_call_gives_the_torch_paths_bits(site, dtype, tiny_dir, tiny_calib, tmp_path, monkeypatch):
    """Calls of 1 and 3 tokens through cpu_native.SiteRows (mask, search and rows in one C call,
    from the unmasked input) give the logits of the torch path (mask, search, then the row sums)
    bit for bit, at every kind of site: TEAL, WINA's weighted scores, WINA rotated, and a site
    that only skips its zeros (mode zero)."""
    from squeeze.kernels import cpu_input_sparse as kern
    from squeeze.kernels import cpu_native

    if cpu_native.library() is None:
        pytest.skip(f"native kernels unavailable here: {cpu_native.unavailable_reason()}")
    kw = {"teal": {"method": "teal"}, "zero": {"method": "teal"}, "wina": {"method": "wina", "allocation": "uniform"},
          "rotated": {"method": "wina", "allocation": "uniform", "transform": True}}[site]
    squeeze.compress(tiny_dir("llama"), tmp_path / "o", act_sparsity=0.6, calib=str(tiny_calib), nsamples=4,
                     seqlen=32, **kw)
    model = squeeze.load(tmp_path / "o", runtime="sparse", dtype=dtype)
    if site == "zero":
        for sp in act_sparse.sparsifiers(model).values():
            sp.mode = "zero"
            sp.refresh()
    monkeypatch.setattr(act_sparse, "plan_for", lambda dtype, t: kern.InputSparsePlan(1e9, 0.0))
    calls = []
    call = cpu_native.SiteRows.__call__
    monkeypatch.setattr(cpu_native.SiteRows, "__call__", lambda *a: calls.append(1) or call(*a))
    ids = torch.randint(3, 128, (2, 1, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        native = [_logits(model, i[..., :n]) for i in ids for n in (1, 3)]
        assert len(calls) == 4 * len(act_sparse.consumers(model))
        monkeypatch.setattr(act_sparse._SiteForward, "_native", lambda *a: None)
        torch_path = [_logits(model, i[..., :n]) for i in ids for n in (1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(native, torch_path))


def test_decode_skips_counting_when_sparse_cannot_pay(tiny_dir, tiny_calib, tmp_path, monkeypatch):
    """At 30% sparsity an 8-token chunk's union is ~all inputs: the plan check sends every call to
    the dense forward without touching the kernels."""
    from squeeze.kernels import cpu_input_sparse as kern

    res = squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="teal", act_sparsity=0.3,
                           calib=str(tiny_calib), nsamples=8, seqlen=32)
    from squeeze.kernels import cpu_native

    monkeypatch.setattr(act_sparse, "input_sparse_linear_cpu", lambda *a, **k: pytest.fail("kernel called"))
    monkeypatch.setattr(cpu_native.SiteRows, "__call__", lambda *a, **k: pytest.fail("kernel called"))
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _logits(res.model, ids)
        monkeypatch.setattr(act_sparse, "plan_for", lambda dtype, t: kern.InputSparsePlan(1e9, 1.0))
        for sp in act_sparse.sparsifiers(res.model).values():
            sp.refresh()  # plans are cached per sparsifier generation
        with pytest.raises(pytest.fail.Exception):
            _logits(res.model, ids)  # the check above really was the plan's doing


def test_prune_then_sparsify_recipe(tiny_dir, tiny_calib, tmp_path):
    """Weight pruning then TEAL in one recipe: TEAL calibrates on the pruned block (it replays the
    block as changed by the passes before it)."""
    out = tmp_path / "o"
    kw = dict(calib=str(tiny_calib), nsamples=4, seqlen=32)
    res = squeeze.compress(tiny_dir("llama"), out, recipe=[{"pass": "wanda", "sparsity": 0.5},
                                                            {"pass": "teal", "act_sparsity": 0.4}], **kw)
    alone = squeeze.compress(tiny_dir("llama"), tmp_path / "t", method="teal", act_sparsity=0.4, **kw)
    assert res.report["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert res.report["forwards_per_block"] == 2  # wanda's statistics, propagation (TEAL replays)
    after, before = res.report["pass_reports"]["teal"]["0"], alone.report["pass_reports"]["teal"]["0"]
    assert after["attn_in"]["threshold"] == before["attn_in"]["threshold"]  # the block's input: same
    assert after["mlp_mid"]["threshold"] != before["mlp_mid"]["threshold"]  # downstream of pruned weights
    loaded = squeeze.load(out, runtime="sparse")  # the masked model, whatever this machine measures
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded, ids), _logits(res.model, ids), rtol=0, atol=0)


def test_every_site_hits_target_with_all_sites_sparse(tiny_dir, tiny_calib, tmp_path):
    """Downstream sites are calibrated on the activations they see with the upstream sites
    already sparse, so each site's realised sparsity is the target (here on the calibration rows)."""
    import json

    from squeeze.adapters import Adapter

    res = squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="teal", act_sparsity=0.8,
                           calib=str(tiny_calib), nsamples=16, seqlen=32, dense_prefix=0.0)
    adapter = Adapter(res.model)
    seen: dict[str, list] = {}
    hs = []
    for i in range(len(adapter)):
        for name, sp in act_sparse.sparsifiers(adapter.blocks[i]).items():
            host = adapter.blocks[i].get_submodule(name.rpartition(".")[0])
            hs.append(host.register_forward_hook(
                lambda m, a, o, k=f"{i}.{name}": seen.setdefault(k, []).append(
                        (act_sparse.masked_input(m, a[0]) == 0).float().mean().item())))
    ids = torch.tensor([json.loads(line)["input_ids"] for line in tiny_calib.read_text().splitlines()])
    with torch.no_grad():
        res.model(input_ids=ids)
    for h in hs:
        h.remove()
    assert len(seen) == 8
    for k, v in seen.items():
        assert abs(v[0] - 0.8) < 0.03, (k, v)


def test_cli_compress_and_activation_stats(tiny_dir, tiny_calib, tmp_path, monkeypatch):
    import json

    from squeeze.cli.main import main

    monkeypatch.setenv("SQUEEZE_RUNTIME", "sparse")  # the masks kept (auto may run the unmasked dense path)
    out, js = tmp_path / "o", tmp_path / "stats.json"
    main(["compress", str(tiny_dir("llama")), "--method", "wina", "--act-sparsity", "0.5", "--allocation", "uniform",
          "--calib", str(tiny_calib), "--nsamples", "4", "--seqlen", "32", "--out", str(out)])
    assert act_sparse.sparsifiers(squeeze.load(out))
    main(["eval", str(out), "--data", str(tiny_calib), "--max-rows", "4", "--activation-stats", "--json", str(js)])
    stats = json.loads(js.read_text())["activation_stats"]
    assert set(stats["layers"]) == {"0", "1"}
    m = stats["mean"]
    assert 0.3 < m["tls"] < 0.7 and m["cls64"] is None and m["cls8"] <= m["cls2"] <= m["tls"]
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tiny_dir("gpt2")), "--method", "drelu", "--out", str(tmp_path / "g")])
    assert e.value.code == 2


def test_orthogonal_transform_math():
    from squeeze.algorithms.actsparse import orthogonal_transform

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)]  # 12 rows < 16: rank 12
    rotated, v, sv = orthogonal_transform(ws)
    torch.testing.assert_close(v.t() @ v, torch.eye(16), atol=1e-5, rtol=0)
    for w, r in zip(ws, rotated):
        torch.testing.assert_close(r @ v.t(), w, atol=1e-5, rtol=0)  # W V V^T = W
    stacked = torch.cat(rotated)
    gram = stacked.t() @ stacked
    torch.testing.assert_close(gram, torch.diag(sv ** 2), atol=1e-4, rtol=0)  # orthogonal columns
    assert torch.all(sv[12:] < 1e-6 * sv[0]) and torch.all(sv[:12] > 1e-3)  # rank 12


@pytest.mark.parametrize("arch", list(ARCHS))
def test_wina_transform_keeps_dense_outputs(arch, tiny_dir, tiny_calib, tmp_path):
    """WINA's orthogonal transform at 0% sparsity is the dense model (rotated weights, rotated
    site inputs); at 50% its export loads back to the in-memory model exactly."""
    src = tiny_dir(arch)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = _logits(squeeze.load(src), ids)
        res = squeeze.compress(src, tmp_path / "t0", method="wina", act_sparsity=0.0, transform=True,
                               calib=str(tiny_calib), nsamples=4, seqlen=32)
        rot = [sp for sp in act_sparse.sparsifiers(res.model).values() if sp.rotation.numel()]
        assert rot, "no site was rotated"
        torch.testing.assert_close(_logits(res.model, ids), d, rtol=1e-4, atol=1e-4 * float(d.abs().max()))
        res = squeeze.compress(src, tmp_path / "t5", method="wina", act_sparsity=0.5, transform=True,
                               calib=str(tiny_calib), nsamples=4, seqlen=32)
        loaded = squeeze.load(tmp_path / "t5", runtime="sparse")
        assert sum(sp.rotation.numel() > 0 for sp in act_sparse.sparsifiers(loaded).values()) == len(rot)
        torch.testing.assert_close(_logits(loaded, ids), _logits(res.model, ids), rtol=0, atol=0)
        assert not torch.allclose(_logits(loaded, ids), d)
        # the dense path drops the masks but still rotates (the stored weights are rotated)
        unmasked = _logits(squeeze.load(tmp_path / "t5", runtime="dense"), ids)
        torch.testing.assert_close(unmasked, d, rtol=1e-4, atol=1e-4 * float(d.abs().max()))


def test_wina_transform_refusals(tiny_dir, tiny_calib, tmp_path):
    with pytest.raises(SqueezeError, match="use --method wina"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="teal", transform=True)
    with pytest.raises(SqueezeError, match="zeros"):
        squeeze.compress(tiny_dir("llama"), tmp_path / "o", calib=str(tiny_calib), nsamples=4, seqlen=32,
                         recipe=[{"pass": "wanda", "sparsity": 0.5},
                                 {"pass": "wina", "act_sparsity": 0.5, "transform": True}])
    assert not (tmp_path / "o").exists()  # no half checkpoint


def test_sparse_model_deepcopies(tiny_dir, tiny_calib, tmp_path):
    import copy

    res = squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="wina", act_sparsity=0.5, transform=True,
                           calib=str(tiny_calib), nsamples=4, seqlen=32)
    clone = copy.deepcopy(res.model)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_logits(clone, ids), _logits(res.model, ids), rtol=0, atol=0)
        for sp in act_sparse.sparsifiers(clone).values():
            sp.set(0.0)  # the clone's sites are its own: changing them leaves the original alone
        assert not torch.equal(_logits(clone, ids), _logits(res.model, ids))
