"""Seeded batches: the rows of step ``s`` are a function of the seed and ``s`` alone, so a run
resumed at any step sees exactly the batches an uninterrupted run would have."""

from __future__ import annotations

import torch

DRAWS = ("epoch", "distinct", "any")


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded by (seed, step) only: per-step randomness that survives a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(step: int, batch_size: int, n: int, seed: int, draw: str = "epoch") -> list[int]:
    """Row indices of optimisation step ``step`` out of ``n`` rows. ``draw``: ``epoch``,
    consecutive slices of a seeded permutation per epoch (every row once per epoch); ``distinct``,
    ``batch_size`` different rows drawn afresh each step; ``any``, drawn with replacement."""
    if draw == "epoch":
        out = []
        for g in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(g, n)
            out.append(int(torch.randperm(n, generator=step_generator(seed, epoch))[pos]))
        return out
    if draw == "distinct":
        return torch.randperm(n, generator=step_generator(seed, step))[:batch_size].tolist()
    if draw == "any":
        return torch.randint(0, n, (batch_size,), generator=step_generator(seed, step)).tolist()
    raise ValueError(f"draw must be one of {DRAWS}, not {draw!r}")


def collate(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad ``rows`` (1-D token ids) to one (B, T) batch; the attention mask is ``None`` when
    every row has the same length (nothing to mask), else 1 on real tokens and 0 on padding."""
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows), None
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask
