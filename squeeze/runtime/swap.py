"""Swapping a loaded model's linear for a kernel module (quantized codes, 2:4 values) without
losing what a run-time attached to it.

``squeeze.load`` installs the recorded run-times on the plain dense model first (the adapter finds
their linears as ``nn.Linear``), then swaps weights for kernels. A swap that dropped the run-time
state would run the export wrong without a word: a TEAL / WINA site's mask and the sparsifier its
host owns, or dReLU's ReLU on the up projection. :func:`replace_linear` is the one way such a swap
is made, and it moves them onto the new module.
"""

from __future__ import annotations

from torch import nn


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the linear ``name`` is, with the old module's forward hooks and
    activation-sparse site; returns ``new``."""
    from squeeze.runtime.act_sparse import carry_site

    old = model.get_submodule(name)
    for hook in old._forward_pre_hooks.values():
        new.register_forward_pre_hook(hook)
    relu = old.__dict__.get("_squeeze_relu_hook")  # dReLU's handle: idempotent installs check it
    for hook_id, hook in old._forward_hooks.items():
        handle = new.register_forward_hook(hook)
        if relu is not None and relu.id == hook_id:
            new.__dict__["_squeeze_relu_hook"] = handle
    carry_site(old, new)
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, new)
    return new
