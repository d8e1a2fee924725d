"""Run-times compose (issue 14 item 3): one loaded model carries quantized or 2:4 weights,
activation sparsity and self-speculative decoding at once.

squeeze.load installs the recorded run-times on the dense model first, then swaps weights for
kernel modules (squeeze.runtime.swap): each swapped linear keeps its TEAL / WINA site (mask and
hosted thresholds) and dReLU's ReLU hook. Whole-model logits of a thresholded bf16 model are not
compared across kernels: a product rounded differently moves an activation across a threshold,
and the flips grow layer by layer (stories260k TEAL 50%: bf16 dense vs fp32 logits already differ
by 35). So each consumer is checked exactly against its own kernel on its masked input, and the
sparse int8 path against the int8 kernel within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch

import squeeze
from squeeze.runtime import act_sparse
from squeeze.runtime.quant import QuantLinear
from squeeze.runtime.sparse24 import Sparse24Linear

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"), reason="torch without int8 CPU op")


def _export(tiny_dir, tiny_calib, tmp_path_factory, name, **kw):
    out = tmp_path_factory.mktemp("compose") / name
    squeeze.compress(tiny_dir("llama"), out, calib=str(tiny_calib), nsamples=8, seqlen=32, **kw)
    return out


@pytest.fixture(scope="module")
def teal_int8(tiny_dir, tiny_calib, tmp_path_factory):
    return _export(tiny_dir, tiny_calib, tmp_path_factory, "teal-int8", method="teal", act_sparsity=0.6,
                   quantize="int8")


@pytest.fixture(scope="module")
def w24_teal(tiny_dir, tiny_calib, tmp_path_factory):
    return _export(tiny_dir, tiny_calib, tmp_path_factory, "w24-teal",
                   recipe=[{"pass": "wanda", "pattern": "2:4"}, {"pass": "teal", "act_sparsity": 0.5}])


def _thresholds(model) -> dict:
    return {n: (float(sp.threshold), float(sp.sparsity)) for n, sp in act_sparse.sparsifiers(model).items()}


def _check_consumers_exact(model, kernel_type):
    """Every site consumer is a kernel module of ``kernel_type`` whose output is exactly its own
    kernel on the site's masked input, and the mask really zeroes entries."""
    consumers = act_sparse.consumers(model)
    assert consumers and all(isinstance(m, kernel_type) for m in consumers.values())
    for name, m in consumers.items():
        fwd = m.__dict__["forward"]
        x = act_sparse.synthetic_input(m.__dict__["_squeeze_sparsifier"], m.in_features, 0.5, torch.bfloat16)
        with torch.no_grad():
            got = m(x)
            xm = act_sparse.masked_input(m, x)
            want = type(m).forward(m, xm)
            masked = m.__dict__["_squeeze_sparsifier"].forward(x)
        assert (masked == 0).float().mean() > 0.1, name  # the threshold bites
        assert torch.equal(xm, x if fwd.path == "dense" else masked), name  # dense: unmasked
        if fwd.path == "dense" or act_sparse.rows_kind(m) is None:
            assert torch.equal(got, want), name


def test_int8_and_teal_load_together(teal_int8):
    """An int8 + TEAL export loads in bf16 with every quantized linear still a site's consumer (it
    raised "cannot find transformer blocks" before the loader installed run-times first), with
    the thresholds the exact-dequantized load has; the dense path runs its kernel unmasked."""
    model = squeeze.load(teal_int8, dtype="bfloat16", runtime="dense", quant_kernels=True)
    exact = squeeze.load(teal_int8, dtype="bfloat16", quant_kernels=False)
    assert set(act_sparse.consumers(model)) == set(act_sparse.consumers(exact))
    assert _thresholds(model) == _thresholds(exact)
    assert set(model.state_dict()) >= {k for k in exact.state_dict() if ".act_sparse." in k}
    _check_consumers_exact(model, QuantLinear)


@pytest.fixture(scope="module")
def teal_int4(tiny_dir, tiny_calib, tmp_path_factory):
    return _export(tiny_dir, tiny_calib, tmp_path_factory, "teal-int4", method="teal", act_sparsity=0.6,
                   quantize="int4", group_size=32)


