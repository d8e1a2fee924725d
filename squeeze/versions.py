"""Versions of squeeze and of the libraries whose behaviour decides an export's numbers.

Read from the installed distributions' metadata, so ``squeeze --version`` does not import torch.
Every export's ``squeeze.json`` carries them under these keys, with the thread count the numbers
were computed with (:func:`made_with`: float reductions split across threads round differently, so
the same inputs give the same bytes only at the same count); ``squeeze info`` shows them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

KEYS = ("squeeze_version", "torch", "transformers", "safetensors", "threads")


def versions() -> dict[str, str]:
    from squeeze import __version__

    out = {"squeeze_version": __version__}
    for dist in ("torch", "transformers", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def made_with() -> dict:
    """:func:`versions` and ``threads`` (torch's intra-op thread count): what an export records."""
    import torch

    return {**versions(), "threads": torch.get_num_threads()}


def without_versions(record: dict) -> dict:
    """A copy of a squeeze.json record without the versions that wrote it (to be re-stamped)."""
    return {k: v for k, v in record.items() if k not in KEYS}


def cpu_model() -> str:
    """The CPU's model name (what a plan or a benchmark row was measured on)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
