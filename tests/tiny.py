"""Tiny random checkpoints of every supported architecture, built offline from each *Config
(2 layers), saved as safetensors folders. Shared by the test grid of every pass."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, head_dim=16)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(COMMON, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(COMMON)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 word_embed_proj_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                 eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "bert": ("BertConfig", "BertModel",
             dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0)),
}


def build(arch: str, folder: Path, seed: int = 0, dtype=torch.float32) -> Path:
    """Save a tiny random ``arch`` model into ``folder`` and return it."""
    import transformers

    cfg_name, model_name, kwargs = ARCHS[arch]
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    with torch.no_grad():  # random init leaves some norms/biases at exactly 0/1; perturb so they matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def token_rows(n: int, length: int, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def write_jsonl(rows, path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path
