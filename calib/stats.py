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


class Hessian:
    """H = (2/n) sum x x^T over tokens, for second-order methods (SparseGPT)."""

    def __init__(self, channels: int, dtype=torch.float64):
        self.n = 0
        self.xtx = torch.zeros(channels, channels, dtype=dtype)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype)
        self.n += x.shape[0]
        self.xtx.addmm_(x.t(), x)

    def reduce(self) -> None:
        """All-reduce the sums over the ranks. Not bit-identical to one process: addmm_ folds each
        batch into the running sum, and rank partials added together round differently; in float64
        that is ~1e-16 relative per addition (README: Distributed calibration). Keeping per-batch partial
        matrices would make it exact, at in_features^2 x 8 bytes per batch: too much for large models."""
        if not distributed.active():
            return
        distributed.sum_(self.xtx)
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        self.n = int(distributed.sum_(n))

    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.n, 1))
