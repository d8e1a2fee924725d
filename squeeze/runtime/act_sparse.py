"""Run-time activation sparsity: per-site sparsifiers, and an input-sparse linear for decode.

A *site* is one activation that feeds linears: the attention input (q/k/v), the attention output
(o), the MLP input (gate/up) and the MLP intermediate (down). Each site gets one
:class:`ActSparsifier`, registered as the submodule ``act_sparse`` of its *host* linear (k_proj,
o_proj, gate_proj, down_proj or their fused / non-gated equivalents), so its threshold, sparsity
and WINA column scale are buffers in ``state_dict`` (the export spills them to the sidecar
``squeeze.safetensors``; ``squeeze.load`` re-installs the sites and loads them by name). Plain
``from_pretrained`` of such an export gives the dense-activation model.

Every consumer of a site gets its ``forward`` replaced by a :class:`_SiteForward`, which runs one
of two paths, chosen at load time by a plan measured on this machine for the consumer's shape,
dtype, sparsity and thread count (:mod:`squeeze.runtime.plan`):

- ``sparse``: the export's model. The input is masked (shared sites compute the mask once per
  input tensor); for small token counts (decode, speculative chunks of up to
  :data:`DECODE_TOKENS`) the masked input goes to squeeze.kernels' CPU input-sparse linear
  (:mod:`squeeze.kernels.cpu_input_sparse`), which reads only the weight rows of active inputs
  (one bag per token, or the chunk's union gathered once) when the kernel's own break-even says
  that beats the dense kernel; other calls (prefill, other devices) multiply the masked input
  through the module's own kernel. The sparse path needs the weight transposed ([in, out]); that
  copy is built lazily on the first sparse call.
- ``dense``: the dense model: the module's own forward on the unmasked input (a WINA-rotated site
  still rotates, since its consumers' weights are stored rotated). The mask exists only so that
  a kernel can skip the inputs it zeroes; where no kernel that skips them pays, masking through
  the dense kernel would cost time (at hidden 64, ~6% of a decode step) and quality for nothing.
  So the thresholds are a speed device, like the kernel: a machine that cannot profit from them
  runs the source's activations, and says so (``squeeze info``, ``bench``). ``runtime="sparse"``
  keeps every mask (the model ``compress`` scored, on any machine).

The mask runs inside the consumer's forward, not in a pre-hook (a hook puts every linear call on
torch's slow dispatch path, ~10% of a decode step at hidden 64): a forward hook on a consumer sees
its input as given; :func:`masked_input` gives what it multiplies.
"""

from __future__ import annotations

import itertools

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.adapters import Adapter
from squeeze.algorithms.actsparse import (
    ROLE_TO_SITE,
    ROTATED_SITES,
    SCALE_ROLES,
    SITES,
    mask_threshold,
    mask_topk,
    parse_sites,
    scores,
    threshold_from_scores,
)
from squeeze.kernels.cpu_input_sparse import input_sparse_linear_cpu, nonzero_entries, plan_for

DECODE_TOKENS = 8
MODES = ("threshold", "topk", "zero")