@pytest.mark.parametrize("native", [True, False], ids=["site-call", "torch-path"])
@pytest.mark.parametrize("which", ["teal_int8", "teal_int4"])
def test_quantized_sparse_path_reads_active_codes_only(which, native, request, monkeypatch):
    """runtime="sparse": one decode token's consumer runs the bags over the codes of its non-zero
    inputs (our C call from the unmasked input where built, or the mask, search and rows in
    torch); they agree with the weight-only kernel within bf16 rounding of scale and
    output. The dense path drops the rows copy and runs the weight-only kernel unmasked."""
    from squeeze.kernels import cpu_native

    if native and cpu_native.library() is None:
        pytest.skip(f"native kernels unavailable here: {cpu_native.unavailable_reason()}")
    path = request.getfixturevalue(which)
    model = squeeze.load(path, dtype="bfloat16", runtime="sparse", quant_kernels=True)
    name, lin = next((n, m) for n, m in act_sparse.consumers(model).items() if n.endswith("down_proj"))
    assert act_sparse.rows_kind(lin) == "quant" and lin.rows is not None
    sp = lin.__dict__["_squeeze_sparsifier"]
    x = act_sparse.synthetic_input(sp, lin.in_features, 0.3, torch.bfloat16)
    fn, prepared = lin.rows
    calls = []
    lin.rows = (lambda *a: calls.append("torch") or fn(*a), prepared)
    site = cpu_native.SiteRows.__call__
    monkeypatch.setattr(cpu_native.SiteRows, "__call__", lambda *a: calls.append("site") or site(*a))
    if not native:
        monkeypatch.setattr(act_sparse._SiteForward, "_native", lambda *a: None)
    with torch.no_grad():
        sparse = lin(x).float()
        ran = list(calls)  # (the float32 load below times its own plans)
        act_sparse.set_path(lin, "dense")
        assert lin.rows is None and act_sparse.rows_kind(lin) is None
        assert torch.equal(lin(x), type(lin).forward(lin, x))  # the dense path: its own kernel, unmasked
        xm = sp.forward(x)
        dense = type(lin).forward(lin, xm).float()
        xm = xm.float()
        w = squeeze.load(path, dtype="float32", quant_kernels=False).get_submodule(name).weight
        mag = xm.abs() @ w.abs().t()
    assert (xm == 0).float().mean() > 0.5
    bound = 2 ** -7 * mag + 2 ** -8 * dense.abs() + 1e-6  # scales (and int4 zero terms) rounded to bf16
    assert ((sparse - dense).abs() <= bound).all()
    assert ran == ["site" if native else "torch"]  # the rows really ran (they can equal the op's bits)


@pytest.mark.parametrize("which", ["teal_int8", "teal_int4"])
def test_quantized_site_call_gives_the_torch_paths_bits(which, request, monkeypatch):
    """Decode calls of 1 and 3 tokens of a TEAL + int8 / int4 model through our one C call per
    linear give the logits of the torch path (mask, search, then the row sums over the codes)
    bit for bit."""
    from squeeze.kernels import cpu_native

    if cpu_native.library() is None:
        pytest.skip(f"native kernels unavailable here: {cpu_native.unavailable_reason()}")
    model = squeeze.load(request.getfixturevalue(which), dtype="bfloat16", runtime="sparse", quant_kernels=True)
    calls = []
    site = cpu_native.SiteRows.__call__
    monkeypatch.setattr(cpu_native.SiteRows, "__call__", lambda *a: calls.append(1) or site(*a))
    ids = torch.randint(3, 128, (1, 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        native = [model(input_ids=ids[:, :n]).logits for n in (1, 3)]
        assert calls  # some consumers' rows pay at this sparsity
        monkeypatch.setattr(act_sparse._SiteForward, "_native", lambda *a: None)
        torch_path = [model(input_ids=ids[:, :n]).logits for n in (1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(native, torch_path))


def test_self_speculative_greedy_is_its_own_greedy_on_a_composed_model(teal_int8):
    """int8 weights + TEAL + self-speculative decoding in one model: drafts from layer 1, verified
    by the rest, give exactly the model's own greedy tokens."""
    model = squeeze.load(teal_int8, dtype="bfloat16", runtime="sparse", quant_kernels=True)
    prompt = [5, 17, 33, 2, 90]
    plain = squeeze.generate(model, prompt, 24)
    spec, stats = squeeze.generate(model, prompt, 24, self_speculative=True, exit_layer=1, num_speculations=3,
                                   return_stats=True)
    assert torch.equal(spec, plain)
    assert stats["mode"] == "self_speculative"


def test_24_and_teal_on_the_24_kernel(w24_teal):
    """2:4 weights on their compressed kernel (forced, as on CUDA) keep the TEAL sites: they ran
    unmasked, or failed to load, when the swap came before the sites."""
    model = squeeze.load(w24_teal, dtype="bfloat16", sparse24=True)
    exact = squeeze.load(w24_teal, dtype="bfloat16", sparse24=False)
    assert set(act_sparse.consumers(model)) == set(act_sparse.consumers(exact))
    assert _thresholds(model) == _thresholds(exact)
    _check_consumers_exact(model, Sparse24Linear)


def test_drelu_hook_moves_with_the_quantized_up_projection(tiny_dir, tiny_calib, tmp_path_factory):
    """dReLU + int8: the ReLU on up_proj's output is a forward hook; the quantized module carries
    it, and the MLP (its fast path off: kernel modules) computes down(relu(gate) * relu(up))."""
    out = _export(tiny_dir, tiny_calib, tmp_path_factory, "drelu-int8",
                  method="drelu", quantize="int8")
    model = squeeze.load(out, dtype="bfloat16", quant_kernels=True)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, QuantLinear) and "_squeeze_relu_hook" in mlp.up_proj.__dict__
    x = torch.randn(1, 1, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        want = mlp.down_proj(torch.relu(mlp.gate_proj(x)) * torch.relu(type(mlp.up_proj).forward(mlp.up_proj, x)))
        assert torch.equal(mlp(x), want)
        assert (mlp.up_proj(x) >= 0).all()
