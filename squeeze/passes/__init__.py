"""Compression methods, one file per method. Importing this package registers every method
module in it (each file decorates its class with :func:`register`), so adding a method never
touches the runner. The roles (block pass, model stage) are in :mod:`squeeze.passes.base`."""

import importlib
import pkgutil

from squeeze.passes.base import PRESETS, REGISTRY, BlockPass, Method, ModelStage, get_pass, register

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in ("base",):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["PRESETS", "REGISTRY", "BlockPass", "Method", "ModelStage", "get_pass", "register"]
