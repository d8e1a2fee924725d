"""Run-time activation sparsity: per-site sparsifiers, and an input-sparse linear for decode.

A *site* is one activation that feeds linears: the attention input (q/k/v), the attention output
(o), the MLP input (gate/up) and the MLP intermediate (down). Each site gets one
:class:`ActSparsifier`, registered as the submodule ``act_sparse`` of its *host* linear (k_proj,
o_proj, gate_proj, down_proj or their fused / non-gated equivalents), so its threshold, sparsity
and WINA column scale are buffers in ``state_dict`` (the export spills them to the sidecar
``squeeze.safetensors``; ``squeeze.load`` re-installs the sites and loads them by name). Plain
``from_pretrained`` of such an export gives the dense-activation model.

Every consumer of a site gets a forward pre-hook that zeroes its input (shared sites compute the
mask once per input tensor), and, for small token counts (decode, speculative chunks of up to
:data:`DECODE_TOKENS`), a forward that reads only the weight rows of active inputs: the weight is
kept transposed ([in, out], built lazily on the first sparse call, so memory for those linears
doubles only once decoding starts) and ``F.embedding_bag(mode="sum", per_sample_weights=x)``
sums the rows of the non-zero inputs of each token. When the active fraction is above the
measured break-even (:data:`BREAKEVEN_ROWS`) it falls back to the dense ``F.linear``; the
masking itself still costs a little on every call (bench/README_act_sparsity.md).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

# The site vocabulary and the masks live with the pass math (squeeze.passes._actsparse_math); they
# are imported lazily because importing squeeze.passes registers every pass, and the passes
# import this module.
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")

DECODE_TOKENS = 8
# The sparse path reads one weight row per non-zero input per token; the dense path reads the
# whole weight once. Largest (non-zeros / in_features) at which the sparse path still beats dense
# F.linear on CPU, per (dtype, single token?) — measured by `bench/act_sparsity.py breakeven` (see
# bench/README_act_sparsity.md), rounded down for safety. Above it, the dense path runs.
BREAKEVEN_ROWS = {
    (torch.float32, True): 0.4, (torch.float32, False): 0.8,
    (torch.bfloat16, True): 0.6, (torch.bfloat16, False): 0.8,
    (torch.float16, True): 0.4, (torch.float16, False): 0.8,
}
MODES = ("threshold", "topk", "zero")


class ActSparsifier(nn.Module):
    """Zeroes entries of an activation whose score (|x|, or |x| * column norm for WINA) is at or
    below ``threshold`` (mode ``threshold``), keeps the top (1 - ``sparsity``) fraction per token
    (mode ``topk``), or only marks a naturally sparse activation (mode ``zero``: ReLU models) so
    the decode path can skip its zeros. In forwards of more than :data:`DECODE_TOKENS` tokens
    (prefill) the first ``dense_prefix`` fraction of positions stays dense (TEAL/WINA keep the
    first ~1% of prompt tokens dense)."""

    def __init__(self, in_features: int, mode: str = "threshold", weighted: bool = False,
                 dense_prefix: float = 0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.mode, self.dense_prefix = mode, float(dense_prefix)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("sparsity", torch.zeros(()))
        self.register_buffer("scale", torch.ones(in_features) if weighted else torch.zeros(0))
        self.sparse_decode = True
        # Calibration mode (set by the passes): each forward sets ``threshold`` to the score
        # quantile of its own input at this sparsity before masking, so a site downstream of
        # other sparse sites is calibrated on the activations it will really see.
        self.calibrate_to: float | None = None
        self._last: tuple | None = None  # (weakref to input, its version, output): shared sites

    def extra_repr(self) -> str:
        return f"mode={self.mode}, sparsity={float(self.sparsity):.3f}, weighted={self.scale.numel() > 0}"

    def set(self, sparsity: float, threshold: float = 0.0) -> None:
        self.sparsity.fill_(float(sparsity))
        self.threshold.fill_(float(threshold))
        self._last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        y = self._mask(x)
        self._last = (weakref.ref(x), x._version, y)
        return y

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate_to is not None:
            from squeeze.passes._actsparse_math import scores, threshold_from_scores

            scale = self.scale if self.scale.numel() else None
            self.set(self.calibrate_to, threshold_from_scores(scores(x.detach().float(), scale), self.calibrate_to))
        if self.mode == "zero" or float(self.sparsity) <= 0.0:
            return x  # 0% sparsity is exactly the dense model
        from squeeze.passes._actsparse_math import mask_threshold, mask_topk

        scale = self.scale if self.scale.numel() else None
        if self.mode == "topk":
            y = mask_topk(x, float(self.sparsity), scale)
        else:
            y = mask_threshold(x, self.threshold, scale)
        if self.dense_prefix > 0 and x.dim() >= 2 and x.shape[-2] > DECODE_TOKENS:
            n = math.ceil(self.dense_prefix * x.shape[-2])
            y = torch.cat([x[..., :n, :], y[..., n:, :]], dim=-2)
        return y


# -- sites -------------------------------------------------------------------------------------
def block_sites(linears: dict, sites=SITES) -> dict[str, tuple]:
    """{site: (host Linear, [consumer Linears])} for the adapter ``Linear``s of one block."""
    from squeeze.passes._actsparse_math import ROLE_TO_SITE, SCALE_ROLES

    out = {}
    for site in sites:
        consumers = [lin for lin in linears.values() if ROLE_TO_SITE.get(lin.role) == site]
        if not consumers:
            continue
        host = next((lin for role in SCALE_ROLES[site] for lin in consumers if lin.role == role), consumers[0])
        out[site] = (host, consumers)
    return out


def _pre_hook(module, args):
    sp = module.__dict__["_squeeze_sparsifier"]
    return (sp(args[0]),) + tuple(args[1:])


def install(host, consumers, sparsifier: ActSparsifier) -> None:
    """Register ``sparsifier`` as ``host.module.act_sparse`` and hook every consumer (adapter
    ``Linear``s). Idempotent: re-installing replaces the previous sparsifier."""
    uninstall(consumers)
    host.module.add_module("act_sparse", sparsifier)
    for lin in consumers:
        m = lin.module
        m.__dict__["_squeeze_sparsifier"] = sparsifier  # not a submodule: one owner in state_dict
        m.__dict__["_squeeze_transposed"] = lin.transposed
        m.__dict__["_squeeze_hook"] = m.register_forward_pre_hook(_pre_hook)
        m.forward = _SparseForward(m)


def uninstall(consumers) -> None:
    for lin in consumers:
        m = lin.module
        h = m.__dict__.pop("_squeeze_hook", None)
        if h is not None:
            h.remove()
        m.__dict__.pop("_squeeze_sparsifier", None)
        m.__dict__.pop("_squeeze_wt", None)
        if "forward" in m.__dict__:
            del m.__dict__["forward"]
        if "act_sparse" in m._modules:
            del m._modules["act_sparse"]


def sparsifiers(model: nn.Module) -> dict[str, ActSparsifier]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActSparsifier)}


# -- decode path -------------------------------------------------------------------------------
class _SparseForward:
    """Replaces ``forward`` of a consumer linear (a plain callable, so it is not a submodule).
    The input is already masked by the pre-hook."""

    def __init__(self, module: nn.Module):
        self.module = weakref.proxy(module)
        self.dense = type(module).forward.__get__(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        sp = m.__dict__.get("_squeeze_sparsifier")
        d = x.shape[-1]
        tokens = x.numel() // max(d, 1)
        if (sp is None or not sp.sparse_decode or tokens > DECODE_TOKENS or tokens == 0
                or torch.is_grad_enabled() or x.device.type != "cpu"
                or (sp.mode != "zero" and float(sp.sparsity) <= 0.0)):
            return self.dense(x)
        x2 = x.reshape(tokens, d)
        nz = x2 != 0
        rows = float(nz.sum()) / d  # weight rows the sparse path reads, in units of the whole weight
        if rows > BREAKEVEN_ROWS.get((x.dtype, tokens == 1), 0.5):
            return self.dense(x)
        y = input_sparse_linear(x2, _transposed_weight(m), m.bias, nz)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _transposed_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [in, out] contiguous rows (GPT-2 Conv1D already stores it so)."""
    w = m.weight
    if m.__dict__.get("_squeeze_transposed"):
        return w
    key = (w.data_ptr(), w._version, w.dtype)
    cached = m.__dict__.get("_squeeze_wt")
    if cached is None or cached[0] != key:
        cached = (key, w.detach().t().contiguous())
        m.__dict__["_squeeze_wt"] = cached
    return cached[1]


def input_sparse_linear(x2: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None,
                        nz: torch.Tensor | None = None) -> torch.Tensor:
    """y = x2 @ wt (+ bias) reading only the rows of ``wt`` [in, out] where x2 [tokens, in] is
    non-zero: one ``embedding_bag`` bag per token, weighted by the token's non-zero values.

    >>> KERNEL PLUG POINT: a squeeze.kernels CPU/Triton activation-sparse GEMV goes here. <<<
    """
    kernel = _kernel()
    if kernel is not None:
        return kernel(x2, wt, bias)
    if nz is None:
        nz = x2 != 0
    tok, col = nz.nonzero(as_tuple=True)  # row-major order: grouped by token
    counts = torch.bincount(tok, minlength=x2.shape[0])
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    y = F.embedding_bag(col, wt, offsets, mode="sum", per_sample_weights=x2[tok, col].to(wt.dtype))
    if bias is not None:
        y = y + bias
    return y.to(x2.dtype)


def _kernel():
    """The squeeze.kernels implementation of :func:`input_sparse_linear`, when one exists and is
    tested; None keeps the plain-torch path."""
    return
