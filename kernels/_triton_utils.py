"""Triton availability and backend selection, importable without Triton.

Every Triton kernel module (``_*_triton.py``) imports ``triton`` at its top; the public modules
import those lazily, through :func:`triton_module`, only when a Triton path actually runs. So
``import squeeze.kernels`` and every CPU path work on machines without Triton.

Under ``TRITON_INTERPRET=1`` (CPU tests) Triton reads the variable when a kernel is *decorated*,
i.e. when its module is first imported: set it before the first Triton call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

import torch

BACKENDS = ("auto", "triton", "torch", "cpu")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def triton_available() -> bool:
    """True if Triton is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_module(name: str):
    """Import ``squeeze.kernels.<name>`` (a module that imports triton) or explain why not."""
    if not triton_available():
        raise RuntimeError("this kernel path needs Triton, which is not installed (pip install triton)")
    return importlib.import_module(f"{__package__}.{name}")


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter, for tests); "
                "use backend='auto' to get the CPU path"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"Triton kernels need CUDA tensors, got {t.device}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
