"""Compression passes. Importing this package registers every pass module in it (each file
decorates its pass class with :func:`register`), so adding a pass never touches the runner."""

import importlib
import pkgutil

from squeeze.passes.base import REGISTRY, Pass, get_pass, register

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in ("base",):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "Pass", "get_pass", "register"]
