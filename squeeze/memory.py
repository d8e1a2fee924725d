"""The memory of a compress run: how freed tensor memory goes back to the system, and the bound a
streamed sweep should stay under (:func:`memory_bound`). Imports nothing heavy: the CLI calls it
before torch loads.

By default glibc raises its mmap threshold to the size of each mapping freed (up to 32 MB); after
that, a block sweep's weight- and activation-sized tensors come from the heap, which fragments
and keeps far more than is live. Giving every allocation of 1 MB or more its own mapping,
returned when freed, keeps a streamed sweep near what is live: a random 1.34 GB Llama (blocks of
172 MiB) was killed by a 1.0 GB memory cap with the default and compresses under it with this
(bench/README.md §1b). With small blocks the extra page faults cost more than they save (a
20M-parameter Llama's sweep took 1.55x as long), so it is asked for only when the model is large:
by the CLI before anything is imported (the earlier, the less the heap has grown: 927 vs 1003 MB
peak on a 4-layer model of that shape), and by the runner for large blocks otherwise.
"""

from __future__ import annotations

from pathlib import Path

# checkpoint weight bytes from which the CLI asks for it before loading anything, and block
# bytes (fp32) from which the runner does
LARGE_MODEL_BYTES = 512 << 20
LARGE_BLOCK_BYTES = 64 << 20
# What one forward of a block may allocate for its intermediate activations (about four tensors
# of tokens x the block's widest linear output, fp32, alive at once in a gated MLP and its hooks):
# calibration batches hold at most the tokens that fit (squeeze.calib.runner.forward_tokens)
FORWARD_BYTES = 96 << 20
MAX_BATCH_TOKENS = 4096
_asked = False


def unmap_freed_tensors() -> None:
    """Once per process: mallopt(M_MMAP_THRESHOLD = -3, 1 MB). glibc only; elsewhere nothing changes."""
    global _asked
    if _asked:
        return
    _asked = True
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


def weight_bytes(folder) -> int:
    """The safetensors bytes in a checkpoint folder (0 when it is not one): a stat per file."""
    try:
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    except (OSError, TypeError):
        return 0


def fp32_bytes(module) -> int:
    """What ``module``'s parameters take in float32 (shapes only: works on the meta skeleton)."""
    return sum(p.numel() for p in module.parameters()) * 4


def largest_block_fp32(adapter) -> int:
    return max(fp32_bytes(b) for b in adapter.blocks)


def memory_bound(adapter, weights, calib, base_bytes: int, passes=()) -> dict:
    """What a streamed sweep (:class:`squeeze.calib.runner.BlockRunner`, ``keep=False``) should
    peak at, in MB, from the shapes alone (``adapter`` over the skeleton, its
    :class:`~squeeze.modeling.WeightMap` ``weights``, the calibration ``calib`` or None, the block
    ``passes``): the process before any weight is read (``base_bytes``: the interpreter and its
    libraries), plus the larger of the capture (the modules outside the blocks in fp32, and the
    activations) and one block: its fp32 weights twice (the weights, and the solver's and the
    export's copies of them: scores and masks, the cast and packed tensors), its stored bytes
    (mapped while read), the activations entering and leaving it, one forward's intermediates
    (:data:`FORWARD_BYTES`), and the Hessians of second-order ``passes`` (each observed linear's
    in x in float64 sums are all held after the statistics forward, and one batch's product is
    added at a time; solving one takes two more matrices of its size: the factor and the
    inverse). Embeddings, the LM head and file pages of earlier blocks are not held, so the bound
    does not grow with the vocabulary or the depth."""
    model = adapter.model

    def stored(prefix: str) -> int:
        return sum(weights.ckpt.nbytes(k) for n, k in weights.to_ckpt.items() if n.startswith(prefix))

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    outside = sum(fp32_bytes(model.get_submodule(n)) for n in adapter.non_block_modules()
                  if model.get_submodule(n) is not head)
    block = largest_block_fp32(adapter)
    block_stored = max(stored(f"{adapter.blocks_path}.{i}.") for i in range(len(adapter)))
    width = max(p.shape[-1] for p in model.get_input_embeddings().parameters()) if hasattr(
        model, "get_input_embeddings") else 0
    acts = sum(s.numel() for s in calib.samples) * width * 4 if calib is not None else 0
    first = adapter.block(0)
    observed = {lin.name: lin.in_features for p in passes if p.hessians for lin in p.observed(first)}
    square = [n * n * 8 for n in observed.values()]
    # solved in order, each popped when solved: while linear j is solved, j and the later ones are held
    hessians = max((sum(square[j:]) + 2 * square[j] for j in range(len(square))), default=0)
    if square:  # and one batch's product being added (calib.stats.HESSIAN_TEMP_BYTES)
        from squeeze.calib.stats import HESSIAN_TEMP_BYTES

        hessians += HESSIAN_TEMP_BYTES
    parts = {"interpreter": base_bytes, "block_fp32": block, "block_stored": block_stored,
             "activations": acts, "forward": FORWARD_BYTES if calib is not None else 0, "hessians": hessians,
             "outside_fp32": outside}
    total = base_bytes + max(outside + acts, 2 * block + block_stored + 2 * acts + parts["forward"] + hessians)
    return {"total_mb": round(total / 2**20, 1), **{f"{k}_mb": round(v / 2**20, 1) for k, v in parts.items()}}
