"""Streaming statistics over calibration tokens (accumulated in float64 so long sweeps do not
lose precision)."""

from __future__ import annotations

import weakref

import torch

from squeeze import distributed


class ChannelStats:
    """Per-input-channel count, sum and sum of squares of activations x [tokens, channels].

    With several processes each also keeps its per-batch partial sums; :meth:`reduce` gathers
    every rank's (in rank order = batch order) and adds them up again from zero, in the order one
    process adds them: the combined statistic is bit-identical to the single-process one."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)
        self._parts: list | None = [] if distributed.active() else None

    # Linears fed the same tensor (q/k/v, gate/up) see the same batch: compute its moments once.
    _last: tuple = (None, None, None)

    def update(self, x: torch.Tensor) -> None:
        ref, s, sq = ChannelStats._last
        if ref is None or ref() is not x:
            x2 = x.reshape(-1, x.shape[-1]).float()
            # per-batch sums in float32 (a batch is a few thousand tokens), accumulated in float64;
            # (x*x).sum(0) is ~10x faster than vector_norm(dim=0) on CPU
            s, sq = x2.sum(0).double(), (x2 * x2).sum(0).double()
            ChannelStats._last = (weakref.ref(x), s, sq)
        rows = x.numel() // x.shape[-1]
        self.n += rows
        self.sum += s
        self.sumsq += sq
        if self._parts is not None:
            self._parts.append(torch.cat([s, sq, torch.tensor([float(rows)], dtype=torch.float64)]))

    def reduce(self) -> None:
        """Combine every rank's batches (see the class docstring); a no-op in one process."""
        if self._parts is None:
            return
        c = self.sum.numel()
        parts = torch.stack(self._parts) if self._parts else torch.zeros(0, 2 * c + 1, dtype=torch.float64)
        self.n, self.sum, self.sumsq = 0, torch.zeros_like(self.sum), torch.zeros_like(self.sumsq)
        for row in distributed.gather_rows(parts):  # the same float64 additions, in the same order
            self.sum += row[:c]
            self.sumsq += row[c:2 * c]
            self.n += int(row[2 * c])
        self._parts = None

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    def mean_sq(self) -> torch.Tensor:
        return self.sumsq / max(self.n, 1)

    def var(self) -> torch.Tensor:
        return (self.mean_sq() - self.mean() ** 2).clamp_min(0)


# what one float32 x^T x product (a slice of output columns) and its float64 cast for the sum may
# take: a 5632-wide down_proj's whole product and cast would hold 275 MB beside its 242 MB sum
HESSIAN_TEMP_BYTES = 16 << 20


class Hessian:
    """H = (2/n) sum x x^T over tokens, for second-order methods (SparseGPT, GPTQ).

    As for :class:`ChannelStats`, each batch's x^T x is computed in float32 (a batch is at most a
    few thousand tokens: ~sqrt(tokens) * 2^-24 relative error per entry, far under the 1%
    dampening the solvers add) and summed over batches in float64; linears fed the very same
    input (q/k/v, gate/up) share one Hessian (:func:`hessian_for`), which adds each batch once.
    Against a float64 product per linear that is ~3x less work and memory."""

    def __init__(self, channels: int, dtype=torch.float64):
        self.n = 0
        self.xtx = torch.zeros(channels, channels, dtype=dtype)
        self._seen = None  # the input last added (weakly held)

    def update(self, x: torch.Tensor) -> None:
        if self._seen is not None and self._seen() is x:
            return  # a linear sharing this Hessian added this batch already
        self._seen = weakref.ref(x)
        x = x.reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        cols = max(1, HESSIAN_TEMP_BYTES // (12 * x.shape[1]))
        for j in range(0, x.shape[1], cols):
            self.xtx[:, j:j + cols] += x.t() @ x[:, j:j + cols]

    def reduce(self) -> None:
        """All-reduce the sums over the ranks. Not bit-identical to one process: the running sum
        adds each batch in turn, and rank partials added together round differently; in float64
        that is ~1e-16 relative per addition (README: Distributed calibration). Keeping per-batch partial
        matrices would make it exact, at in_features^2 x 8 bytes per batch: too much for large models."""
        if not distributed.active():
            return
        distributed.sum_(self.xtx)
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        self.n = int(distributed.sum_(n))

    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.n, 1))


def hessian_for(scratch: dict, name: str, x: torch.Tensor) -> Hessian:
    """``scratch[name]``, a :class:`Hessian` made on first use. A linear first seen with the very
    tensor the Hessian made just before was fed (``BlockContext.watch`` hands q/k/v, and gate/up,
    one ``x`` object) shares that Hessian: their sums are the same."""
    h = scratch.get(name)
    if h is None:
        last = scratch.get(_LAST)
        h = last[1]() if last is not None and last[0]() is x else None
        scratch[name] = h = h or Hessian(x.shape[-1])
    # both weakly: a solver pops each Hessian from the scratch, and the last one made (a wide
    # down_proj's) must then go, not stay held here through its solve
    scratch[_LAST] = (weakref.ref(x), weakref.ref(h))
    return h


_LAST = "_hessian_for_last_input"
