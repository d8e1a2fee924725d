"""Versions of squeeze and of the libraries whose behaviour decides an export's numbers.

Read from the installed distributions' metadata, so ``squeeze --version`` does not import torch.
Every export's ``squeeze.json`` carries them under these keys; ``squeeze info`` shows them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

KEYS = ("squeeze_version", "torch", "transformers")


def versions() -> dict[str, str]:
    from squeeze import __version__

    out = {"squeeze_version": __version__}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def without_versions(record: dict) -> dict:
    """A copy of a squeeze.json record without the versions that wrote it (to be re-stamped)."""
    return {k: v for k, v in record.items() if k not in KEYS}
