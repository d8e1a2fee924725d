"""Pure helpers for vision-token dropping in LLaVA-family models: where the image tokens are
(``layout``), the attention a layer would pay them (``attention``, the scoring math) and the
FLOPs of a token-dropping prefill (``flops``). The run-time pieces (the token-dropping forward
and the PyramidDrop / MustDrop policies) live in :mod:`squeeze.runtime`.
"""

from squeeze.vision.layout import image_token_id, image_token_mask, image_token_positions

__all__ = ["image_token_id", "image_token_mask", "image_token_positions"]
