"""Resume state of a training run: safetensors for the tensors, JSON for the rest (no pickle).

A state folder holds ``state.json`` and the ``state-<step>.safetensors`` it names: every trained
tensor (``param/<name>``), the optimizer's per-tensor state (``<key>/<name>``, e.g. Adam's
``exp_avg``, ``exp_avg_sq`` and ``step``), and in the JSON the step, the loss history, a
fingerprint of the settings and data, and whatever the caller keeps with it. Tensors are
written first and the JSON that points at them last, each renamed into place, so a crash at any
moment leaves the previous state usable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import SqueezeError

STATE_JSON = "state.json"


def fingerprint(settings: dict) -> str:
    """A short hash of ``settings`` (JSON-able; other values by their ``str``)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def has_state(folder: Path) -> bool:
    return (Path(folder) / STATE_JSON).is_file()


def save_state(folder: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
               meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, p in params.items():
        tensors[f"param/{n}"] = p.detach().contiguous()
        for key, value in opt.state.get(p, {}).items():
            tensors[f"{key}/{n}"] = value.detach().contiguous()
    name = f"state-{step:08d}.safetensors"
    save_file(tensors, str(folder / (name + ".tmp")))
    os.replace(folder / (name + ".tmp"), folder / name)
    (folder / (STATE_JSON + ".tmp")).write_text(json.dumps({**meta, "step": step, "tensors": name}, indent=2))
    os.replace(folder / (STATE_JSON + ".tmp"), folder / STATE_JSON)
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(folder: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, fingerprint: str,
               what: str = "training") -> dict:
    """Restore ``params`` and ``opt`` from ``folder``; returns the JSON. A state of another run
    (its fingerprint differs) is a :class:`SqueezeError`."""
    from safetensors.torch import load_file

    meta = json.loads((folder / STATE_JSON).read_text())
    if meta.get("fingerprint") != fingerprint:
        raise SqueezeError(f"{folder} holds a checkpoint of a different {what} run (other model, data or "
                           "settings); drop --resume to start over")
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / meta["tensors"])).items():
        kind, _, n = key.partition("/")  # parameter names hold dots, never slashes
        by_param.setdefault(n, {})[kind] = t
    state = {}
    with torch.no_grad():
        for i, (n, p) in enumerate(params.items()):
            per = by_param[n]
            p.copy_(per.pop("param"))
            if per:
                state[i] = per
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return meta
