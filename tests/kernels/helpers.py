"""Shared helpers for the kernel tests (random 2:4 weights, FFN data, tolerances)."""

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton with TRITON_INTERPRET=1",
)


def rand_24(n: int, k: int, dtype: torch.dtype, seed: int = 0, fill: str = "mixed") -> torch.Tensor:
    """A random 2:4 weight [n, k]; fill "two" keeps exactly 2 per group, "mixed" 0-2 per group."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        w = torch.randn(n, k, generator=g).to(dtype)
        w = torch.where(w == 0, torch.ones_like(w), w)
    else:
        w = torch.randint(1, 100, (n, k), generator=g).to(dtype)
    rank = torch.rand(n, k // 4, 4, generator=g).argsort(-1).argsort(-1)  # random rank per column
    keep_n = torch.full((n, k // 4, 1), 2) if fill == "two" else torch.randint(0, 3, (n, k // 4, 1), generator=g)
    keep = rank < keep_n
    # where(), not a multiply: -x * 0 would leave -0.0 in dropped positions (not round-trippable)
    return torch.where(keep, w.view(n, k // 4, 4), torch.zeros((), dtype=dtype)).view(n, k)


def ffn_weights(t: int, h: int, i: int, dtype: torch.dtype, seed: int = 0, dead: float = 0.4):
    """x [t, h], w_gate, w_up, w_downT [i, h]. x[:, 0] == 1 acts as a bias feature: a fraction
    ``dead`` of the neurons get a strongly negative gate for every token, so that the chunk's
    union of active neurons stays a strict subset even for 64 tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    x[:, 0] = 1.0
    w_gate = torch.randn(i, h, generator=g) / h**0.5
    w_up = torch.randn(i, h, generator=g) / h**0.5
    w_downT = torch.randn(i, h, generator=g) / i**0.5
    dead_rows = torch.randperm(i, generator=g)[: int(dead * i)]
    w_gate[dead_rows, 0] = -8.0
    return [v.to(dtype) for v in (x, w_gate, w_up, w_downT)]


def f32(*ts):
    return [t.float() for t in ts]


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold inside the widest gap among the middle half of the per-neuron scores, so that
    rounding differences between implementations cannot flip a neuron's decision."""
    s = scores.flatten().sort().values
    lo, hi = len(s) // 4, max(len(s) * 3 // 4, len(s) // 4 + 2)
    mid = s[lo:hi]
    gaps = mid[1:] - mid[:-1]
    j = int(gaps.argmax())
    return float((mid[j] + mid[j + 1]) / 2)


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    """Compare with a tolerance scaled to the output's magnitude and the dtype's precision."""
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    scale = max(float(ref.abs().max()), 1e-6)
    err = float((got.float() - ref.float()).abs().max())
    assert got.dtype == dtype
    assert err <= rel * scale * 4, f"max abs err {err:.3e} > {rel * scale * 4:.3e} (scale {scale:.3e})"