class ActSparsifier(nn.Module):
    """Zeroes entries of an activation whose score (|x|, or |x| * column norm for WINA) is at or
    below ``threshold`` (mode ``threshold``), keeps the top (1 - ``sparsity``) fraction per token
    (mode ``topk``), or only marks a naturally sparse activation (mode ``zero``: ReLU models) so
    the decode path can skip its zeros. In forwards of more than :data:`DECODE_TOKENS` tokens
    (prefill) the first ``dense_prefix`` fraction of positions stays dense (TEAL/WINA keep the
    first ~1% of prompt tokens dense).

    With ``rotated=True`` (WINA's orthogonal transform) the site first maps its input x to
    ``x @ rotation`` (an orthogonal [in, in] buffer) and masks that; the consumers' weights were
    rotated to match (W -> W @ rotation), so at 0% sparsity the outputs are the dense ones."""

    def __init__(self, in_features: int, mode: str = "threshold", weighted: bool = False,
                 dense_prefix: float = 0.0, rotated: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.mode, self.dense_prefix = mode, float(dense_prefix)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("sparsity", torch.zeros(()))
        self.register_buffer("scale", torch.ones(in_features) if weighted else torch.zeros(0))
        self.register_buffer("rotation", torch.eye(in_features) if rotated else torch.zeros(0))
        self.sparse_decode = True
        # Calibration mode (set by the passes): each forward sets ``threshold`` to the score
        # quantile of its own input at this sparsity before masking, so a site downstream of
        # other sparse sites is calibrated on the activations it will really see.
        self.calibrate_to: float | None = None
        self._last: tuple | None = None  # (weakref to input, its version, output): shared sites
        self._rotated_last: tuple | None = None  # the same for rotate() (the dense path's input)
        self._entries: tuple | None = None  # (masked decode input, its version, its non-zero entries)
        self._gen = 0
        self._cache: tuple | None = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, sparsity={float(self.sparsity):.3f}, weighted={self.scale.numel() > 0}, "
                f"rotated={self.rotation.numel() > 0}")

    def set(self, sparsity: float, threshold: float = 0.0) -> None:
        self.sparsity.fill_(float(sparsity))
        self.threshold.fill_(float(threshold))
        self.refresh()

    # Decode reads the buffers per token and per site; reading a 0-dim tensor or casting a
    # buffer every call costs more than the mask itself, so Python / dtype copies are cached
    # under a generation counter that every write path bumps (set, load_state_dict, .to()).
    # Code that writes the buffers in place otherwise must call refresh().
    def refresh(self) -> None:
        self._gen += 1
        self._last = self._rotated_last = self._entries = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.refresh()
        return out

    def _floats(self) -> tuple[float, float]:
        c = self._cache
        if c is None or c[0] != self._gen:
            c = self._cache = (self._gen, (float(self.sparsity), float(self.threshold)), {})
        return c[1]

    def _consts(self, dtype: torch.dtype) -> tuple:
        """(sparsity, threshold, scale, rotation^T): floats, then tensors in ``dtype`` or None."""
        floats = self._floats()
        tensors = self._cache[2].get(dtype)
        if tensors is None:
            tensors = self._cache[2][dtype] = (
                self.scale.to(dtype) if self.scale.numel() else None,
                # stored [out, in] for F.linear: x @ R as a GEMM on R's transpose is up to 1.8x
                # slower on CPU (bf16) than the nn.Linear layout
                self.rotation.t().to(dtype).contiguous() if self.rotation.numel() else None)
        return floats + tensors

    def native_select(self, dtype: torch.dtype) -> tuple[float, torch.Tensor | None] | None:
        """(threshold, score scale) as :class:`~squeeze.kernels.cpu_native.SiteRows` takes them for
        inputs of ``dtype``, for the set :meth:`forward` keeps: the threshold as a value of dtype
        (the mask compares in x's dtype) and the WINA scale's dtype values in fp32 (None for
        TEAL); threshold 0 and no scale where the mask keeps x as it is (mode zero, 0% sparsity:
        its non-zeros). None where the mask is no threshold (topk, calibration) or no kernel takes
        dtype."""
        if self.mode == "topk" or self.calibrate_to is not None or dtype not in (torch.float32, torch.bfloat16):
            return None
        sparsity, threshold = self._floats()
        cached = self._cache[2].get(("select", dtype))
        if cached is None:
            if self.mode == "zero" or sparsity <= 0.0:
                cached = (0.0, None)
            else:
                cached = (float(torch.tensor(threshold, dtype=dtype)),
                          self.scale.to(dtype).float().contiguous() if self.scale.numel() else None)
            self._cache[2][("select", dtype)] = cached
        return cached

    def expected_active(self) -> float | None:
        """The fraction of inputs a token keeps (1 - sparsity), None when not known (mode zero)."""
        return None if self.mode == "zero" else 1.0 - self._floats()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last, ver = self._last, _version(x)
        if last is not None and last[0]() is x and last[1] == ver:
            return last[2]
        y = self._mask(x)
        self._last = (weakref.ref(x), ver, y)
        return y

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x as the dense path multiplies it: unmasked, rotated at a WINA-rotated site (once per
        input tensor for the site's consumers), else x itself."""
        rot = self._consts(x.dtype)[3]
        if rot is None:
            return x
        last, ver = self._rotated_last, _version(x)
        if last is None or last[0]() is not x or last[1] != ver:
            last = self.__dict__["_rotated_last"] = (weakref.ref(x), ver, F.linear(x, rot))
        return last[2]

    def entries(self, y: torch.Tensor) -> tuple:
        """:func:`~squeeze.kernels.nonzero_entries` of a masked decode input ``y`` [..., in] (what
        :meth:`forward` returned), found once for all the site's consumers: q/k/v and gate/up
        would each search the same input again."""
        last, ver = self._entries, _version(y)
        if last is None or last[0] is not y or last[1] != ver:
            last = self.__dict__["_entries"] = (y, ver, nonzero_entries(y.reshape(-1, y.shape[-1])))  # not Module.__setattr__
        return last[2]

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate_to is not None:
            rot = self._consts(x.dtype)[3]
            z = x if rot is None else F.linear(x, rot)
            scale = self.scale if self.scale.numel() else None
            self.set(self.calibrate_to, threshold_from_scores(scores(z.detach().float(), scale), self.calibrate_to))
        sparsity, threshold, scale, rot = self._consts(x.dtype)
        if rot is not None:
            x = F.linear(x, rot)
        if self.mode == "zero" or sparsity <= 0.0:
            return x  # 0% sparsity is exactly the dense model (up to the rotation)
        y = mask_topk(x, sparsity, scale) if self.mode == "topk" else mask_threshold(x, threshold, scale)
        if self.dense_prefix > 0 and x.dim() >= 2 and x.shape[-2] > DECODE_TOKENS:
            n = math.ceil(self.dense_prefix * x.shape[-2])
            y = torch.cat([x[..., :n, :], y[..., n:, :]], dim=-2)
        return y


def _version(x: torch.Tensor) -> int:
    # inference-mode tensors keep no version counter (reading it raises); they cannot be written
    # outside inference mode, so their identity is enough
    return -1 if x.is_inference() else x._version


# -- sites -------------------------------------------------------------------------------------
def block_sites(linears: dict, sites=SITES) -> dict[str, tuple]:
    """{site: (host Linear, [consumer Linears])} for the adapter ``Linear``s of one block."""
    out = {}
    for site in sites:
        consumers = [lin for lin in linears.values() if ROLE_TO_SITE.get(lin.role) == site]
        if not consumers:
            continue
        host = next((lin for role in SCALE_ROLES[site] for lin in consumers if lin.role == role), consumers[0])
        out[site] = (host, consumers)
    return out


def install(host, consumers, sparsifier: ActSparsifier, path: str = "sparse") -> None:
    """Register ``sparsifier`` as ``host.module.act_sparse`` and give every consumer (adapter
    ``Linear``s) a masking forward on ``path``. Idempotent: re-installing replaces the previous
    sparsifier."""
    uninstall(consumers)
    host.module.add_module("act_sparse", sparsifier)
    for lin in consumers:
        m = lin.module
        m.__dict__["_squeeze_sparsifier"] = sparsifier  # not a submodule: one owner in state_dict
        m.__dict__["_squeeze_transposed"] = lin.transposed
        m.forward = _SiteForward(m, path)


def uninstall(consumers) -> None:
    for lin in consumers:
        m = lin.module
        m.__dict__.pop("_squeeze_sparsifier", None)
        m.__dict__.pop("_squeeze_wt", None)
        if "forward" in m.__dict__:
            del m.__dict__["forward"]
        if "act_sparse" in m._modules:
            del m._modules["act_sparse"]


def carry_site(old: nn.Module, new: nn.Module) -> None:
    """Move ``old``'s site onto ``new``, a kernel module that replaces it (quantized or 2:4
    weights): the sparsifier it hosts (same ``state_dict`` names) and its masking forward, whose
    dense path is then ``new``'s own kernel on the masked input. No-op without a site."""
    fwd = old.__dict__.get("forward")
    if not isinstance(fwd, _SiteForward):
        return
    hosted = old._modules.get("act_sparse")
    if hosted is not None:
        new.add_module("act_sparse", hosted)
    new.__dict__["_squeeze_sparsifier"] = old.__dict__["_squeeze_sparsifier"]
    new.__dict__["_squeeze_transposed"] = False  # kernel modules take [..., in] and hold no dense weight
    new.forward = _SiteForward(new, fwd.path)


def install_recorded(model: nn.Module, entry: dict, record: dict) -> None:
    """Run-time spec of ``teal`` / ``wina`` records: empty sparsifiers on every site the pass
    touched; their buffers (threshold, sparsity, WINA scale and rotation) then load from the
    sidecar by name."""
    import re

    sites_wanted = parse_sites(entry.get("sites", ",".join(SITES)))
    mode = entry.get("mode", "threshold")
    prefix = float(entry.get("dense_prefix", 0.01))
    weighted = bool(entry.get("weighted", entry["pass"] == "wina"))
    rotated_sites = ROTATED_SITES if entry.get("transform") else ()
    t, ig = entry.get("targets"), entry.get("ignore")
    adapter = Adapter(model)
    for i in range(len(adapter)):
        block = adapter.block(i)
        for site, (host, consumers) in block_sites(block.linears, sites_wanted).items():
            consumers = [c for c in consumers if (not t or re.search(t, c.name)) and not (ig and re.search(ig, c.name))]
            if consumers:
                sp = ActSparsifier(host.in_features, mode, weighted, prefix, rotated=site in rotated_sites)
                install(host, consumers, sp.to(host.module.weight.device))


def sparsifiers(model: nn.Module) -> dict[str, ActSparsifier]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActSparsifier)}


