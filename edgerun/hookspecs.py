"""The hooks an edgerun plugin can implement."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from edgerun.backend import Backend
    from edgerun.choice import Candidate
    from edgerun.device import DeviceFacts
    from edgerun.package import ModelPackage
    from edgerun.profiles import Profile

hookspec = pluggy.HookspecMarker("edgerun")
hookimpl = pluggy.HookimplMarker("edgerun")


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register Backend classes by calling ``register(BackendClass)``."""


@hookspec
def describe_device(facts: DeviceFacts) -> dict[str, Any] | None:
    """Contribute facts about the host (accelerators, CPU features, NPU presence) as a dict."""


@hookspec(firstresult=True)
def choose_variant(
    package: ModelPackage, profile: Profile, candidates: list[Candidate]
) -> Candidate | None:
    """Pick the candidate (variant on a backend) to load; return None for no opinion."""


@hookspec
def on_model_activated(model: str, version: int, variant: str, backend: str) -> None:
    """Called after a model version starts serving."""


@hookspec
def on_update_event(model: str, version: int, state: str, detail: str) -> None:
    """Called on every update state transition of the device agent."""


@hookspec
def register_model_sources(register: Callable[[Any], None]) -> None:
    """Hub: register ModelSource objects that turn a model of some framework into ONNX (``edgerun.hub.tools``)."""


@hookspec
def register_variant_makers(register: Callable[[Any], None]) -> None:
    """Hub: register VariantMaker objects that make one format and precision of a model (``edgerun.hub.tools``)."""
