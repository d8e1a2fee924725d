"""Keeping Triton out of CPU-only squeeze processes.

transformers' modeling code imports torch._dynamo, which imports Triton whenever it is installed
(~80 MB of RSS and a second or more at start); without a CUDA device (and outside
TRITON_INTERPRET=1, the kernels' CPU test mode) no Triton kernel can run. The `squeeze` program
and the processes `squeeze bench` measures call :func:`skip_unusable_triton` before transformers
loads, so their memory and start-up are what a CPU user gets; in-process callers (tests,
notebooks) keep Triton, since their later code may still want it.
"""

from __future__ import annotations

import os
import sys


def skip_unusable_triton() -> None:
    """Tell squeeze.kernels and torch that Triton is not installed (both catch the ImportError and
    take their CPU paths) when this process has no CUDA device to run it on."""
    if "triton" in sys.modules or os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch

    if not torch.cuda.is_available():
        sys.meta_path.insert(0, NoTriton())


class NoTriton:
    """A meta-path finder under which ``import triton`` (and ``importlib.util.find_spec``) fail as
    for a package that is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (skipped: no CUDA device)", name=name)
        return None
