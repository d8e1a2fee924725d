"""Depth: use fewer decoder layers per token.

- :mod:`squeeze.depth.stack`: run any contiguous range of a causal LM's decoder layers with a
  shared KV cache, plus the final norm / LM head (the "exit head") of every supported arch.
- :mod:`squeeze.depth.speculative`: ``squeeze.generate`` (plain and self-speculative decoding).
- :mod:`squeeze.depth.early_exit`: early-exit inference (fixed layer or per-token confidence).
- :mod:`squeeze.depth.layerskip`: the LayerSkip training recipe (layer dropout + early-exit loss).
- :mod:`squeeze.depth.layerdrop`: remove whole layers (importance-scored or evenly spaced).
"""
