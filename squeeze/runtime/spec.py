"""The run-time spec: what ``squeeze.load`` installs for each kind of record in ``squeeze.json``.

Every entry of ``squeeze.json``'s ``passes`` names the method that wrote it. Its kind maps here
to the function that re-creates the run-time state on a freshly loaded model (modules swapped
in, hooks, empty buffers whose values then load from the sidecar by name), or to ``None`` when
the exported weights say everything. A kind missing from this table is an export this squeeze
does not understand: loading refuses it rather than run it silently wrong. The conformance grid
checks that every registered method has an entry.
"""

from __future__ import annotations

import importlib

from torch import nn

from squeeze.errors import SqueezeError

# record kind -> "module:function" installing its run-time, or None (weights only)
RUNTIMES: dict[str, str | None] = {
    "magnitude": None, "wanda": None, "sparsegpt": None, "dsnot": None,
    "dass": None,  # exports before DaSS became wanda/sparsegpt/magnitude with mlp_scoring=dass
    "recover": None, "layerskip": None, "layerdrop": None,
    "quantize": None,  # dense: dequantized weights; compressed: codes the loader decodes (format.linears)
    "teal": "squeeze.runtime.act_sparse:install_recorded",
    "wina": "squeeze.runtime.act_sparse:install_recorded",
    "drelu": "squeeze.runtime.drelu:install_recorded",
    "pyramiddrop": "squeeze.runtime.spec:install_pyramiddrop",
    "mustdrop": "squeeze.runtime.spec:install_mustdrop",
}


def needs_runtime(kind: str) -> bool:
    """Whether records of ``kind`` need squeeze at load time (plain from_pretrained is not enough)."""
    return RUNTIMES.get(kind, "?") is not None


def install(model: nn.Module, record: dict, where: str = "") -> None:
    """Apply the run-time of every recorded entry, in order."""
    for entry in record.get("passes") or []:
        kind = entry.get("pass")
        if kind not in RUNTIMES:
            from squeeze.versions import versions

            raise SqueezeError(f"{where or 'squeeze.json'} records method {kind!r}, which squeeze "
                               f"{versions()['squeeze_version']} does not know how to load; upgrade squeeze")
        target = RUNTIMES[kind]
        if target is not None:
            module, _, fn = target.partition(":")
            getattr(importlib.import_module(module), fn)(model, entry, record)


def _settings(entry: dict, names) -> dict:
    return {k: entry[k] for k in names if k in entry}


def install_pyramiddrop(model: nn.Module, entry: dict, record: dict) -> None:
    from squeeze.runtime.pyramiddrop import PyramidDropPolicy
    from squeeze.runtime.token_drop import install as install_token_drop

    install_token_drop(model, PyramidDropPolicy(entry.get("layers"), entry.get("ratios")))


def install_mustdrop(model: nn.Module, entry: dict, record: dict) -> None:
    import dataclasses

    from squeeze.runtime.mustdrop import MustDropPolicy
    from squeeze.runtime.token_drop import install as install_token_drop

    names = [f.name for f in dataclasses.fields(MustDropPolicy) if f.name != "boundaries"]  # "layers" in the record
    install_token_drop(model, MustDropPolicy(entry.get("layers"), **_settings(entry, names)))
