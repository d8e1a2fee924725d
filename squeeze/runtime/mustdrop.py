"""MustDrop-style multi-stage vision-token dropping.

Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
Model" (2024), https://arxiv.org/abs/2411.10803 (reference code: liuting20/MustDrop). Three
stages, all training-free:

1. Before the language model: inside each image's patch grid, a window (``window`` x
   ``window``) whose tokens have a mean pairwise cosine similarity >= ``merge_threshold`` is
   merged into one token placed at the window's first (top-left) slot. The merged token is the
   weighted average of the window, weights = each token's importance (below), normalised over
   the window. A key set, the top ``key_fraction`` tokens of each image by importance, is never
   dropped and never merged (a window containing a key token is left alone). Importance is the
   vision encoder's CLS attention (head mean, at the encoder layer ``vision_layer``, default the
   layer that reads the selected features) or, without a CLS token, the L2 norm of the token.
   Differences from the paper: the paper merges after CLIP layer 0 and re-runs the rest of
   CLIP on fewer tokens; here the merge is applied to the projected features at the language
   model's input, so the stock vision tower and transformers' placeholder check are untouched.
2. Prefill, at each layer in ``layers``: with ``a`` the head-mean attention of the text
   queries (recomputed with that layer's norm, q/k and rotary), an image token ``v`` is dropped
   when ``sum_text a[:, v] < global_threshold * sum(a)`` AND ``max_text a[:, v] <
   individual_threshold``, unless it is in the key set.
3. After prefill: the KV caches of the layers from the first drop layer on are cut to the
   tokens that survived the last drop (``trim_cache``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from squeeze.errors import SqueezeError
from squeeze.runtime.token_drop import selection
from squeeze.vision.attention import layer_attention
from squeeze.vision.layout import grid_windows, image_runs, patch_grid_side

# --- pure functions ------------------------------------------------------------------------


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """(w, C) -> scalar: the mean cosine similarity over all pairs i < j."""
    w = x.shape[0]
    if w < 2:
        return x.new_tensor(float("nan"))
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = u @ u.T
    return (sim.sum() - sim.diagonal().sum()) / (w * (w - 1))


def merge_windows(x: torch.Tensor, windows: list[list[int]], weights: torch.Tensor, protected: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge similar windows of one image's tokens.

    x: (n, C) tokens; windows: lists of token indices; weights: (n,) >= 0; protected: (n,) bool.
    Returns (x', keep): x' has each merged window's weighted average at its first index;
    keep (n,) is False for the other members of merged windows.
    """
    x = x.clone()
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for win in windows:
        if len(win) < 2:
            continue
        idx = torch.tensor(win, device=x.device)
        if bool(protected[idx].any()) or float(mean_pairwise_cosine(x[idx])) < threshold:
            continue
        w = weights[idx].double().clamp_min(0)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(win))
        x[idx[0]] = (w[:, None] * x[idx].double()).sum(0).to(x.dtype)
        keep[idx[1:]] = False
    return x, keep


