"""squeeze: make transformer checkpoints smaller and faster.

Python API::

    import squeeze
    result = squeeze.compress("path/to/model", out="pruned", method="wanda", pattern="2:4")
    report = squeeze.evaluate("pruned", data="builtin", reference="path/to/model")
    model = squeeze.load("pruned")
"""

__version__ = "0.1.0"

from squeeze.errors import SqueezeError  # noqa: E402


def __getattr__(name):
    # Lazy so `import squeeze` stays cheap (the CLI imports torch only when a command runs).
    if name == "compress":
        from squeeze.compressor import compress

        return compress
    if name == "evaluate":
        from squeeze.evaluation import evaluate

        return evaluate
    if name == "load":
        from squeeze.loading import load

        return load
    if name == "info":
        from squeeze.inspection import info

        return info
    if name == "recover":
        from squeeze.recovery import recover

        return recover
    if name == "generate":
        from squeeze.depth.speculative import generate

        return generate
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")


__all__ = ["SqueezeError", "compress", "evaluate", "load", "info", "recover", "__version__"]
