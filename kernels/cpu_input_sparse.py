"""CPU input-sparse linear for decode: ``y = x @ w_t`` reading only the rows of active inputs.

TEAL / WINA zero most *inputs* of a linear; with the weight stored transposed (``w_t`` [in, out],
one contiguous row per input channel) a zero input means one weight row that need not be read.
Two ways to skip rows, plus the dense fallback, and which one wins depends on how many rows each
reads against the dense kernel (measured, not guessed):

  "bag"     one sum per token over the rows of that token's own non-zero inputs: reads
            (non-zeros / in) weights' worth of rows. Best for one token, and for a few tokens
            while their active sets are small. squeeze's C kernel (``csrc/rows.c``,
            :func:`~squeeze.kernels.cpu_native.rows_mv`) where it is built, fp32 / bf16 weights:
            it prefetches the next rows while it sums the current ones (a bf16 2048 x 5632
            weight at 50% active, from memory, one thread: 1.2 ms against 1.8 ms for the torch
            bag and 3.9 ms for dense ``F.linear``). Else one ``F.embedding_bag(mode="sum",
            per_sample_weights=x)`` bag per token; a bag runs on one thread, so with fewer
            tokens than threads each bag is split into column blocks.
  "gather"  the union of the chunk's active inputs, gathered ``block_rows`` rows at a time into
            a small buffer that stays in cache, each block multiplied by a GEMM (fp32 running
            sum): reads each union row once for every token of the chunk. Best for chunks
            (speculative verification) where the per-token sets overlap.
  dense     the caller's own dense linear (nn.Linear layout), when neither reads enough less.

:func:`plan_for` holds the break-even points measured by the bench case
``act_sparsity/breakeven`` (bench/README.md, section 5) on the development machine, rounded down, so the sparse path is
taken only where it measured faster than dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_native

__all__ = ["InputSparsePlan", "bag_blocks", "bag_offsets", "blocked_bags", "gathered_rows_mm", "input_sparse_linear_cpu",
           "linear_rows_bag", "linear_rows_embedding_bag", "linear_rows_gather", "native_rows", "nonzero_entries",
           "plan_for", "token_offsets", "unblock"]


@dataclass(frozen=True)
class InputSparsePlan:
    bag_rows: float  # "bag" while non-zeros / in_features <= this
    gather_union: float  # else "gather" while |union of active inputs| / in_features <= this; else dense


# (dtype, token bucket) -> plan, from the bench case act_sparsity/breakeven (reps 7; its rows in
# bench/results/act_sparsity.jsonl): W 5632 x 2048 and 2048 x 5632, 1 thread, Xeon
# (AVX-512/AMX), torch 2.13, active fractions 0.1/0.3/0.5/0.7/0.9 shared by the call's tokens
# (bag reads tokens x fraction rows). Each value is the largest measured point at which the method
# was >= 1.1x F.linear on *both* shapes; between points we do not guess.
_MEASURED = {
    (torch.float32, 1): InputSparsePlan(0.5, 0.0),
    (torch.float32, 2): InputSparsePlan(0.2, 0.1),
    (torch.float32, 4): InputSparsePlan(0.4, 0.5),
    (torch.float32, 8): InputSparsePlan(0.8, 0.7),
    (torch.bfloat16, 1): InputSparsePlan(0.7, 0.0),
    (torch.bfloat16, 2): InputSparsePlan(0.6, 0.1),
    (torch.bfloat16, 4): InputSparsePlan(0.4, 0.1),
    (torch.bfloat16, 8): InputSparsePlan(0.8, 0.1),
}
# The same with the bag in our C kernel (native_rows): the case's "bag" column since it measures
# both ("bag_torch" is the column above), same machine and shapes, 2026-12-03; gather unchanged.
_MEASURED_NATIVE = {
    (torch.float32, 1): InputSparsePlan(0.7, 0.0),
    (torch.float32, 2): InputSparsePlan(1.0, 0.1),
    (torch.float32, 4): InputSparsePlan(2.0, 0.5),
    (torch.float32, 8): InputSparsePlan(4.0, 0.7),
    (torch.bfloat16, 1): InputSparsePlan(0.9, 0.0),
    (torch.bfloat16, 2): InputSparsePlan(1.0, 0.1),
    (torch.bfloat16, 4): InputSparsePlan(1.2, 0.1),
    (torch.bfloat16, 8): InputSparsePlan(0.8, 0.1),
}
_BUCKETS = (1, 2, 4, 8)
_UNMEASURED = InputSparsePlan(0.3, 0.1)  # fp16 and anything else: only clearly sparse calls


def native_rows(dtype: torch.dtype) -> bool:
    """Whether the bag of a ``dtype`` weight runs squeeze's C kernel (fp32 / bf16, where built)."""
    return dtype in (torch.float32, torch.bfloat16) and cpu_native.library() is not None


