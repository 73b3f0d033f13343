"""What a backend plugin provides: a Backend that loads model files into Sessions."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgerun.tensors import TensorSpec

if TYPE_CHECKING:
    from edgerun.device import DeviceFacts
    from edgerun.protect import MemoryModel


@dataclass(frozen=True)
class Availability:
    """Whether a backend can be used here; when not, why and how to fix it."""

    available: bool
    version: str | None = None
    reason: str | None = None
    install_hint: str | None = None

    def __str__(self) -> str:
        if self.available:
            return "available"
        hint = f" ({self.install_hint})" if self.install_hint else ""
        return f"unavailable: {self.reason}{hint}"


@dataclass
class LoadOptions:
    """How to load a model: the target device, thread count and backend-specific options."""

    device: str | None = None
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Session(abc.ABC):
    """A loaded model, ready to run."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    text_only: ClassVar[bool] = False  # BYTES elements must be UTF-8 text (str), not arbitrary bytes

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on already-validated inputs; return every output by name."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model and the memory it holds; the session is unusable afterwards."""

    @property
    def device(self) -> str:
        """The device the session runs on (e.g. CPU, GPU, NPU, CUDA)."""
        return "CPU"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    """A way of running model files of some formats on some devices."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    suffixes: ClassVar[dict[str, str]] = {}
    """The file suffixes this backend loads, each with its format (``{".onnx": "onnx"}``): a bare model file
    (``edgerun serve --model model.onnx``, no edgerun.toml) is read by its suffix, so a plugin can bring a file type."""
    install_hint: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    """Other names profiles may use for this backend (``tflite`` for LiteRT)."""
    options: ClassVar[dict[str, type | tuple[type, ...]] | None] = None
    """The options a profile's ``[backends.<name>]`` table may set, with their types; None passes the table through
    unchecked. A misspelt option is a profile error, never silently ignored."""
    precisions: ClassVar[dict[str, int]] = {}
    """Precisions beyond fp32, fp16, int8 and int4 that this backend's files may have, with their bits
    (``{"bf16": 16}``): a device ranks variants by them (more bits, more precise)."""
    primary_formats: ClassVar[tuple[str, ...]] = ()
    """The formats this backend is the primary runtime of (onnxruntime for onnx): the packager compares a
    format's methods of one precision on it. A format only one backend loads needs no such claim."""
    memory_estimate: ClassVar[tuple[int, float]] = (32 << 20, 2.5)
    """Resident memory a loaded session needs when the package measured none: ``base + factor * file size``
    (bytes); calibrate it with benchmarks/calibrate_memory.py."""
    #: KServe datatypes this backend cannot take or return; variant choice drops models that use them
    unsupported_datatypes: ClassVar[frozenset[str]] = frozenset()
    memory_formats: ClassVar[frozenset[str]] = frozenset()
    """The formats ``load_memory`` loads. Encrypted variants are decrypted into memory and loaded from there, so a
    backend is never given an encrypted variant of another format (variant choice drops it; ``explain`` says why)."""

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether the backend's library is importable and working here."""

    def check(self) -> Availability:
        """``availability()``, with a plugin that raises reported as unavailable instead of crashing."""
        try:
            return self.availability()
        except Exception as exc:
            return Availability(False, reason=f"availability check failed: {type(exc).__name__}: {exc}",
                                install_hint=getattr(self, "install_hint", None))

    def devices(self) -> list[str]:
        """The devices this backend can target on this host."""
        return ["CPU"]

    @abc.abstractmethod
    def load(self, path: Path, options: LoadOptions) -> Session:
        """Load one model file; raise ModelLoadError with the backend's message on failure."""

    def tuning_options(self, facts: "DeviceFacts") -> dict[str, tuple[Any, ...]]:
        """The options of this backend worth measuring on this device when tuning (docs/tuning.md): each option a
        profile's ``[backends.<name>]`` table may set, with the values to try, the one used by default first.
        Thread counts are tried for every backend; a backend with nothing else to try returns ``{}``."""
        return {}

    def load_memory(self, model: "MemoryModel", options: LoadOptions) -> Session:
        """Load a model whose clear bytes exist only in memory, writing nothing to disk (no temp file, no cache);
        only called for the formats in ``memory_formats`` (docs/plugins.md)."""
        from edgerun.errors import ModelLoadError

        raise ModelLoadError(f"{self.name} cannot load a model from memory, so it cannot run encrypted variants")
