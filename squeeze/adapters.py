"""Adapters: what is a block, and which linear plays which role, for any transformers model.

Blocks and linears are inferred (``_no_split_modules``, scanning for ``nn.Linear`` and GPT-2's
``Conv1D``); a small suffix table names roles, including fused layouts (Phi-3 ``qkv_proj`` /
``gate_up_proj``, GPT-2 ``c_attn``). Passes talk to linears through :class:`Linear`, whose
``weight`` is always ``[out_features, in_features]`` even when the module stores it transposed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.modeling import SUPPORTED_TYPES

# Role of a linear by the end of its name inside a block; the longest matching suffix wins.
# Non-gated MLPs map fc1 -> "up" and fc2 -> "down" so passes have one vocabulary.
ROLE_SUFFIXES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o", "dense": "o",
    "qkv_proj": "qkv", "query_key_value": "qkv", "c_attn": "qkv", "attn.c_proj": "o",
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "fc1": "up", "fc2": "down", "mlp.c_fc": "up", "mlp.c_proj": "down",
    "intermediate.dense": "up", "output.dense": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "w1": "gate", "w3": "up", "w2": "down",
}
ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down")

# Where the blocks are when inference would be ambiguous (e.g. a VLM has two stacks).
BLOCK_PATHS = {"llava": "model.language_model.layers", "llava_next": "model.language_model.layers"}


def _conv1d_type():
    """GPT-2's ``Conv1D`` class, or () while nothing has imported it: no module can be one then, and
    asking must not import transformers (squeeze.plain_llama's sweeps never do)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", ())


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or isinstance(module, _conv1d_type())


@dataclass
class Linear:
    """One linear layer of a block. ``weight`` is a [out, in] view that writes through."""

    name: str
    role: str
    module: nn.Module
    block_index: int

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight(self, w: torch.Tensor) -> None:
        self.weight.copy_(w.to(self.module.weight.dtype))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def inputs_2d(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten a forward input to [tokens, in_features]."""
        return x.reshape(-1, x.shape[-1])


@dataclass
class Block:
    index: int
    name: str
    module: nn.Module
    linears: dict[str, Linear] = field(default_factory=dict)

    def by_role(self, *roles: str) -> list[Linear]:
        return [lin for lin in self.linears.values() if lin.role in roles]


class Adapter:
    """Maps a transformers model to its blocks and linears by role."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.model_type = getattr(model.config, "model_type", "?")
        self.blocks_path = BLOCK_PATHS.get(self.model_type) or _infer_blocks_path(model)
        self.blocks: nn.ModuleList = model.get_submodule(self.blocks_path)
        self.gated_mlp = any(r in ("gate", "gate_up") for r in self._roles_of(self.blocks[0]))

    @staticmethod
    def _roles_of(block: nn.Module):
        return [role_of(n) for n, m in block.named_modules() if is_linear(m)]

    def __len__(self) -> int:
        return len(self.blocks)

    def block(self, i: int) -> Block:
        module = self.blocks[i]
        name = f"{self.blocks_path}.{i}"
        lins = {}
        for sub, m in module.named_modules():
            if sub and is_linear(m):
                lins[f"{name}.{sub}"] = Linear(f"{name}.{sub}", role_of(sub), m, i)
        return Block(i, name, module, lins)

    def non_block_modules(self) -> list[str]:
        """Names of the smallest modules outside the blocks that own parameters (embeddings,
        norms, heads); together with the blocks they cover every parameter."""
        out = []
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            if not name.startswith(self.blocks_path + "."):
                out.append(name.rpartition(".")[0])
        return sorted(set(out))

    def describe(self) -> dict:
        return {"model_type": self.model_type, "blocks": self.blocks_path, "num_blocks": len(self),
                "gated_mlp": self.gated_mlp}


def role_of(name_in_block: str) -> str:
    best, role = -1, "linear"
    for suffix, r in ROLE_SUFFIXES.items():
        if (name_in_block == suffix or name_in_block.endswith("." + suffix)) and len(suffix) > best:
            best, role = len(suffix), r
    return role


def _infer_blocks_path(model: nn.Module) -> str:
    from squeeze.compat import no_split_modules

    block_types = no_split_modules(model)
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            kinds = {type(c).__name__ for c in m}
            is_block = len(kinds) == 1 and next(iter(kinds)) in block_types
            # a loaded model's blocks may hold only kernel modules (quantized, 2:4) by now: the
            # model's own block type still names them
            if len(kinds) == 1 and (is_block or any(is_linear(x) for x in m[0].modules())):
                numel = sum(p.numel() for p in m.parameters())
                found.append((is_block, numel, name))
    if not found:
        raise SqueezeError(
            f"cannot find transformer blocks in {type(model).__name__} (model_type "
            f"{getattr(model.config, 'model_type', '?')!r}); squeeze supports {', '.join(SUPPORTED_TYPES)}"
        )
    return max(found)[2]
