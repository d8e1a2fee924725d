"""The Llama decoder in plain torch, so that a compress sweep need not import transformers.

Importing transformers' modeling code costs a squeeze process ~3 s and ~110 MB before any work
(it pulls in torch._dynamo, torch.distributed.tensor and sympy whatever the model), which on a
small model is a third of a whole ``squeeze compress``. A sweep only ever runs a model's blocks
forward, without a cache or a padding mask, so for the family most checkpoints belong to this
module is that forward: the same module tree and parameter names as transformers'
``LlamaForCausalLM`` (the adapter, the weight map, the passes and the export see no difference)
and the same arithmetic, op for op, as its SDPA path. ``tests/test_plain_llama.py`` holds the two
to identical bits, block by block and for whole exports.

:func:`plain_config` accepts a ``config.json`` only when every field this forward depends on is
one it computes as transformers does (default RoPE, SiLU, no biases, no tensor-parallel split);
anything else, and any sweep whose passes train or rebuild the whole model, takes transformers'
own classes (:func:`squeeze.modeling.build_skeleton`).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.errors import SqueezeError

# LlamaConfig's defaults (transformers 5.x) for the fields a config.json may leave out
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
            "attention_dropout": 0.0, "pad_token_id": None, "rope_theta": 10000.0}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class PlainConfig(types.SimpleNamespace):
    """A Llama ``config.json`` as attributes, with LlamaConfig's defaults filled in."""

    def get_text_config(self, *args, **kwargs):
        return self

    def to_dict(self) -> dict:
        return dict(vars(self))


def _rope_theta(config: dict) -> float | None:
    """The RoPE base when the config asks for plain (default) RoPE, else None. Both spellings:
    ``rope_theta`` + ``rope_scaling`` (configs saved before transformers 5) and ``rope_parameters``."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            return None
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(config.get("rope_theta", DEFAULTS["rope_theta"]))


def plain_config(config: dict) -> PlainConfig | None:
    """The config for :class:`LlamaForCausalLM` below, or None when ``config`` (a ``config.json``
    dict) names anything this forward does not compute exactly as transformers' does."""
    arch = config.get("architectures", ["LlamaForCausalLM"])
    if config.get("model_type") != "llama" or arch != ["LlamaForCausalLM"]:
        return None
    if any(not isinstance(config.get(k), int) for k in REQUIRED) or "auto_map" in config:
        return None
    theta = _rope_theta(config)
    out = {**DEFAULTS, **config, "rope_theta": theta}
    if theta is None or out["hidden_act"] != "silu" or out["attention_bias"] or out["mlp_bias"] \
            or out["pretraining_tp"] != 1:
        return None
    out.setdefault("num_key_value_heads", None)
    out["num_key_value_heads"] = out["num_key_value_heads"] or out["num_attention_heads"]
    out["head_dim"] = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
    if out["num_attention_heads"] % out["num_key_value_heads"] or out["head_dim"] % 2:
        return None
    return PlainConfig(**out)


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019, as Llama computes it: in fp32, the weight applied in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE tables (Su et al. 2021, RoFormer) for positions: cos and sin, each (B, T, head_dim)."""

    def __init__(self, config: PlainConfig):
        super().__init__()
        dim = config.head_dim
        # on the CPU even while the skeleton is built on the meta device: nothing stores it
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: PlainConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, heads, T, D)
        k = self.k_proj(x).view(shape).transpose(1, 2)  # (B, kv_heads, T, D)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        gqa = {"enable_gqa": True} if self.num_key_value_groups > 1 else {}
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scaling,
                                             is_causal=q.shape[2] > 1, **gqa)
        out = out.reshape(out.shape[0], -1, q.shape[2], v.shape[-1]).transpose(1, 2).contiguous()  # (B, T, heads, D)
        return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, config: PlainConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PlainConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, *,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], use_cache: bool = False, **kwargs):
        if attention_mask is not None or use_cache or any(v is not None for v in kwargs.values()):
            raise SqueezeError("the plain Llama forward runs calibration only: no padding mask, no KV cache")
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, config: PlainConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (B, T, C)
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        cos_sin = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin,
                      use_cache=False)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    """``LlamaForCausalLM``'s module tree and calibration forward (logits of every position)."""

    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PlainConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def skeleton(cls, config: PlainConfig) -> LlamaForCausalLM:
        """The model with its parameters on the meta device (filled from the checkpoint later), in
        eval mode. No parameter is initialised: the checkpoint replaces them all, and initialising
        a meta tensor imports torch._dynamo (~1.5 s)."""
        skipped = (nn.Linear, nn.Embedding)
        kept = [k.reset_parameters for k in skipped]
        try:
            for k in skipped:
                k.reset_parameters = lambda self: None
            with torch.device("meta"):
                model = cls(config)
        finally:
            for k, f in zip(skipped, kept):
                k.reset_parameters = f
        return model.eval().requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        return types.SimpleNamespace(logits=self.lm_head(self.model(input_ids)))
