"""How freed tensor memory goes back to the system (imports nothing heavy: the CLI calls it first).

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

# checkpoint weight bytes from which the CLI asks for it before loading anything
LARGE_MODEL_BYTES = 512 << 20
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
