"""Plain-torch references for the activation-sparse FFN kernels, and the activity rules they share.

A gated FFN: ``y = (act(x Wg^T) * up'(x Wu^T)) Wd^T`` with, for x [T, H]:

    w_gate, w_up [I, H]   (nn.Linear layout)
    w_downT      [I, H]   the down projection stored *transposed* (Deja Vu's
                          gather_transposed_gemv layout): neuron i's output row is contiguous,
                          so skipping a neuron skips one contiguous row.

Activation kinds (``act``): "swiglu" silu(g) * u; "relu" relu(g) * u; "drelu" relu(g) * relu(u)
(ReLU^2-style dReLU of TurboSparse).

Which neurons are active (per token, then OR-ed over the chunk = BlockFFN's chunk-level union):
  * threshold None, relu/drelu: gate > 0 (relu(gate) is exactly 0 otherwise: skipping is exact);
  * threshold None, swiglu: every neuron (silu is never exactly 0; use a threshold for sparsity);
  * threshold t, threshold_on "h" (TEAL/WINA-style on the intermediate, the default):
    |act(gate) * up'| > t. Needs gate *and* up for every neuron; saves the down projection;
  * threshold t, threshold_on "gate" (CATS-style): |act(gate)| > t. Needs gate for every neuron;
    saves up and down.
A neuron in the union is computed exactly for every token of the chunk (no per-token masking inside
the union), so for one token the result is the thresholded FFN and for relu kinds without a
threshold it equals the dense FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "act_mul",
    "active_neurons",
    "chunk_sparse_ffn_reference",
    "dense_ffn_reference",
    "sparse_ffn_reference",
]

ACTIVATIONS = ("swiglu", "relu", "drelu")
THRESHOLD_ON = ("h", "gate")


def check_act(act: str, threshold: float | None = None, threshold_on: str = "h") -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if threshold_on not in THRESHOLD_ON:
        raise ValueError(f"threshold_on must be one of {THRESHOLD_ON}, got {threshold_on!r}")
    if threshold is not None and not torch.is_tensor(threshold) and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")  # tensors: not read (no sync)


def act_gate(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "swiglu" else torch.relu(g)


def act_mul(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """h = act(g) * up'(u) for the three kinds."""
    if act == "swiglu":
        return F.silu(g) * u
    if act == "relu":
        return torch.relu(g) * u
    if act == "drelu":
        return torch.relu(g) * torch.relu(u)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def active_neurons(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    threshold: float | None = None,
    threshold_on: str = "h",
) -> torch.Tensor:
    """Union over the chunk of the active neurons: gate/up [T, I] pre-activations -> bool [I].

    ``up`` is only read when threshold_on == "h" and a threshold is given.
    """
    check_act(act, threshold, threshold_on)
    if threshold is None:
        if act == "swiglu":
            return torch.ones(gate.shape[-1], dtype=torch.bool, device=gate.device)
        per_token = gate > 0
    elif threshold_on == "gate":
        per_token = act_gate(gate, act).abs() > threshold
    else:
        if up is None:
            raise ValueError("threshold_on='h' needs the up projection")
        per_token = act_mul(gate, up, act).abs() > threshold
    return per_token.any(dim=0)


def dense_ffn_reference(x, w_gate, w_up, w_downT, act: str) -> torch.Tensor:
    """The dense FFN with the transposed down weight. x [T, H] -> [T, H]."""
    h = act_mul(F.linear(x, w_gate), F.linear(x, w_up), act)  # (T, I)
    return h @ w_downT  # (T, H)


def sparse_ffn_reference(x, w_gate, w_up, w_downT, indices, act: str, count=None) -> torch.Tensor:
    """FFN restricted to the neurons ``indices[:count]``: y = act(x Wg[idx]^T) * up' @ WdT[idx]."""
    idx = indices.reshape(-1)
    if count is not None:
        idx = idx[: int(count.reshape(-1)[0]) if torch.is_tensor(count) else int(count)]
    idx = idx.long()
    h = act_mul(F.linear(x, w_gate[idx]), F.linear(x, w_up[idx]), act)  # (T, n)
    return h @ w_downT[idx]  # (T, H)


def chunk_sparse_ffn_reference(
    x, w_gate, w_up, w_downT, act: str, threshold: float | None = None, threshold_on: str = "h"
) -> torch.Tensor:
    """Chunk-level sparse FFN: gate (and up if needed) for all neurons, union of active neurons,
    then the FFN over that union."""
    check_act(act, threshold, threshold_on)
    gate = F.linear(x, w_gate)  # (T, I)
    up = F.linear(x, w_up) if (threshold is not None and threshold_on == "h") else None
    idx = active_neurons(gate, up, act, threshold, threshold_on).nonzero().squeeze(1)  # (n,)
    return sparse_ffn_reference(x, w_gate, w_up, w_downT, idx, act)
