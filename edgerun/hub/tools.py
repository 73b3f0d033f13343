"""What the packager works with, all of it plugins: model sources (a framework's model → ONNX) and variant makers.

The built-in sources (``edgerun.hub.sources``) and makers (``edgerun.hub.makers``) register through the same
hooks as a third-party plugin's (``register_model_sources``, ``register_variant_makers``), on a plugin manager
of the hub's own: a device never imports any of this.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgerun.errors import EdgerunError, PackageError

if TYPE_CHECKING:
    import pluggy

BUILTIN_HUB_PLUGINS = ("edgerun.hub.sources", "edgerun.hub.makers", "edgerun.hub.tflite")


class PrecisionUnavailable(EdgerunError):
    """The tools cannot make this precision/format for this model; the packager skips it with the reason."""


class ConverterMissing(PackageError):
    """A converter the packager needs for what was asked is not installed; says what to install."""

    exit_code = 69  # EX_UNAVAILABLE, as for a missing onnx


class ModelSource(abc.ABC):
    """A kind of model the packager accepts, and how it becomes the ONNX model every variant is made from."""

    name: ClassVar[str]
    extra: ClassVar[str] = ""  # the pip extra that brings its converter, for error messages

    @abc.abstractmethod
    def matches(self, spec: str) -> bool:
        """True when ``spec`` (a path or a reference such as ``pkg.mod:make_model``) is a model of this kind."""

    @abc.abstractmethod
    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        """Write ``spec`` as ONNX to ``out``; ``example`` holds one batch of inputs by name (the validation set's
        first rows, in the order the model takes them). Raise PackageError saying what went wrong."""


@dataclass
class MakeJob:
    """Everything a maker may use to make one variant."""

    source: Path  # the fp32 ONNX model
    stage: Path  # the package directory being assembled; files go under it
    variant_id: str
    calibration: dict[str, np.ndarray] | None
    validation: dict[str, np.ndarray]
    inputs: list[Any]  # TensorSpec of the model inputs
    outputs: list[Any]
    options: dict[str, Any] = field(default_factory=dict)  # prune sparsity, targets, tolerance...


@dataclass
class Made:
    """What a maker wrote: the files (relative to the stage, the one to load first) and a note for the report."""

    files: list[str]
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the package (e.g. int8 settings, targets)


class VariantMaker(abc.ABC):
    """Makes one (format, precision) variant by one method; several methods of one precision compete by measuring."""

    id: ClassVar[str]  # the variant id it makes, e.g. "onnx-int8-qdq"
    format: ClassVar[str]
    precision: ClassVar[str]
    method: ClassVar[str]
    order: ClassVar[int] = 100  # position in the plan (and the report)
    always: ClassVar[bool] = False  # made whatever was asked (the fp32 reference)
    option: ClassVar[str | None] = None  # made only when this request option is set (e.g. "prune")

    def variant_id(self, options: dict[str, Any]) -> str:
        """The id of the variant it makes for these request options (``id`` unless it depends on them)."""
        return self.id

    def missing(self) -> str | None:
        """Why the tools it needs are not installed here (with what to install), or None when they are: a format
        none of whose makers is ready is left out of the default ``--formats``."""
        return None

    @abc.abstractmethod
    def make(self, job: MakeJob) -> Made:
        """Write the variant's files; raise PrecisionUnavailable with the reason when it cannot be made here."""


@functools.lru_cache(maxsize=1)
def hub_plugins() -> "pluggy.PluginManager":
    """A plugin manager with the built-in hub plugins and every installed plugin (entry point group ``edgerun``)."""
    import importlib

    from edgerun.plugins import make_plugin_manager

    pm, _ = make_plugin_manager()
    for name in BUILTIN_HUB_PLUGINS:
        if pm.get_plugin(name) is None:
            pm.register(importlib.import_module(name), name=name)
    return pm


def _collect(hook: str) -> list[Any]:
    from edgerun.plugins import call_each

    found: list[Any] = []
    call_each(hub_plugins(), hook, register=found.append)
    return found


def missing_tools(maker: VariantMaker) -> str | None:
    """``maker.missing()``; a plugin's maker written without it counts as ready."""
    missing = getattr(maker, "missing", None)
    return missing() if callable(missing) else None


def model_sources() -> list[ModelSource]:
    return _collect("register_model_sources")


def variant_makers() -> list[VariantMaker]:
    return sorted(_collect("register_variant_makers"), key=lambda m: (m.order, m.id))


def source_for(spec: str) -> ModelSource:
    """The source that reads ``spec``; PackageError listing what is accepted when none does."""
    sources = model_sources()
    for s in sources:
        if s.matches(spec):
            return s
    raise PackageError(f"{spec}: not a model the packager reads; it takes "
                       + "; ".join(getattr(s, "describe", s.name) for s in sources))
