"""Keeping packages a squeeze command cannot use out of its process.

transformers' modeling code imports optional packages whenever they are installed, whether or
not the model needs them:

- Triton, through torch._dynamo (~70 MB of RSS and a second at start). Without a CUDA device (and
  outside TRITON_INTERPRET=1, the kernels' CPU test mode) no Triton kernel can run.
- SciPy, for the Hungarian matching of object-detection losses (~35 MB and half a second). No
  squeeze command trains or evaluates a detection model, and squeeze itself never imports it.

The `squeeze` program and the processes `squeeze bench` measures call :func:`skip_unused_packages`
before transformers loads, so their memory and start-up are what a user gets; in-process callers
(tests, notebooks) keep both, since their later code may still want them.
"""

from __future__ import annotations

import os
import sys


def skip_unused_packages() -> None:
    """Both of the below."""
    skip_scipy()
    skip_unusable_triton()


def skip_scipy() -> None:
    """Tell transformers that SciPy is not installed: ``find_spec`` answers None for a name that
    ``sys.modules`` maps to None, and importing it fails. transformers decides what is installed
    when it is first imported, so this only acts before that (after, it would break the imports
    transformers already chose)."""
    if "transformers" not in sys.modules:
        sys.modules.setdefault("scipy", None)


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