def plan_for(dtype: torch.dtype, tokens: int) -> InputSparsePlan | None:
    """The measured plan for ``tokens`` (smallest bucket >= it); None above 8 tokens (prefill is
    compute-bound: dense)."""
    measured = _MEASURED_NATIVE if native_rows(dtype) else _MEASURED
    for b in _BUCKETS:
        if tokens <= b:
            return measured.get((dtype, b), _UNMEASURED)
    return None


def bag_offsets(bags: torch.Tensor, count: int) -> torch.Tensor:
    """Where each of ``count`` bags starts in a list of entries sorted by bag id ``bags`` (an
    embedding bag's ``offsets``; empty bags allowed): :func:`token_offsets` without the end."""
    return token_offsets(bags, count)[:-1]


def token_offsets(tok: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """Where each of ``count`` tokens' (or bags') entries start and end ([count + 1]) in entries
    sorted by token ``tok`` (:func:`nonzero_entries`); None for one token (all entries)."""
    if tok is None:
        return None
    out = torch.zeros(count + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(tok, minlength=count), 0, out=out[1:])
    return out


def nonzero_entries(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(token, column, value) of the non-zero entries of x [T, in], grouped by token: what every
    bag kernel reads, so the consumers of one input (q/k/v, gate/up) can share it. Token is None
    for one token (a decode step needs no per-token bookkeeping: ~15 us a call saved)."""
    if x.shape[0] == 1:
        col = x[0].nonzero().squeeze(1)
        return None, col, x[0].index_select(0, col)
    tok, col = (x != 0).nonzero(as_tuple=True)  # row-major: grouped by token
    return tok, col, x[tok, col]


def bag_blocks(tokens: int, n: int, min_width: int = 256) -> int:
    """How many column blocks to split each token's bag into so that a call has a bag per thread:
    torch's embedding bags give each bag one thread, so one token's single bag reads at one
    thread's bandwidth (a 2048 x 5632 bf16 weight at 30% active, read from memory: 9.2 GB/s as one
    bag on 1 thread, 15.4 GB/s as two on 2; ``python -m bench.decode_anatomy --rows``). ``threads // tokens`` blocks, fewer when that does not divide ``n`` into
    blocks of at least ``min_width`` outputs."""
    b = torch.get_num_threads() // max(tokens, 1)
    while b > 1 and (n % b or n // b < min_width):
        b -= 1
    return max(b, 1)


def blocked_bags(entries: tuple, tokens: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, offsets, weights) of ``tokens`` bags over ``entries`` (:func:`nonzero_entries`),
    each split into ``blocks`` column blocks, for rows stored [in * blocks, out / blocks] (block
    j of input row r at row r * blocks + j). Bag j * tokens + i is token i's block j."""
    tok, col, val = entries
    if blocks == 1:
        return col, col.new_zeros(1) if tok is None else bag_offsets(tok, tokens), val
    j = _block_ids(blocks)  # [blocks, 1]
    idx = torch.add(j, col, alpha=blocks).flatten()  # one op: a decode step calls this per linear
    if tok is None:
        offsets = j.flatten() * col.numel()
    else:
        offsets = (bag_offsets(tok, tokens) + j * col.numel()).flatten()
    return idx, offsets, val.repeat(blocks)


_BLOCK_IDS: dict[int, torch.Tensor] = {}


def _block_ids(blocks: int) -> torch.Tensor:
    ids = _BLOCK_IDS.get(blocks)
    if ids is None:
        ids = _BLOCK_IDS[blocks] = torch.arange(blocks).unsqueeze(1)
    return ids


def unblock(y: torch.Tensor, tokens: int, blocks: int) -> torch.Tensor:
    """[blocks * tokens, width] bag sums (:func:`blocked_bags`) as [tokens, blocks * width]."""
    return y if blocks == 1 else y.view(blocks, tokens, -1).transpose(0, 1).reshape(tokens, -1)


def linear_rows_bag(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                    entries: tuple | None = None) -> torch.Tensor:
    """``x @ w_t (+ bias)`` for x [T, in], one sum per token over the rows of its non-zero inputs
    (``entries``: :func:`nonzero_entries` of x, if known): our C kernel where :func:`native_rows`
    (fp32 sums rounded once to x's dtype), else :func:`linear_rows_embedding_bag`."""
    t, n = x.shape[0], w_t.shape[1]
    tok, col, val = entries if entries is not None else nonzero_entries(x)
    if native_rows(w_t.dtype) and x.dtype in (torch.float32, torch.bfloat16) and w_t.is_contiguous():
        return cpu_native.rows_mv(w_t, col, val.float(), token_offsets(tok, t), torch.empty(t, n, dtype=x.dtype),
                                  bias=None if bias is None else bias.float())
    return linear_rows_embedding_bag(x, w_t, bias, (tok, col, val))


def linear_rows_embedding_bag(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                              entries: tuple | None = None) -> torch.Tensor:
    """:func:`linear_rows_bag` by torch's ``F.embedding_bag``: one bag per token split into
    :func:`bag_blocks` column blocks: w_t [in, out] read as [in * B, out / B] has block j of input
    row r at row r * B + j, so the split needs no copy of the weight; sums in w_t's dtype."""
    t, (k, n) = x.shape[0], w_t.shape
    tok, col, val = entries if entries is not None else nonzero_entries(x)
    b = bag_blocks(t, n)
    idx, offsets, weights = blocked_bags((tok, col, val.to(w_t.dtype)), t, b)
    y = unblock(F.embedding_bag(idx, w_t.view(k * b, n // b), offsets, mode="sum", per_sample_weights=weights), t, b)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def linear_rows_gather(x: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                       block_rows: int = 128) -> torch.Tensor:
    """``x @ w_t (+ bias)`` for x [T, in] that is zero outside the columns ``idx``: see
    :func:`gathered_rows_mm`."""
    buf = torch.empty(min(block_rows, max(idx.numel(), 1)), w_t.shape[1], dtype=w_t.dtype)
    acc = torch.zeros(x.shape[0], w_t.shape[1], dtype=torch.float32)
    gathered_rows_mm(x[:, idx], w_t, idx, buf, acc)
    if bias is not None:
        acc += bias
    return acc.to(x.dtype)


def gathered_rows_mm(xs: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor, buf: torch.Tensor,
                     acc: torch.Tensor) -> torch.Tensor:
    """acc [T, out] (fp32) += xs [T, n] @ w_t[idx]: the rows ``w_t[idx]`` are gathered
    ``len(buf)`` at a time into ``buf`` (an L2-sized buffer) and multiplied by a GEMM, so each
    row is read once for all T tokens; 16-bit products are summed in fp32 across blocks."""
    fp32 = w_t.dtype == torch.float32
    xs = xs.to(w_t.dtype)
    step = buf.shape[0]
    for s in range(0, idx.numel(), step):
        e = min(s + step, idx.numel())
        blk = buf[: e - s]
        torch.index_select(w_t, 0, idx[s:e], out=blk)
        if fp32:
            acc.addmm_(xs[:, s:e], blk)
        else:
            acc += torch.mm(xs[:, s:e], blk)
    return acc


def input_sparse_linear_cpu(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None, *,
                            dense=None, plan: InputSparsePlan | None = None, entries: tuple | None = None) -> torch.Tensor:
    """``x @ w_t (+ bias)`` for x [T, in] (T <= 8) with zeros in it, by whichever of bag, gather
    or dense the plan says is fastest for this call's non-zeros (``entries``:
    :func:`nonzero_entries` of x, if known). ``dense(x)`` is the caller's dense linear (default:
    ``x @ w_t``); it runs when the plan says sparse would not pay."""
    t, d = x.shape
    plan = plan or plan_for(w_t.dtype, t)
    if plan is not None:
        entries = entries if entries is not None else nonzero_entries(x)
        if entries[1].numel() <= plan.bag_rows * d:
            return linear_rows_bag(x, w_t, bias, entries)
        if t > 1 and plan.gather_union > 0:
            idx = (x != 0).any(0).nonzero().flatten()
            if idx.numel() <= plan.gather_union * d:
                return linear_rows_gather(x, w_t, idx, bias)
    if dense is not None:
        return dense(x)
    y = x.to(w_t.dtype) @ w_t
    return (y + bias if bias is not None else y).to(x.dtype)


def _bench_report(copies: int = 20, rounds: int = 15) -> None:
    """Print median ms of one token through ``copies`` different weights of each shape (~460 MB in
    all, so they come from memory, as at decode) for dense ``F.linear``, the torch embedding bag,
    our row kernel (bf16), and for int8 codes our GEMV, torch's quantized bag and our row kernel,
    at 10 / 30 / 50% active inputs, rounds interleaved (the command is in kernels/README.md)."""
    from . import quant_cpu

    if cpu_native.library() is None:
        raise SystemExit(f"native kernels unavailable: {cpu_native.unavailable_reason()}")
    print(f"threads {torch.get_num_threads()}, built for {cpu_native.isa()}")
    torch.manual_seed(0)
    for k, n in ((2048, 5632), (5632, 2048)):
        dense = [torch.randn(n, k).bfloat16() for _ in range(copies)]
        w_t = [w.t().contiguous() for w in dense]
        int8 = [quant_cpu.prepare_int8_cpu(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 127)
                for _ in range(copies)]
        mine = [quant_cpu.prepare_int8_rows_cpu(p, native=True) for p in int8]
        bags = [quant_cpu.prepare_int8_rows_cpu(p, native=False) for p in int8]
        for active in (0.1, 0.3, 0.5):
            x = (torch.randn(1, k) * (torch.rand(1, k) < active)).bfloat16()
            e = nonzero_entries(x)
            ms = cpu_native._median_ms({
                "dense bf16": lambda: [F.linear(x, w) for w in dense],
                "torch bag": lambda: [linear_rows_embedding_bag(x, w, None, e) for w in w_t],
                "ours": lambda: [linear_rows_bag(x, w, None, e) for w in w_t],
                "int8 gemv": lambda: [quant_cpu.int8_linear_cpu(x, p) for p in int8],
                "int8 torch bag": lambda: [quant_cpu.int8_rows_linear_cpu(x, r, None, e) for r in bags],
                "int8 ours": lambda: [quant_cpu.int8_rows_linear_cpu(x, r, None, e) for r in mine]}, rounds)
            print(f"W_t {k}x{n}, {active:.0%} active: " + "  ".join(
                f"{name} {t / copies:.3f} ms ({ms['dense bf16'] / t:.2f}x)" for name, t in ms.items()))
