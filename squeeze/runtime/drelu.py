"""Run-time ReLU-fication of gated MLPs: dReLU (ReLU(gate) * ReLU(up)) or plain ReLU of the gate.

Song et al. (2024), "Turbo Sparse: Achieving LLM SOTA Performance with Minimal Activated
Parameters": dReLU, y = W_down(ReLU(W_gate x) * ReLU(W_up x)), makes most intermediate neurons
exactly zero. ``config.hidden_act`` cannot express dReLU (and the export keeps the original
config), so the conversion is applied by ``squeeze.load`` (:func:`install_recorded`): the MLP's
activation module is swapped for ``nn.ReLU`` and, for dReLU, a forward hook applies ReLU to the
up projection's output (for a fused gate_up projection: to all of it). No parameter or buffer
changes, so the state_dict keys are those of the original model. Plain ``from_pretrained`` of
such an export runs the original SiLU/GELU MLP on ReLU-trained weights: wrong outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.kernels.chunk_ffn import chunk_sparse_ffn

VARIANTS = ("drelu", "relu")


def _relu_output(module, args, output):
    return torch.relu(output)


def activation_child(mlp: nn.Module) -> str | None:
    """Name of the MLP's activation module (act_fn, activation_fn, act, ...): a parameter-free
    child that is not a linear."""
    from squeeze.adapters import is_linear

    for name, child in mlp.named_children():
        if is_linear(child) or any(True for _ in child.parameters()):
            continue
        if "act" in name.lower():
            return name
    return None


def convert_mlp(mlp: nn.Module, gate_up_linears: list, variant: str = "drelu") -> None:
    """ReLU-fy one gated MLP in place. ``gate_up_linears``: adapter ``Linear``s of role gate / up
    / gate_up inside ``mlp``. Idempotent."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} not in {VARIANTS}")
    act = activation_child(mlp)
    if act is None:
        raise ValueError(f"{type(mlp).__name__}: no activation module to replace")
    setattr(mlp, act, nn.ReLU())
    mlp.__dict__["_squeeze_relu_variant"] = variant
    install_fast_path(mlp, variant)
    if variant == "drelu":
        for lin in gate_up_linears:
            if lin.role in ("up", "gate_up") and "_squeeze_relu_hook" not in lin.module.__dict__:
                lin.module.__dict__["_squeeze_relu_hook"] = lin.module.register_forward_hook(_relu_output)


def mlp_of(block_module: nn.Module, linear_name_in_block: str) -> nn.Module:
    """The module that owns a linear (its MLP), from the linear's dotted name inside the block."""
    owner = linear_name_in_block.rpartition(".")[0]
    return block_module.get_submodule(owner) if owner else block_module


# -- decode fast path --------------------------------------------------------------------------
DECODE_TOKENS = 8


class _ReluFFNForward:
    """Replaces ``forward`` of a ReLU-fied MLP with separate gate/up/down linears. Path
    ``sparse``: decode-size calls (<= DECODE_TOKENS tokens, no grad, CPU) run the kernels'
    chunk-sparse FFN. Path ``dense``: ``down(relu(gate(x)) * relu(up(x)))`` (ReLU of the gate only
    for the ``relu`` variant) straight through the weights, the very ops the module's own forward
    and its ReLU hook run, without the hook machinery. Everything else: the module's own forward.
    Chosen at load time by a measured plan (:mod:`squeeze.runtime.plan`)."""

    def __init__(self, mlp: nn.Module, variant: str, path: str = "sparse"):
        import weakref

        self.mlp = weakref.proxy(mlp)
        self.variant = variant
        self.path = path
        self.dense = type(mlp).forward.__get__(mlp)
        self._wdt = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        tokens = x.numel() // x.shape[-1]
        if (tokens > DECODE_TOKENS or tokens == 0 or torch.is_grad_enabled() or x.device.type != "cpu"
                or not _plain(m)):  # linears swapped for kernel modules at load: their own forwards
            return self.dense(x)
        if self.path == "dense":
            return relu_ffn(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, self.variant)
        wd = m.down_proj.weight
        key = (wd.data_ptr(), wd._version, wd.dtype)
        if self._wdt is None or self._wdt[0] != key:
            self._wdt = (key, wd.detach().t().contiguous())
        x2 = x.reshape(tokens, x.shape[-1])
        # the kernels' chunk-sparse FFN: gate for every neuron, then up/down only for the neurons
        # active in any token of the chunk (dense above its measured break-even)
        y = chunk_sparse_ffn(x2, m.gate_proj.weight, m.up_proj.weight, self._wdt[1], self.variant, backend="cpu")
        return y.reshape(*x.shape[:-1], y.shape[-1])


