"""Where the image tokens are in a LLaVA-family sequence.

LLaVA and LLaVA-NeXT both put one placeholder token (``config.image_token_id``, older configs
``image_token_index``) per image feature into ``input_ids``; the model scatters the projected
vision features into those slots. LLaVA-NeXT's layout differs (base image, then anyres tiles
with an ``image_newline`` feature after every row), but every such feature still sits on a
placeholder, so the positions are the same test. The 2-D patch grid, needed for spatial
merging, is only known for plain LLaVA (one square grid per image).
"""

from __future__ import annotations

import math

import torch

from squeeze.errors import SqueezeError


def image_token_id(config) -> int:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise SqueezeError(f"model_type {getattr(config, 'model_type', '?')!r} has no image_token_id in its config; "
                       "vision-token dropping needs a LLaVA-family model")


def image_token_mask(config, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where ``input_ids`` holds the image placeholder."""
    return input_ids == image_token_id(config)


def image_token_positions(config, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the (sorted) sequence indices of its image tokens."""
    mask = image_token_mask(config, input_ids.reshape(-1, input_ids.shape[-1]))
    return [row.nonzero().flatten() for row in mask]


def patch_grid_side(config) -> int | None:
    """Side of the square patch grid of one image for plain LLaVA, None when unknown (LLaVA-NeXT
    anyres layouts, or a vision config without image/patch size)."""
    if getattr(config, "model_type", None) != "llava":
        return None
    vc = getattr(config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if not size or not patch:
        return None
    return int(size) // int(patch)


def image_runs(mask_row: torch.Tensor, tokens_per_image: int | None) -> list[torch.Tensor]:
    """Split one row's image-token indices into per-image runs of ``tokens_per_image`` (the
    placeholders of consecutive images may touch, so contiguity alone cannot separate them)."""
    idx = mask_row.nonzero().flatten()
    if tokens_per_image is None or idx.numel() % tokens_per_image:
        return []
    return list(idx.split(tokens_per_image))


def grid_windows(side: int, window: int) -> list[list[int]]:
    """Token indices (row-major in a side x side grid) of each window x window window, tiling
    the grid from the top-left; windows at the right/bottom edge may be smaller."""
    out = []
    for r0 in range(0, side, window):
        for c0 in range(0, side, window):
            out.append([r * side + c for r in range(r0, min(r0 + window, side))
                        for c in range(c0, min(c0 + window, side))])
    return out


def is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n
