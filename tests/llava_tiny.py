"""Tiny random LLaVA checkpoints (CLIP vision tower + Llama language model), built offline.

Kept apart from ``tests/tiny.py`` (whose ARCHS feed every pass's grid) because a VLM needs
pixel inputs and an image-token layout the text-only grid does not provide.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = 127
PATCH_GRID = 4  # 32x32 image, 8x8 patches -> 4x4 = 16 image tokens


def config(layers: int = 4, attn: str = "sdpa", **text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(**{"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                          **text_overrides})
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                       image_seq_length=PATCH_GRID * PATCH_GRID, attn_implementation=attn)


def model(layers: int = 4, seed: int = 0, attn: str = "sdpa", **text_overrides):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(config(layers, attn, **text_overrides)).eval()
    with torch.no_grad():  # random init leaves norms at exactly 1 / biases 0; perturb so they matter
        for _, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return m


def build(folder: Path, layers: int = 4, seed: int = 0) -> Path:
    model(layers, seed).save_pretrained(folder)
    return Path(folder)


def inputs(batch: int = 1, seed: int = 0, prefix: int = 3, suffix: int = 5):
    """input_ids with one image (16 placeholder tokens) between text, and matching pixel_values."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, 120, (batch, prefix), generator=g)
    post = torch.randint(3, 120, (batch, suffix), generator=g)
    img = torch.full((batch, PATCH_GRID * PATCH_GRID), IMAGE_TOKEN)
    ids = torch.cat([pre, img, post], 1)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return ids, pixels


def next_model(layers: int = 4, seed: int = 0):
    """Tiny LLaVA-NeXT: a 32x64 image -> base grid (16) + 2 anyres tiles laid out as 4 rows of
    8 patches each followed by an image_newline feature (36) = 52 image tokens."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = config(layers)
    cfg = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config, image_token_id=IMAGE_TOKEN,
                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(cfg).eval()


NEXT_IMAGE_TOKENS = 52


def next_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 120, (1, 3), generator=g), torch.full((1, NEXT_IMAGE_TOKENS), IMAGE_TOKEN),
                     torch.randint(3, 120, (1, 5), generator=g)], 1)
    return ids, torch.randn(1, 3, 3, 32, 32, generator=g), torch.tensor([[32, 64]])