def relu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
             variant: str) -> torch.Tensor:
    """The ReLU-fied gated MLP, dense: down(relu(x Wg^T) * up'(x Wu^T)), up' = relu for dReLU."""
    up = F.linear(x, w_up)
    return F.linear(torch.relu(F.linear(x, w_gate)) * (torch.relu(up) if variant == "drelu" else up), w_down)


def _plain(mlp: nn.Module) -> bool:
    """Separate gate/up/down ``nn.Linear`` without biases: what the fast path reads weights from."""
    lins = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(type(lin) is nn.Linear and lin.bias is None for lin in lins)


def install_fast_path(mlp: nn.Module, variant: str) -> bool:
    """Use the kernels' sparse FFN at decode for a plain gate/up/down MLP without biases."""
    if not _plain(mlp):
        return False
    if "forward" not in mlp.__dict__:
        mlp.forward = _ReluFFNForward(mlp, variant)
    return True


def fast_mlps(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), _ReluFFNForward) and _plain(m)}


def set_path(mlp: nn.Module, path: str) -> None:
    """Switch a ReLU-fied MLP (and the zero-marking site of its down projection, which its own
    forward runs for calls the fast path hands back) to ``path``."""
    from squeeze.runtime.act_sparse import set_path as set_site_path

    if path not in ("sparse", "dense"):
        raise ValueError(f"path {path!r} not in ('sparse', 'dense')")
    mlp.__dict__["forward"].path = path
    down = getattr(mlp, "down_proj", None)
    if down is not None and "_squeeze_sparsifier" in down.__dict__:
        set_site_path(down, path)


def plan_candidates(model: nn.Module) -> list:
    """One :class:`~squeeze.runtime.plan.Candidate` per ReLU-fied MLP on the fast path, keyed by
    (hidden, intermediate, dtype, variant); timed on a seeded random decode token through the
    layer's own weights (the gate decides which neurons are active, as on real tokens)."""
    from squeeze.runtime.plan import Candidate

    out = []
    for m in fast_mlps(model).values():
        fwd = m.__dict__["forward"]
        i, h = m.gate_proj.weight.shape
        dtype = m.gate_proj.weight.dtype

        def bench(_m=m, _f=fwd, _h=h, _dtype=dtype):
            x = torch.randn(1, 1, _h, generator=torch.Generator().manual_seed(0)).to(_dtype)
            sparse, dense = _ReluFFNForward(_m, _f.variant, "sparse"), _ReluFFNForward(_m, _f.variant, "dense")
            return (lambda: sparse(x)), (lambda: dense(x))

        key = (f"{h}x{i}", str(dtype).removeprefix("torch."), fwd.variant, "tokens=1")
        out.append(Candidate("relu_ffn", key, bench, lambda p, _m=m: set_path(_m, p)))
    return out


def convert_block(block, gate, variant: str) -> None:
    """ReLU-fy the MLP that the adapter ``Linear`` ``gate`` (gate or fused gate_up) belongs to in
    ``block``, and mark its (now naturally sparse) intermediate so decode skips its zeros."""
    from squeeze.runtime.act_sparse import ActSparsifier, block_sites, install

    inner = gate.name[len(block.name) + 1:]
    mlp = mlp_of(block.module, inner)
    prefix = inner.rpartition(".")[0]
    mine = {n: lin for n, lin in block.linears.items() if lin.name[len(block.name) + 1:].rpartition(".")[0] == prefix}
    convert_mlp(mlp, [lin for lin in mine.values() if lin.role in ("gate", "up", "gate_up")], variant)
    for host, consumers in block_sites(mine, ("mlp_mid",)).values():
        if "act_sparse" not in host.module._modules:
            install(host, consumers, ActSparsifier(host.in_features, mode="zero").to(host.module.weight.device))


def install_recorded(model: nn.Module, entry: dict, record: dict) -> None:
    """Run-time spec of ``drelu`` records: re-apply the ReLU-fied MLP to every recorded target."""
    import re

    from squeeze.adapters import Adapter

    adapter = Adapter(model)
    t, ig = entry.get("targets"), entry.get("ignore")
    for i in range(len(adapter)):
        block = adapter.block(i)
        for lin in block.linears.values():
            if lin.role in ("gate", "gate_up") and (not t or re.search(t, lin.name)) \
                    and not (ig and re.search(ig, lin.name)):
                try:
                    convert_block(block, lin, entry.get("variant", "drelu"))
                except ValueError as e:
                    from squeeze.errors import SqueezeError

                    raise SqueezeError(f"drelu: {block.name}: {e}") from None