def key_set(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    """(n,) -> (n,) bool: the ceil(fraction * n) most important tokens."""
    n = importance.shape[0]
    k = min(n, math.ceil(fraction * n))
    out = torch.zeros(n, dtype=torch.bool, device=importance.device)
    if k:
        out[importance.float().topk(k).indices] = True
    return out


def attention_drop(a_text: torch.Tensor, image: torch.Tensor, protected: torch.Tensor, global_threshold: float,
                   individual_threshold: float) -> torch.Tensor:
    """MustDrop's dual rule. a_text: (B, Q, n) attention of the text queries (rows of non-text
    queries zeroed); image/protected: (B, n) bool. Returns (B, n) bool: the image tokens to drop
    (little attention in total AND from every single text query, and not protected)."""
    total = a_text.sum(1)  # (B, n)
    overall = a_text.sum((1, 2))[:, None]  # (B, 1): all the text queries' attention
    peak = a_text.max(1).values
    return image & ~protected & (total < global_threshold * overall) & (peak < individual_threshold)


def cls_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """CLIP-style encoder layer + its input (N_img, 1 + P, C) -> (N_img, 1 + P): head-mean
    attention of the CLS token (row 0) over all tokens."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    b, n, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, -1)  # (b, H, 1, n)
    return probs.mean(1)[:, 0]


# --- the policy ----------------------------------------------------------------------------


def default_layers(num_layers: int) -> list[int]:
    """The reference drops at LLM layers 2, 6, 10, 14 of 32; scaled to the stack's depth."""
    return sorted({max(1, round(num_layers * f / 32)) for f in (2, 6, 10, 14)} - {num_layers})


@dataclass
class MustDropPolicy:
    boundaries: list[int] | None = None
    global_threshold: float = 0.001
    individual_threshold: float = 0.001
    merge_threshold: float = 0.8
    window: int = 3
    key_fraction: float = 0.08
    trim_cache: bool = True
    vision_layer: int | None = None  # encoder layer whose CLS attention ranks tokens

    def __post_init__(self):
        if self.boundaries is not None and (list(self.boundaries) != sorted(set(self.boundaries))
                                            or any(b < 1 for b in self.boundaries)):
            raise SqueezeError(f"mustdrop layers must be increasing layer indices >= 1, got {self.boundaries}")
        for name in ("global_threshold", "individual_threshold", "key_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SqueezeError(f"mustdrop {name} must be in [0, 1], got {getattr(self, name)}")
        if self.window < 1:
            raise SqueezeError(f"mustdrop window must be >= 1, got {self.window}")

    def score_queries(self, n: int, text: int) -> int:
        return text  # every text row is a query (FLOPs accounting)

    @property
    def trim_after_prefill(self) -> bool:
        return self.trim_cache

    def layers(self, num_layers: int) -> list[int]:
        layers = list(self.boundaries) if self.boundaries is not None else default_layers(num_layers)
        if any(b >= num_layers for b in layers):
            raise SqueezeError(f"mustdrop layers {layers} exceed the language model's {num_layers} layers")
        return layers

    # stage 1 ------------------------------------------------------------------------------
    def _vision_layers(self, runtime):
        tower = runtime.vlm.vision_tower
        enc = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        layers = getattr(enc, "layers", None)
        emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        if layers is None or not hasattr(emb, "class_embedding"):
            return None  # no CLS token: rank by norm
        return layers

    def before_vision(self, runtime, pending) -> list:
        layers = self._vision_layers(runtime) if pending.get("pixel_values") is not None else None
        if layers is None:
            return []
        j = self.vision_layer
        if j is None:  # the layer reading the selected features (hidden_states[f] is layer f's input)
            f = runtime.config.vision_feature_layer
            f = f if isinstance(f, int) else f[-1]
            j = f % (len(layers) + 1)
            j = min(j, len(layers) - 1)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                pending["cls_attention"] = cls_attention(module, hidden)

        return [layers[j].register_forward_pre_hook(hook, with_kwargs=True)]

    def _importance(self, runtime, seq) -> torch.Tensor:
        imp = seq.hidden.float().norm(dim=-1)  # (B, T) fallback: token norm
        cls = (runtime.pending or {}).get("cls_attention")
        if cls is not None:
            strategy = getattr(runtime.config, "vision_feature_select_strategy", "default")
            cls = cls[:, 1:] if strategy == "default" else cls
            flat = cls.reshape(-1).to(imp.device)
            if flat.numel() == int(seq.image.sum()):
                imp = imp.masked_scatter(seq.image, flat)  # placeholders are filled in the same order
        return imp

    def before_llm(self, runtime, seq) -> torch.Tensor:
        imp = self._importance(runtime, seq)
        side = patch_grid_side(runtime.config)
        per_image = side * side if side else None
        keep = torch.ones_like(seq.image)
        protected = torch.zeros_like(seq.image)
        hidden = seq.hidden.clone()
        for b in range(seq.image.shape[0]):
            runs = image_runs(seq.image[b], per_image) or ([seq.image[b].nonzero().flatten()] if seq.image[b].any()
                                                           else [])
            for idx in runs:
                prot = key_set(imp[b, idx], self.key_fraction)
                protected[b, idx] = prot
                if per_image and self.window > 1 and len(idx) == per_image:
                    x, k = merge_windows(hidden[b, idx], grid_windows(side, self.window), imp[b, idx], prot,
                                         self.merge_threshold)
                    hidden[b, idx] = x
                    keep[b, idx] = k
        seq.hidden, seq.protected = hidden, protected
        return keep

    # stage 2 ------------------------------------------------------------------------------
    def select(self, runtime, index: int, layer, seq) -> torch.Tensor:
        text = seq.valid & ~seq.image  # (B, n)
        rows = selection(text)  # (B, Q) the text rows (shorter rows padded with other rows)
        real = text.gather(1, rows)  # (B, Q) which of them are text queries
        a = layer_attention(layer, seq.hidden, seq.cos, seq.sin, rows, seq.valid, seq.orig)  # (B, Q, n)
        a_text = a * real[:, :, None]
        return ~attention_drop(a_text, seq.image & seq.valid, seq.protected, self.global_threshold,
                               self.individual_threshold)
