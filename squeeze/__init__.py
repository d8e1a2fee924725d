"""squeeze: make transformer checkpoints smaller and faster.

Python API::

    import squeeze
    result = squeeze.compress("path/to/model", out="pruned", method="wanda", pattern="2:4")
    report = squeeze.evaluate("pruned", data="builtin", reference="path/to/model")
    model = squeeze.load("pruned")
    figures = squeeze.bench_models(["pruned"], reference="path/to/model")
"""

__version__ = "0.1.0"

from squeeze.errors import SqueezeError

# public name -> module that defines it; imported on first use so `import squeeze` stays cheap
# (the CLI imports torch only when a command runs)
_API = {"compress": "squeeze.compressor", "evaluate": "squeeze.evaluation", "load": "squeeze.loading",
        "info": "squeeze.inspection", "recover": "squeeze.recovery", "generate": "squeeze.runtime.speculative",
        "bench_models": "squeeze.benchmark"}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")


def _register_when_transformers_loads() -> None:
    """Run :func:`squeeze.autoload.register` once transformers is imported (now, if it already is),
    so that exports marked for squeeze load through transformers' auto classes, without making
    ``import squeeze`` pay for importing transformers."""
    import sys

    if "transformers" in sys.modules:
        from squeeze.autoload import register

        register()
        return
    import importlib.abc
    import importlib.util

    class _AfterTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    try:
                        from squeeze.autoload import register

                        register()
                    except Exception as e:  # noqa: BLE001 (never break the user's `import transformers`)
                        import warnings

                        warnings.warn(f"squeeze could not register its exports with transformers ({e}); "
                                      "load them with squeeze.load", stacklevel=2)

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterTransformers())


_register_when_transformers_loads()

__all__ = ["SqueezeError", "__version__", "bench_models", "compress", "evaluate", "generate", "info", "load",
           "recover"]
