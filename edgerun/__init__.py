"""edgerun: deploy and serve ML models on edge devices."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgerun.backend import Availability, Backend, LoadOptions, Session
    from edgerun.client import Client
    from edgerun.errors import EdgerunError
    from edgerun.hookspecs import hookimpl
    from edgerun.package import ModelPackage, Variant
    from edgerun.protect import MemoryModel
    from edgerun.runtime import LoadedModel, Runtime
    from edgerun.tensors import TensorSpec

__version__ = "0.1.0"
__all__ = ["Availability", "Backend", "Client", "EdgerunError", "LoadOptions", "LoadedModel", "MemoryModel",
           "ModelPackage", "Runtime", "Session", "TensorSpec", "Variant", "hookimpl", "__version__"]

# Imported on first use, so that a command that needs none of them (the hub's) does not load numpy.
_HOME = {"Availability": "backend", "Backend": "backend", "LoadOptions": "backend", "Session": "backend",
         "Client": "client", "EdgerunError": "errors", "hookimpl": "hookspecs", "MemoryModel": "protect",
         "ModelPackage": "package",
         "Variant": "package", "LoadedModel": "runtime", "Runtime": "runtime", "TensorSpec": "tensors"}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'edgerun' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edgerun.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
