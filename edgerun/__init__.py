"""edgerun: deploy and serve ML models on edge devices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgerun.backend import Availability, Backend, LoadOptions, Session
from edgerun.errors import EdgerunError
from edgerun.hookspecs import hookimpl
from edgerun.package import ModelPackage, Variant
from edgerun.protect import MemoryModel
from edgerun.runtime import LoadedModel, Runtime
from edgerun.tensors import TensorSpec

if TYPE_CHECKING:
    from edgerun.client import Client

__version__ = "0.1.0"
__all__ = ["Availability", "Backend", "Client", "EdgerunError", "MemoryModel", "LoadOptions", "LoadedModel", "ModelPackage",
           "Runtime", "Session", "TensorSpec", "Variant", "hookimpl", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from edgerun.client import Client

        return Client
    raise AttributeError(name)
