"""Where a batch-1 decode step's time goes, and how fast weight rows stream from memory (issue 14
item 4: why the CPU run-times stop short of their byte bound).

    python -m bench.decode_anatomy MODEL... [--threads N] [--steps 8]
    python -m bench.decode_anatomy --rows [--threads N]

**Per model** (``squeeze.load``-ed in bf16, a 128-token prompt, then ``--steps`` timed decode steps,
best of 3 repeats), three wall times per step:

- ``step``: the model as loaded;
- ``no block products``: every product of a weight by the step's input inside the decoder blocks
  returns zeros of its output's shape instead (``F.linear``, the input-sparse bags of
  :mod:`squeeze.kernels.cpu_input_sparse`, the quantized linears and the one-call sites of
  ``cpu_native.SiteRows``, whose mask and non-zero search, a few microseconds, go with them);
  the LM head still runs;
- ``no products``: the LM head too.

So ``step - no block products`` is what the blocks' weights cost, ``no block products - no
products`` the LM head, and ``no products`` everything else: attention over the cache, norms,
rotary, the torch-side sites' masks and non-zero search, and Python. The zeros change what later layers see;
with a random model's threshold sites that changes only which rows a bag reads, not how many
(the thresholds keep their fraction of a normal input), so read the split as an estimate.

**--rows**: one token's input-sparse bag (``linear_rows_bag``) at 30% and 10% active inputs,
``index_select`` of the same rows (the copy alone) and the dense ``F.linear``, on the benchmark
model's two FFN shapes, cycling over bf16 weights of 4x the last-level cache (or 1 GiB) so every
read comes from memory, not from cache: GB/s of weight rows read.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
import torch.nn.functional as F

PROMPT = 128


def _zeros_like_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(*x.shape[:-1], n, dtype=x.dtype)


def _step_ms(model, steps: int) -> float:
    from squeeze.compat import cache_kwargs, new_cache

    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(PROMPT) % (vocab - 3) + 3).unsqueeze(0)
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            cache = new_cache(model.config)
            tok = model(input_ids=ids, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            for _ in range(2):
                tok = model(input_ids=tok, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = model(input_ids=tok, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


def anatomy(path: str, steps: int) -> dict:
    """{step, no_block_products, no_products} ms of one export (see the module docstring)."""
    import squeeze
    import squeeze.kernels.cpu_input_sparse as bags
    from squeeze.kernels import cpu_native
    from squeeze.runtime.quant import QuantLinear

    model = squeeze.load(path, dtype="bfloat16")
    head = model.get_output_embeddings().weight
    out = {"step": _step_ms(model, steps)}
    linear, bag_f, rows_mv, site = F.linear, bags.F, cpu_native.rows_mv, cpu_native.SiteRows.__call__
    quant = {m: (m.fn, m.rows) for m in model.modules() if isinstance(m, QuantLinear)}
    keep_head = [True]

    def fake_linear(x, w, b=None):
        if x.shape[-2] > 8 or (w is head and keep_head[0]):  # prefill, and the LM head while kept
            return linear(x, w, b)
        return _zeros_like_out(x, w.shape[0])

    def fake_quant(fn, n):
        return lambda x, prepared, bias=None, *rest: (fn(x, prepared, bias, *rest) if x.shape[-2] > 8
                                                       else _zeros_like_out(x, n))

    try:
        F.linear = fake_linear  # nn.Linear and the sites' dense paths look it up per call
        bags.F = types.SimpleNamespace(embedding_bag=lambda idx, w, off, **_: torch.zeros(off.numel(), w.shape[1],
                                                                                            dtype=w.dtype))
        cpu_native.rows_mv = lambda w, idx, val, offsets, out, *_, **__: out.zero_()  # our row kernel's bags
        cpu_native.SiteRows.__call__ = lambda self, x, thr, scale, most, out: out.zero_() is not None  # and sites
        for m, (fn, rows_) in quant.items():
            m.fn = fake_quant(fn, m.out_features)
            m.rows = None if rows_ is None else (fake_quant(rows_[0], m.out_features), rows_[1])
        out["no_block_products"] = _step_ms(model, steps)
        keep_head[0] = False
        out["no_products"] = _step_ms(model, steps)
    finally:
        F.linear, bags.F, cpu_native.rows_mv, cpu_native.SiteRows.__call__ = linear, bag_f, rows_mv, site
        for m, (fn, rows_) in quant.items():
            m.fn, m.rows = fn, rows_
    return out


def rows(active: float, k: int, n: int, nbytes: int | None = None) -> dict:
    """GB/s of weight rows read by the bag, by index_select of the same rows, and by dense F.linear,
    for one token at ``active`` on w_t [k, n], cycling over ``nbytes`` of weights (default: enough
    to read from memory, not from cache)."""
    from squeeze.kernels.cpu_input_sparse import linear_rows_bag, nonzero_entries
    from squeeze.roofline import bandwidth_bytes

    count = max(4, (nbytes or bandwidth_bytes()) // (k * n * 2) + 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    x[torch.rand(1, k, generator=g) > active] = 0
    entries = nonzero_entries(x)
    nrows = entries[1].numel()
    buf = torch.empty(nrows, n, dtype=torch.bfloat16)

    def rate(fn, weights, nbytes):
        for w in weights[:2]:
            fn(w)
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        return nbytes * len(weights) / (time.perf_counter() - t0) / 1e9

    w_t = [torch.randn(k, n, generator=g).to(torch.bfloat16) for _ in range(count)]
    got = {"bag": rate(lambda w: linear_rows_bag(x, w, None, entries), w_t, nrows * n * 2),
           "index_select": rate(lambda w: torch.index_select(w, 0, entries[1], out=buf), w_t, nrows * n * 2)}
    del w_t
    w = [torch.randn(n, k, generator=g).to(torch.bfloat16) for _ in range(count)]
    got["dense"] = rate(lambda w_: F.linear(x, w_), w, k * n * 2)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", action="store_true", help="bag / index_select / dense GB/s from memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rows:
        print(f"{args.threads} thread(s); GB/s of weight rows read, weights cycled from memory")
        for k, n in ((2048, 5632), (5632, 2048)):
            for active in (0.3, 0.1):
                r = rows(active, k, n)
                print(f"  w_t {k}x{n} active {active:.0%}: bag {r['bag']:.1f}  index_select {r['index_select']:.1f}  "
                      f"dense F.linear {r['dense']:.1f}")
    for path in args.models:
        a = anatomy(path, args.steps)
        blocks, head = a["step"] - a["no_block_products"], a["no_block_products"] - a["no_products"]
        print(f"{path}: {args.threads} thread(s), step {a['step']:.1f} ms = block weights {blocks:.1f} + LM head "
              f"{head:.1f} + the rest {a['no_products']:.1f}")


if __name__ == "__main__":
    main()
