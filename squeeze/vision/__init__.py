"""Vision-token dropping for LLaVA-family models (PyramidDrop, MustDrop-style multi-stage).

The math lives in small pure functions (``attention``, ``pyramiddrop``, ``mustdrop``); the
``runtime`` replaces the language model's layer loop so that image tokens can leave the
sequence at chosen layers while positions, masks and the per-layer KV cache stay consistent.
"""

from squeeze.vision.layout import image_token_id, image_token_mask, image_token_positions
from squeeze.vision.runtime import TokenDropRuntime, install, uninstall

__all__ = ["TokenDropRuntime", "image_token_id", "image_token_mask", "image_token_positions", "install", "uninstall"]
