"""CPU fast path for the activation-sparse FFN at decode time (1 token) and small chunks.

Given the active neurons ``idx`` (from a predictor / router, a TEAL-style threshold, or the gate),
only their rows of gate, up and the transposed down weight [I, H] are touched:

  gate/up  "dot":    out[t, a] = <x[t], W[idx[a]]> straight from the weight rows, with no copy,
                     through ``aten._embedding_bag_per_sample_weights_backward`` (the backward of
                     embedding_bag's per-sample weights *is* a gathered dot product). Best for one
                     or two tokens; it reads each active row once per token.
           "gather": blocked gather — ``index_select(out=...)`` of ``block_rows`` active rows into a
                     small preallocated buffer that stays in L2, then a GEMM on it. Best for more
                     tokens (the GEMM reuses each row across tokens).
           "dense":  all rows (GEMV / GEMM), then pick the active outputs — when most rows are
                     active the fast dense kernels beat gathering (only down stays sparse).
  down     "bag":    ``F.embedding_bag(mode="sum", per_sample_weights=h)`` over the rows of downT:
                     y[t] = sum_a h[t, a] * downT[idx[a]] in one call, no copy.
           "gather": blocked gather of downT rows + GEMM accumulated in fp32.

Measured on the development machine (Xeon with AVX-512/AMX, 1 thread; bench case kernels/ffn): the
sparse methods lose to dense above an active fraction that depends on dtype and token count — the
bf16 GEMM at 8 tokens uses AMX and is hard to beat, fp32 F.linear at 2-32 tokens is slow and easy to
beat. :class:`SparseFFNWorkspace` owns the buffers and a per-(dtype, tokens) plan: which methods,
and the break-even active fraction above which it runs the dense FFN instead (its dense path uses
torch.mv for one token, faster than F.linear in bf16), so it is not slower than dense beyond timing
noise. ``calibrate()`` re-measures the plan for the workspace's own weights, threads and machine.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu_input_sparse import gathered_rows_mm
from .ffn_reference import act_mul, active_neurons, check_act

__all__ = ["FFNPlan", "SparseFFNWorkspace", "chunk_sparse_ffn_cpu", "default_plan", "sparse_ffn_cpu"]

_PSW = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)


@dataclass(frozen=True)
class FFNPlan:
    """How to run one (dtype, tokens) case: methods and the dense switch-over point."""

    gate_up: str  # "dot" | "gather" | "dense"
    down: str  # "bag" | "gather"
    max_active: float  # run sparse while active fraction <= this, dense above


# Measured by the bench case kernels/plans (`python -m bench.run --full --only kernels/plans`) on the development machine (Xeon with
# AVX-512/AMX, torch 2.13 CPU, 1 thread, process CPU time, Llama-7B FFN slice H=4096, I=11008,
# fresh random active sets; active fractions 5%..95% in 5% steps). Keys: (dtype, tokens bucket); a
# token count uses the smallest bucket >= it. max_active is measured against this module's dense
# path (torch.mv for one token). See bench/README.md, section 4.
_MEASURED: dict[tuple[torch.dtype, int], FFNPlan] = {
    (torch.bfloat16, 1): FFNPlan("dot", "bag", 0.45),
    (torch.bfloat16, 2): FFNPlan("gather", "bag", 0.4),
    (torch.bfloat16, 4): FFNPlan("gather", "gather", 0.4),
    (torch.bfloat16, 8): FFNPlan("gather", "gather", 0.35),
    (torch.bfloat16, 16): FFNPlan("gather", "gather", 0.35),
    (torch.bfloat16, 32): FFNPlan("gather", "gather", 0.35),
    (torch.bfloat16, 64): FFNPlan("gather", "gather", 0.45),
    (torch.float32, 1): FFNPlan("dot", "bag", 0.6),
    (torch.float32, 2): FFNPlan("dot", "gather", 0.55),
    (torch.float32, 4): FFNPlan("dot", "gather", 0.9),
    (torch.float32, 8): FFNPlan("dot", "gather", 0.95),
    (torch.float32, 16): FFNPlan("gather", "gather", 0.95),
    (torch.float32, 32): FFNPlan("gather", "gather", 0.85),
    (torch.float32, 64): FFNPlan("gather", "gather", 0.7),
}
_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Unmeasured dtypes/sizes: sparse only when clearly sparse.
_FALLBACK_PLAN = FFNPlan("gather", "gather", 0.3)


def default_plan(dtype: torch.dtype, tokens: int) -> FFNPlan:
    """The measured plan for (dtype, tokens); conservative fallback for anything unmeasured."""
    for b in _BUCKETS:
        if tokens <= b:
            return _MEASURED.get((dtype, b), _FALLBACK_PLAN)
    return FFNPlan("gather", "gather", 0.0)  # > 64 tokens: dense


def _psw_works() -> bool:
    if _PSW is None:
        return False
    try:
        w = torch.arange(6.0).view(3, 2)
        got = _PSW(torch.ones(1, 2), w, torch.tensor([2, 0]), torch.zeros(1, dtype=torch.long),
                   torch.zeros(2, dtype=torch.long), 0, -1)
        return torch.equal(got, torch.tensor([9.0, 1.0]))
    except Exception:  # noqa: BLE001 - private op: any failure means "do not use it"
        return False


_PSW_OK = _psw_works()


class SparseFFNWorkspace:
    """Preallocated buffers + plan for ``y = FFN restricted to active neurons`` on CPU.

    Weights (not copied): ``w_gate``, ``w_up`` [I, H] and ``w_downT`` [I, H] (the down projection
    transposed). ``w_down`` [H, I] (nn.Linear layout) is optional: given, the dense fallback uses
    ``F.linear`` with it; otherwise the fallback multiplies by ``w_downT``.

    Call it each decode step: ``y = ws(x, idx)`` with x [..., H] (at most max_tokens tokens) and idx
    the active neuron ids (any order, no duplicates), or ``ws(x, mask=bool [I])``; or
    ``ws.chunk(x, threshold)`` to let the gate decide (predictor-free). Big buffers are allocated
    once here; per call only small index / output tensors are created.
    """

    def __init__(
        self,
        w_gate: torch.Tensor,
        w_up: torch.Tensor,
        w_downT: torch.Tensor,
        act: str = "swiglu",
        *,
        w_down: torch.Tensor | None = None,
        max_tokens: int = 8,
        block_rows: int = 128,
        plans: dict[int, FFNPlan] | None = None,
    ) -> None:
        check_act(act)
        i, h = w_gate.shape
        for name, w in (("w_up", w_up), ("w_downT", w_downT)):
            if tuple(w.shape) != (i, h):
                raise ValueError(f"{name} must be [I, H] = {(i, h)}, got {tuple(w.shape)}")
        if w_down is not None and tuple(w_down.shape) != (h, i):
            raise ValueError(f"w_down must be [H, I] = {(h, i)}, got {tuple(w_down.shape)}")
        if any(w.device.type != "cpu" for w in (w_gate, w_up, w_downT)):
            raise ValueError("SparseFFNWorkspace is the CPU path; weights must be on CPU")
        if any(not w.is_contiguous() for w in (w_gate, w_up, w_downT)):
            # row gathers want contiguous rows; copying here would silently double the memory
            raise ValueError("w_gate, w_up and w_downT must be contiguous (w_downT = w_down.t().contiguous())")
        self.w_gate, self.w_up, self.w_downT, self.w_down = w_gate, w_up, w_downT, w_down
        self.act = act
        self.dtype = w_gate.dtype
        self.intermediate, self.hidden = i, h
        self.max_tokens = int(max_tokens)
        self.block_rows = int(block_rows)
        self.plans: dict[int, FFNPlan] = dict(plans or {})
        long = {"dtype": torch.long}
        # gathered rows, one L2-sized block per weight (gate, up, down)
        self._row_buf = torch.empty(3, self.block_rows, h, dtype=self.dtype)
        # gate / up outputs for the active neurons, stored neuron-major [n, T]
        self._gu = torch.empty(2, i * self.max_tokens, dtype=self.dtype)
        self._h = torch.empty(self.max_tokens * i, dtype=self.dtype)  # (T, n) compact intermediate
        self._acc = torch.empty(self.max_tokens, h, dtype=torch.float32)  # fp32 accumulator (down)
        self._idx_by_neuron = torch.empty(i * self.max_tokens, **long)  # idx repeated, (n, T)
        self._idx_by_token = torch.empty(i * self.max_tokens, **long)  # idx tiled, (T, n)
        self._bag_of = {}  # T -> (n_max * T,) bag id pattern 0..T-1 repeated (for "dot")
        self._offsets = {}  # (T, n) -> embedding_bag offsets
        self._zero_offsets = torch.zeros(1, **long)

    # ------------------------------------------------------------------------------------ plan
    def plan(self, tokens: int) -> FFNPlan:
        for b in _BUCKETS:
            if tokens <= b and b in self.plans:
                return self.plans[b]
        p = default_plan(self.dtype, tokens)
        if p.gate_up == "dot" and not _PSW_OK:
            p = FFNPlan("gather", p.down, p.max_active)
        return p

    def use_sparse(self, n_active: int, tokens: int) -> bool:
        """The fallback decision: sparse while the active fraction is at most the plan's break-even."""
        return n_active <= self.plan(tokens).max_active * self.intermediate

    # ------------------------------------------------------------------------------------ calls
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [T, H] contiguous in the weights' dtype, with the size checks."""
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x must be [..., {self.hidden}], got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.hidden)
        if x2.shape[0] > self.max_tokens:
            raise ValueError(f"workspace was built for at most {self.max_tokens} tokens, got {x2.shape[0]}")
        return x2.to(self.dtype).contiguous()

    def __call__(self, x: torch.Tensor, indices: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                 force: str | None = None) -> torch.Tensor:
        """FFN over the given active neurons: x [..., H] -> y [..., H] (at most max_tokens tokens).

        ``indices``: neuron ids (no duplicates) or ``mask``: bool [I]. ``force``: None (the plan
        decides sparse vs dense), "sparse" or "dense". Both paths compute the same function.
        """
        if (indices is None) == (mask is None):
            raise ValueError("give exactly one of indices or mask")
        if mask is not None:
            indices = mask.reshape(-1).nonzero().squeeze(1)
        idx = indices.reshape(-1).to(torch.long)
        x2 = self._tokens(x)
        t = x2.shape[0]
        sparse = force == "sparse" or (force is None and self.use_sparse(idx.numel(), t))
        if sparse:
            y = self.sparse(x2, idx, self.plan(t))
        else:
            y = self.dense(x2, None if idx.numel() == self.intermediate else idx)
        return y.reshape(x.shape)

    def chunk(self, x: torch.Tensor, threshold: float | None = None, threshold_on: str = "h") -> torch.Tensor:
        """Predictor-free chunk FFN (see ffn_reference for the rules): the gate for every neuron,
        the chunk's union of active neurons, then up/down on the union only — or the dense FFN
        with the non-union neurons zeroed when the union is above the break-even."""
        check_act(self.act, threshold, threshold_on)
        x2 = self._tokens(x)
        t = x2.shape[0]
        plan = self.plan(t)
        gate = self._dense_rows(x2, self.w_gate)  # (T, I): every neuron's gate decides who is active
        if threshold is not None and threshold_on == "h":
            # The rule reads h = act(gate) * up' for every neuron: only the down projection is skipped.
            h = act_mul(gate, self._dense_rows(x2, self.w_up), self.act)  # (T, I)
            keep = (h.abs() > threshold).any(0)
            idx = keep.nonzero().squeeze(1)
            if not self.use_sparse(idx.numel(), t):
                return self._dense_down(h.masked_fill(~keep, 0)).reshape(x.shape)
            h_act = h[:, idx].contiguous()  # (T, n)
        else:
            keep = active_neurons(gate, None, self.act, threshold, threshold_on)
            idx = keep.nonzero().squeeze(1)
            if not self.use_sparse(idx.numel(), t):
                h = act_mul(gate, self._dense_rows(x2, self.w_up), self.act)
                if idx.numel() < self.intermediate:
                    h = h.masked_fill(~keep, 0)
                return self._dense_down(h).reshape(x.shape)
            u = self._rows(x2, self.w_up, idx, plan.gate_up, 1)
            h_act = act_mul(gate[:, idx], u, self.act).contiguous()  # (T, n)
        if idx.numel() == 0:
            return x2.new_zeros(x.shape)
        y = self._down_bag(h_act, idx) if plan.down == "bag" else self._down_gather(h_act, idx)
        return y.reshape(x.shape)

    def dense(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Dense FFN; with ``idx`` the neurons outside it are zeroed (same result as sparse)."""
        h = act_mul(self._dense_rows(x, self.w_gate), self._dense_rows(x, self.w_up), self.act)  # (T, I)
        if idx is not None:  # zero the neurons outside idx, in place (h is ours)
            drop = torch.ones(self.intermediate, dtype=torch.bool).index_fill_(0, idx, False)
            h.masked_fill_(drop, 0)
        return self._dense_down(h)

    @staticmethod
    def _dense_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H] @ w[I, H]^T. One token: torch.mv, whose GEMV beats F.linear's GEMM path for
        bf16 on the development machine (and ties for fp32)."""
        if x.shape[0] == 1:
            return torch.mv(w, x[0])[None]
        return F.linear(x, w)

    def _dense_down(self, h: torch.Tensor) -> torch.Tensor:
        """(T, I) -> (T, H) with the down weight's best dense layout."""
        if self.w_down is not None:
            return self._dense_rows(h, self.w_down)
        return torch.mm(h, self.w_downT)

    def sparse(self, x: torch.Tensor, idx: torch.Tensor, plan: FFNPlan | None = None) -> torch.Tensor:
        """FFN over neurons ``idx`` only (no fallback)."""
        t = x.shape[0]
        plan = plan or self.plan(t)
        n = idx.numel()
        if n == 0:
            return x.new_zeros(t, self.hidden)
        g = self._rows(x, self.w_gate, idx, plan.gate_up, 0)  # (T, n) views
        u = self._rows(x, self.w_up, idx, plan.gate_up, 1)
        h = self._h[: t * n].view(t, n)
        torch.mul(F.silu(g) if self.act == "swiglu" else torch.relu(g),
                  torch.relu(u) if self.act == "drelu" else u, out=h)
        if plan.down == "bag":
            return self._down_bag(h, idx)
        return self._down_gather(h, idx)

    # -------------------------------------------------------------------------------- methods
    def _rows(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, method: str, slot: int) -> torch.Tensor:
        """(T, n): x @ w[idx]^T by the plan's gate/up method."""
        if method == "dot" and _PSW_OK:
            return self._rows_dot(x, w, idx)
        if method == "dense":  # every row, then pick: wins when most rows are active anyway
            return self._dense_rows(x, w)[:, idx]
        return self._rows_gather(x, w, idx, slot)

    def _rows_dot(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """out[t, a] = <x[t], w[idx[a]]> without copying rows -> (T, n) view."""
        t, n = x.shape[0], idx.numel()
        if t == 1:
            flat, bags = idx, self._bags(1, n)
        else:
            flat = self._idx_by_neuron[: n * t].view(n, t)
            flat.copy_(idx[:, None].expand(n, t))
            flat, bags = flat.view(-1), self._bags(t, n)
        out = _PSW(x, w, flat, self._zero_offsets, bags, 0, -1)  # (n * T,) neuron-major
        return out.view(n, t).t()

    def _bags(self, t: int, n: int) -> torch.Tensor:
        pat = self._bag_of.get(t)
        if pat is None:
            pat = torch.arange(t, dtype=torch.long).repeat(self.intermediate)
            self._bag_of[t] = pat
        return pat[: n * t]

    def _rows_gather(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, slot: int) -> torch.Tensor:
        """Blocked gather + GEMM: (T, n) view of a neuron-major buffer."""
        t, n = x.shape[0], idx.numel()
        out = self._gu[slot, : n * t].view(n, t)
        rows = self._row_buf[slot]
        xt = x.t()
        for s in range(0, n, self.block_rows):
            e = min(s + self.block_rows, n)
            blk = rows[: e - s]
            torch.index_select(w, 0, idx[s:e], out=blk)
            torch.mm(blk, xt, out=out[s:e])  # (rows, T)
        return out.t()

    def _down_bag(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t, n = h.shape
        if t == 1:
            flat, offsets = idx, self._zero_offsets
        else:
            flat = self._idx_by_token[: n * t].view(t, n)
            flat.copy_(idx[None, :].expand(t, n))
            flat = flat.view(-1)
            offsets = self._offsets.get((t, n))
            if offsets is None:
                if len(self._offsets) > 64:
                    self._offsets.clear()
                offsets = self._offsets[(t, n)] = torch.arange(0, t * n, n, dtype=torch.long)
        return F.embedding_bag(flat, self.w_downT, offsets, mode="sum", per_sample_weights=h.reshape(-1))

    def _down_gather(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        acc = gathered_rows_mm(h, self.w_downT, idx, self._row_buf[2], self._acc[: h.shape[0]].zero_())
        return acc.to(self.dtype) if self.dtype != torch.float32 else acc.clone()

    # ----------------------------------------------------------------------------- calibration
    def calibrate(self, tokens=(1, 2, 4, 8), fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                  repeats: int = 3, seed: int = 0) -> dict[int, FFNPlan]:
        """Measure the best methods and the break-even active fraction on these weights and this
        machine (current torch thread count); store and return the plans. Takes seconds."""
        for t in tokens:
            if t > self.max_tokens:
                continue
            self.plans[t] = measure_plan(self, t, fractions, repeats, seed)[0]
        return dict(self.plans)


def _time(fn, repeats: int, clock=time.process_time) -> float:
    """Min over repeats. Default clock: this process's CPU time, which leaves out time spent
    descheduled — on a shared, loaded machine wall-clock minima are dominated by other jobs."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def _sparse_next(ws: SparseFFNWorkspace, x: torch.Tensor, sets, plan: FFNPlan) -> torch.Tensor:
    return ws.sparse(x, next(sets), plan)


def measure_plan(ws: SparseFFNWorkspace, tokens: int, fractions, repeats: int = 3, seed: int = 0,
                 clock=time.process_time):
    """-> (FFNPlan, rows) where rows = [(fraction, dense_s, {method: seconds})] for every fraction.

    Each repeat draws a fresh random active set (a new token's neurons are not the previous one's,
    so caches do not flatter the sparse path). The break-even is the largest measured fraction at
    which the best sparse method beats dense, provided every smaller fraction does too.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, ws.hidden, generator=g).to(ws.dtype)
    # "dot" reads every active row once per token: hopeless beyond a few tokens, not measured there
    use_dot = _PSW_OK and tokens <= 8
    methods = [(gu, dn) for gu in ("dot", "gather", "dense") for dn in ("bag", "gather") if gu != "dot" or use_dot]
    dense_s = _time(lambda: ws.dense(x), repeats, clock)
    rows = []
    for frac in fractions:
        n = max(1, round(frac * ws.intermediate))
        sets = [torch.randperm(ws.intermediate, generator=g)[:n].sort().values for _ in range(repeats + 1)]
        res = {}
        for gu, dn in methods:
            # each call takes the next active set: a fresh one per repeat
            run = functools.partial(_sparse_next, ws, x, iter(sets), FFNPlan(gu, dn, 1.0))
            res[f"{gu}+{dn}"] = _time(run, repeats, clock)
        rows.append((frac, dense_s, res))
    # Break-even: the largest fraction up to which the best sparse method beats dense by a 5%
    # margin at every measured point (the margin absorbs timing noise: never slower than dense).
    best_frac, covered = 0.0, []
    for frac, d, res in rows:
        if min(res.values()) > 0.95 * d:
            break
        best_frac = frac
        covered.append((d, res))
    # Methods: the best geometric-mean speedup over the fractions where sparse runs.
    pool = covered or [(rows[0][1], rows[0][2])]
    score = {m: sum(math.log(res[m] / d) for d, res in pool) for m in pool[0][1]}
    best_method = min(score, key=score.get)
    gu, dn = best_method.split("+")
    return FFNPlan(gu, dn, best_frac), rows


# ------------------------------------------------------------------------------------------------
# Allocating entry points (used by the custom ops' CPU implementations)


def _workspace_for(w_gate, w_up, w_downT, act, tokens) -> SparseFFNWorkspace:
    # A fresh, right-sized workspace per call (a few MB, uninitialised): a global cache would keep
    # the layer's weights alive. Runtime modules hold their own SparseFFNWorkspace instead.
    return SparseFFNWorkspace(w_gate, w_up, w_downT, act, max_tokens=max(tokens, 1))


def sparse_ffn_cpu(x, w_gate, w_up, w_downT, indices, act: str, count=None) -> torch.Tensor:
    """CPU FFN over neurons ``indices[:count]``; sparse or dense per the measured plan."""
    idx = indices.reshape(-1).long()
    if count is not None:
        idx = idx[: int(count.reshape(-1)[0])]
    ws = _workspace_for(w_gate, w_up, w_downT, act, x.shape[0])
    return ws(x, idx)


def chunk_sparse_ffn_cpu(x, w_gate, w_up, w_downT, act: str, threshold: float | None = None,
                         threshold_on: str = "h") -> torch.Tensor:
    """CPU chunk-sparse FFN (allocating wrapper around :meth:`SparseFFNWorkspace.chunk`)."""
    check_act(act, threshold, threshold_on)
    return _workspace_for(w_gate, w_up, w_downT, act, x.reshape(-1, x.shape[-1]).shape[0]).chunk(
        x, threshold, threshold_on)
