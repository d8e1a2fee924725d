"""In-process A/B of batch-1 decode speed: several ``squeeze.load``-ed models in one process, each
decoding 16 tokens in turn, so machine-load drift hits every model alike (what ``squeeze bench``'s
process-per-case rounds cannot resolve below a few percent on a shared machine).

``python -m bench.decode_ab REFERENCE MODEL... [--turns 60] [--mask-off TEAL_EXPORT]`` prints each
model's tokens/s (process CPU time over the turns) and its ratio to the first. ``--mask-off`` adds
a TEAL export with every site's sparsity set to 0: the same masking forwards without the mask op,
to split the dense path's cost into the mask and the wrapper.
"""

from __future__ import annotations

import argparse
import time

import torch

import squeeze
from squeeze.compat import cache_kwargs, new_cache

PROMPT, STEP, LIMIT = 16, 16, 400  # prompt tokens, tokens per turn, restart before this position


def _mask_off(path):
    from squeeze.runtime import act_sparse

    model = squeeze.load(path)
    for sp in act_sparse.sparsifiers(model).values():
        sp.set(0.0, 0.0)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--mask-off")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = list(args.models) + ([f"{args.mask_off} (mask off)"] if args.mask_off else [])
    models = [squeeze.load(p) for p in args.models] + ([_mask_off(args.mask_off)] if args.mask_off else [])
    prompt = torch.randint(3, 500, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    spent, made = [0.0] * len(models), [0] * len(models)
    with torch.no_grad():
        state = [None] * len(models)
        for _ in range(args.turns):
            for i, m in enumerate(models):
                if state[i] is None or state[i][2] > LIMIT:
                    cache = new_cache(m.config)
                    out = m(input_ids=prompt, use_cache=True, **cache_kwargs(cache))
                    state[i] = [cache, out.logits[:, -1:].argmax(-1), PROMPT]
                cache, tok, pos = state[i]
                t0 = time.process_time()
                for _ in range(STEP):
                    tok = m(input_ids=tok, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
                spent[i] += time.process_time() - t0
                made[i] += STEP
                state[i] = [cache, tok, pos + STEP]
    base = made[0] / spent[0]
    for name, s, n in zip(names, spent, made):
        print(f"{name:60s} {n / s:8.1f} tok/s  {n / s / base:.3f}x")


if __name__ == "__main__":
    main()
