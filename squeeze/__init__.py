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


_WHEN_TRANSFORMERS_LOADS: list = []


def when_transformers_loads(fn) -> None:
    """Call ``fn()`` once transformers is imported (now, if it already is), without importing it:
    a squeeze command that never needs transformers (a plain-Llama compress sweep) never pays for
    it. A failing ``fn`` warns and never breaks the user's ``import transformers``."""
    import sys

    if "transformers" in sys.modules and not _WHEN_TRANSFORMERS_LOADS:
        fn()
        return
    _WHEN_TRANSFORMERS_LOADS.append(fn)
    if len(_WHEN_TRANSFORMERS_LOADS) > 1:
        return  # the finder below is already waiting
    import importlib.abc
    import importlib.util

    def run_all():
        while _WHEN_TRANSFORMERS_LOADS:
            f = _WHEN_TRANSFORMERS_LOADS.pop(0)
            try:
                f()
            except Exception as e:  # noqa: BLE001 (never break the user's `import transformers`)
                import warnings

                warnings.warn(f"squeeze could not finish setting up transformers ({e}); load squeeze exports "
                              "with squeeze.load", stacklevel=3)

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
                    run_all()

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterTransformers())


def _register():
    """Exports marked for squeeze load through transformers' auto classes."""
    from squeeze.autoload import register

    register()


when_transformers_loads(_register)

__all__ = ["SqueezeError", "__version__", "bench_models", "compress", "evaluate", "generate", "info", "load",
           "recover"]
