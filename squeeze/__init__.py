"""squeeze: make transformer checkpoints smaller and faster.

Python API::

    import squeeze
    result = squeeze.compress("path/to/model", out="pruned", method="wanda", pattern="2:4")
    report = squeeze.evaluate("pruned", data="builtin", reference="path/to/model")
    model = squeeze.load("pruned")
"""

__version__ = "0.1.0"

from squeeze.errors import SqueezeError

# public name -> module that defines it; imported on first use so `import squeeze` stays cheap
# (the CLI imports torch only when a command runs)
_API = {"compress": "squeeze.compressor", "evaluate": "squeeze.evaluation", "load": "squeeze.loading",
        "info": "squeeze.inspection", "recover": "squeeze.recovery", "generate": "squeeze.runtime.speculative"}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")


__all__ = ["SqueezeError", "__version__", "compress", "evaluate", "generate", "info", "load", "recover"]