# -- decode path -------------------------------------------------------------------------------
PATHS = ("sparse", "dense")
DENSE_MEANS = "activations unmasked"  # what the dense path changes, said beside the decision


class _SiteForward:
    """Replaces ``forward`` of a consumer linear (a plain callable, so it is not a submodule): path
    ``sparse`` masks the input, then calls of at most :data:`DECODE_TOKENS` tokens on CPU go to
    squeeze.kernels' input-sparse linear (which reads only the weight rows of active inputs when
    its break-even says that beats the dense kernel) and the rest to the module's own dense
    forward; path ``dense`` is the module's own forward on the unmasked input (rotated first at a
    WINA-rotated site)."""

    def __init__(self, module: nn.Module, path: str = "sparse"):
        if path not in PATHS:
            raise ValueError(f"path {path!r} not in {PATHS}")
        self._module = weakref.ref(module)  # weak: the module holds this object
        self.dense = type(module).forward.__get__(module)
        self._path = path
        self._plans: dict = {}
        self._sites: dict = {}
        self._rows = rows_kind(module)
        self._rotate = None  # the dense path's input map: the site's rotate, or False (found on first call)

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"path {value!r} not in {PATHS}")
        self._path = value

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) copies the module first (it is in memo by now): bind to the copy
        return _SiteForward(memo[id(self._module())], self._path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._path == "dense":
            rotate = self._rotate
            if rotate is None:  # looked up here: a deep copy builds this object before its module is complete
                sp = self._module().__dict__.get("_squeeze_sparsifier")
                rotate = self._rotate = sp.rotate if sp is not None and sp.rotation.numel() else False
            return self.dense(rotate(x) if rotate else x)
        return self._sparse(x)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        m = self._module()
        sp = m.__dict__.get("_squeeze_sparsifier")
        if sp is None:
            return self.dense(x)
        d = x.shape[-1]
        tokens = x.numel() // max(d, 1)
        if (self._rows is None or not sp.sparse_decode or tokens > DECODE_TOKENS or tokens == 0
                or torch.is_grad_enabled() or x.device.type != "cpu"):
            return self.dense(sp.forward(x))
        y = self._native(m, sp, x, tokens, d)
        if y is not None:
            return y
        x = sp.forward(x)
        if self._rows == "quant":
            return self._quant_rows(m, sp, x, tokens, d)
        plan = self._plan(sp, tokens, m.weight.dtype)
        if plan is None:
            return self.dense(x)
        y = input_sparse_linear_cpu(x.reshape(tokens, d), _transposed_weight(m), m.bias, dense=self.dense, plan=plan,
                                    entries=sp.entries(x))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _native(self, m: nn.Module, sp: ActSparsifier, x: torch.Tensor, tokens: int, d: int) -> torch.Tensor | None:
        """The mask, the search of its non-zeros and the rows in one C call
        (:class:`~squeeze.kernels.cpu_native.SiteRows`), from the unmasked input, where the mask is
        a threshold and our kernels take the weight: at TEAL's sparsities the ~10 torch calls
        around a bag (mask, search, casts, offsets) cost more than the bag (~1B at 90%, 1 thread:
        ~125 us a linear, ~19 ms a decode step, more than all its rows). None: the torch path
        below (no such kernel, the plan chose dense, or this call kept more inputs than the rows
        pay for)."""
        select = sp.native_select(x.dtype)
        site = None if select is None else self._site_rows(m, sp, tokens, x.dtype)
        if site is None:
            return None
        rows, max_entries = site
        out = torch.empty(*x.shape[:-1], rows.n, dtype=x.dtype)
        if not rows(sp.rotate(x).reshape(tokens, d), select[0], select[1], max_entries, out.view(tokens, rows.n)):
            return None
        return out

    def _site_rows(self, m: nn.Module, sp: ActSparsifier, tokens: int, dtype: torch.dtype) -> tuple | None:
        """(SiteRows of m's weight, most entries a call may keep for its rows to pay), or None;
        cached per (tokens, dtype, site state) and rebuilt when the weight changes."""
        weight = (m.weight.data_ptr(), m.weight._version) if self._rows == "dense" else id(m.rows)
        key = (tokens, dtype, sp._gen, id(sp))
        got = self._sites.get(key)
        if got is None or got[0] != weight:
            if len(self._sites) > 64:
                self._sites.clear()
            got = self._sites[key] = (weight, _site_rows(m, self._rows, sp, tokens, self._plan(sp, tokens, dtype)))
        return got[1]

    def _quant_rows(self, m: nn.Module, sp: ActSparsifier, x: torch.Tensor, tokens: int, d: int) -> torch.Tensor:
        """Quantized weights: the codes of the non-zero inputs only, when the site keeps few
        enough of them per token for this many tokens (:func:`~squeeze.kernels.quant_rows_pay`;
        its calibrated sparsity says how many; a naturally sparse site, whose level only the data
        knows, is counted per call); else the module's own weight-only kernel."""
        from squeeze.kernels import quant_rows_pay

        if m.rows is None:  # dropped when the plan chose the dense path
            return self.dense(x)
        active = sp.expected_active()
        if active is None:  # the site's one search of its input (sp.entries caches it)
            active = sp.entries(x)[1].numel() / (tokens * d)
        if not quant_rows_pay(m.rows[1], tokens, active):
            return self.dense(x)
        y = m.forward_rows(x.reshape(tokens, d), sp.entries(x))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _plan(self, sp: ActSparsifier, tokens: int, dtype: torch.dtype):
        """The kernel plan for this call, or None to run dense without even counting non-zeros:
        a token keeps ``active`` of the inputs, a chunk's union about 1 - (1 - active)^tokens of
        them (less when tokens agree); margin 1.25 for the spread between tokens. Cached per
        (tokens, dtype, sparsity) because it runs per linear per decode step."""
        key = (tokens, dtype, sp._gen, id(sp))
        cache = self._plans
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            active = sp.expected_active()
            plan = plan_for(dtype, tokens)
            if active is not None and plan is not None:
                union = 1.0 - (1.0 - active) ** tokens
                if active >= 1.0 or (tokens * active > 1.25 * plan.bag_rows and union > 1.25 * plan.gather_union):
                    plan = None
            cache[key] = plan
        return cache[key]


def _site_rows(m: nn.Module, kind: str, sp: ActSparsifier, tokens: int, plan) -> tuple | None:
    """(:class:`~squeeze.kernels.cpu_native.SiteRows`, most kept entries) for consumer m on
    ``tokens``-token calls, or None where none applies: a dense weight's rows while the bag plan
    says they pay (its ``bag_rows``); a quantized one's codes while :func:`quant_rows_pay` says so
    for the site's calibrated sparsity (any count then, as its torch path), or, for a site whose
    level only the data knows, up to the largest kept fraction that pays."""
    from squeeze.kernels import cpu_native, quant_site_rows

    if cpu_native.library() is None:
        return None
    d = _shape_dtype(m)[0][1]
    if kind == "dense":
        w = _transposed_weight(m)
        if plan is None or w.dtype not in (torch.float32, torch.bfloat16):
            return None
        bias = None if m.bias is None else m.bias.detach().float().contiguous()
        return cpu_native.SiteRows(w, None, bias), int(plan.bag_rows * d)
    if m.rows is None:
        return None
    got = quant_site_rows(m.rows[1], m.bias, tokens, sp.expected_active())
    return None if got is None else (got[0], int(got[1] * tokens * d))


def masked_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a consumer linear multiplies: ``x`` after its site's mask on the sparse path, ``x``
    (rotated at a WINA-rotated site) on the dense path, ``x`` itself for other modules (the mask
    runs inside the consumer's forward, so a forward hook's ``args[0]`` is the input as given).
    The site's cached result when the forward just masked this very tensor."""
    sp = module.__dict__.get("_squeeze_sparsifier")
    if sp is None:
        return x
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, _SiteForward) and fwd.path == "dense":
        return sp.rotate(x)
    return sp.forward(x)


