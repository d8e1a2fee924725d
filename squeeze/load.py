"""``squeeze.load``: a transformers model from an export, with squeeze's run-time state applied.

The weights load through plain ``from_pretrained`` (safetensors only). Then every pass recorded
in ``squeeze.json`` gets its ``on_load`` hook (to swap in run-time modules), and tensors from
the ``squeeze.safetensors`` sidecar (thresholds and other run-time buffers) are loaded by name.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from squeeze.checkpoint import Checkpoint
from squeeze.errors import SqueezeError
from squeeze.export import RECORD, SIDECAR
from squeeze.modeling import load_config, model_class


def read_record(path: str | Path) -> dict:
    f = Path(path) / RECORD
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise SqueezeError(f"{f}: unreadable ({e})") from None


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         trust_remote_code: bool = False, attn_implementation: str | None = None) -> torch.nn.Module:
    """Load a checkpoint (squeeze export or any HF checkpoint folder) ready for inference."""
    ckpt = Checkpoint(path)
    config = load_config(ckpt, trust_remote_code)
    cls = model_class(config, trust_remote_code)
    kwargs = {"dtype": dtype or "auto", "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = cls.from_pretrained(str(ckpt.path), trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise SqueezeError(f"{ckpt.path}: cannot load model ({str(e).splitlines()[0][:160]})") from None
    record = read_record(ckpt.path)
    if record:
        from squeeze.passes import get_pass

        for entry in record.get("passes", []):
            get_pass(entry["pass"]).on_load(model, entry, ckpt.path, record)
        sidecar = ckpt.path / SIDECAR
        if sidecar.is_file():
            from safetensors.torch import load_file

            state = load_file(str(sidecar))
            missing = [k for k in state if k not in dict(model.state_dict())]
            if missing:
                raise SqueezeError(f"{sidecar}: tensors {missing[:3]} have no place in the loaded model")
            model.load_state_dict(state, strict=False)
    model.squeeze_record = record
    return model.to(device).eval()
