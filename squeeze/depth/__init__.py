"""Depth: use fewer decoder layers per token (the compress/train side; the run-time side, early
exit and ``squeeze.generate``, lives in :mod:`squeeze.runtime`).

- :mod:`squeeze.depth.layerskip`: the LayerSkip training recipe (layer dropout + early-exit loss).
- :mod:`squeeze.depth.layerdrop`: remove whole layers (importance-scored or evenly spaced).
- :mod:`squeeze.depth.tune`: ``squeeze tune-exit``, the sweep that picks the self-speculative settings.
"""