def set_path(module: nn.Module, path: str) -> None:
    """Switch a consumer linear installed by :func:`install` to ``path``."""
    fwd = module.__dict__.get("forward")
    if not isinstance(fwd, _SiteForward):
        raise ValueError(f"{type(module).__name__} has no activation-sparse forward")
    fwd.path = path
    if path == "dense":  # the sparse path's transposed weight copy (built when the plan timed it)
        module.__dict__.pop("_squeeze_wt", None)
        if getattr(module, "rows", None) is not None:  # a quantized linear's codes by input row
            module.rows = None


def consumers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: consumer linear} of every installed site."""
    return {n: m for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _SiteForward)}


def plan_candidates(model: nn.Module, skip=()) -> list:
    """One :class:`~squeeze.runtime.plan.Candidate` per consumer linear (``skip``: ids of modules
    whose forward never runs at decode, e.g. down_proj inside a chunk-sparse FFN). Key: weight
    shape, dtype, mask kind, bias and the site's kept fraction (to 0.05; mode zero, whose level
    only the data knows, is measured at half)."""
    from squeeze.runtime.plan import Candidate

    out = []
    for name, m in consumers(model).items():
        if id(m) in skip:
            continue
        rows = rows_kind(m)
        if rows is None:  # no input-sparse kernel for these weights: nothing to choose
            continue
        sp = m.__dict__["_squeeze_sparsifier"]
        active = sp.expected_active()
        level = 0.5 if active is None else round(active * 20) / 20
        kind = "rotated" if sp.rotation.numel() else "weighted" if sp.scale.numel() else sp.mode
        (n, k), dtype = _shape_dtype(m)
        key = (f"{n}x{k}", str(dtype).removeprefix("torch."), kind,
               "bias" if getattr(m, "bias", None) is not None else "nobias",
               f"active={level:.2f}", "tokens=1") + ((f"quant={m.label}",) if rows == "quant" else ())
        out.append(Candidate("act_sparse", key, _bench_for(m, sp, level), lambda p, _m=m: set_path(_m, p),
                             dense_means=DENSE_MEANS))
    return out


def _bench_for(m: nn.Module, sp: ActSparsifier, active: float):
    def bench():
        (_, d), dtype = _shape_dtype(m)
        x = synthetic_input(sp, d, active, dtype)
        # Each path as decode runs it: one forward object per path, fed a new tensor every call, so
        # the site's per-input mask cache never answers (decode masks every token's input once).
        sparse, dense = _SiteForward(m, "sparse"), _SiteForward(m, "dense")
        xs, ys = itertools.cycle([x, x.clone()]), itertools.cycle([x, x.clone()])
        return (lambda: sparse(next(xs))), (lambda: dense(next(ys)))
    return bench


def synthetic_input(sp: ActSparsifier, d: int, active: float, dtype: torch.dtype) -> torch.Tensor:
    """A [1, 1, d] decode input whose mask keeps about ``active`` of its entries: scores (|x|, or
    |x| * WINA scale, after the rotation) well below the threshold for the dropped ones, well
    above for the kept ones; a fixed seed, so both paths and every run see the same input."""
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(d, generator=g) < active
    t = float(sp.threshold) if sp.mode == "threshold" and float(sp.threshold) > 0 else 1.0
    mag = torch.where(keep, t * (2.0 + torch.rand(d, generator=g)), t * 0.5 * torch.rand(d, generator=g))
    if sp.mode == "zero":
        mag = mag * keep
    z = mag * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    if sp.scale.numel():
        z = z / sp.scale.float().clamp_min(1e-12)
    if sp.rotation.numel():
        z = F.linear(z, sp.rotation.float())  # x = z @ R^T, since the site maps x -> x @ R
    return z.to(dtype).reshape(1, 1, d)


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


def rows_kind(module: nn.Module) -> str | None:
    """How the sparse path reads the weight rows of active inputs: "dense" (an nn.Linear or
    Conv1D weight), "quant" (a CPU quantized linear with its codes by input row), or None (a
    kernel module with no input-sparse path, e.g. 2:4 or a CUDA kernel: masked inputs through
    its own kernel)."""
    from squeeze.runtime.quant import QuantLinear

    if isinstance(module, QuantLinear):
        return "quant" if module.rows is not None else None
    return "dense" if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def _shape_dtype(m: nn.Module) -> tuple[tuple[int, int], torch.dtype]:
    """((out, in), activation dtype) of a consumer: its weight's (GPT-2 Conv1D stores [in, out]),
    or a quantized linear's."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        return (m.out_features, m.in_features), m.dtype
    n, k = w.shape[::-1] if m.__dict__.get("_squeeze_transposed") else w.shape
    return (n, k), w.dtype
