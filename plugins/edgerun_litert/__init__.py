"""The LiteRT (TFLite) backend: .tflite models through ai-edge-litert, or tflite-runtime as a fallback."""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.backend import Availability, Backend, LoadOptions, Session
from edgerun.errors import ModelLoadError
from edgerun.hookspecs import hookimpl
from edgerun.protect import MemoryModel
from edgerun.tensors import TensorSpec, datatype_of

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgerun[tflite]'"
_NUMPY1_MARKERS = ("_ARRAY_API", "compiled using NumPy 1.x", "numpy.core.multiarray failed to import",
                   "numpy.core._multiarray_umath")


class _Unavailable(Exception):
    """Neither interpreter library can be used; the message says why."""


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _numpy1_failure(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a NumPy-1.x-built extension failing under NumPy 2."""
    seen = 0
    while exc is not None and seen < 5:
        if any(m in str(exc) for m in _NUMPY1_MARKERS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _numpy1_reason(tflite_version: str | None) -> str:
    """Why tflite-runtime cannot run here, and the fix."""
    library = f"tflite-runtime {tflite_version}" if tflite_version else "tflite-runtime"
    return f"{library} was built for NumPy 1.x and fails with NumPy {np.__version__}; install ai-edge-litert"


def _built_for_numpy1(version: str | None) -> bool:
    """tflite-runtime releases up to 2.14 (the last) are built against NumPy 1.x."""
    try:
        major, minor = (int(p) for p in (version or "").split(".")[:2])
    except ValueError:
        return False
    return (major, minor) <= (2, 14)


def _interpreter_class() -> tuple[type, str, str | None]:
    """The Interpreter class, the library it came from and its version; or _Unavailable with the reason."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert", _dist_version("ai-edge-litert")
    except Exception as exc:
        litert_error = f"{type(exc).__name__}: {exc}"
    tflite_version = _dist_version("tflite-runtime")
    numpy2 = int(np.__version__.split(".")[0]) >= 2
    # tflite-runtime 2.14 imports fine under NumPy 2 and only fails when an interpreter is created
    # (AttributeError: _ARRAY_API not found), so its version is checked before it is used.
    if numpy2 and _built_for_numpy1(tflite_version):
        raise _Unavailable(_numpy1_reason(tflite_version))
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime", tflite_version
    except Exception as exc:
        if numpy2 and _numpy1_failure(exc):
            raise _Unavailable(_numpy1_reason(tflite_version)) from None
        if isinstance(exc, ImportError) and tflite_version is None:
            raise _Unavailable(f"neither ai-edge-litert nor tflite-runtime is installed ({litert_error})") from None
        raise _Unavailable(f"ai-edge-litert cannot be imported ({litert_error}) and tflite-runtime "
                           f"{tflite_version} fails ({type(exc).__name__}: {exc})") from None


def _spec(name: str, detail: dict[str, Any]) -> TensorSpec:
    shape = detail.get("shape_signature")
    if shape is None or len(shape) != len(detail["shape"]):
        shape = detail["shape"]
    dims = tuple(int(d) if int(d) >= 0 else -1 for d in shape)
    return TensorSpec(name, datatype_of(np.dtype(detail["dtype"])), dims)


def _signature_names(interp: Any) -> dict[int, str]:
    """Tensor index -> signature name, when the model has one signature on its main subgraph."""
    try:
        sigs = interp.get_signature_list()
        if len(sigs) != 1:
            return {}
        runner = interp.get_signature_runner(next(iter(sigs)))
        names = {d["index"]: n for n, d in runner.get_input_details().items()}
        names.update({d["index"]: n for n, d in runner.get_output_details().items()})
        del runner
        return names
    except Exception as exc:  # older runtimes: fall back to tensor names
        log.debug("no usable signature: %s", exc)
        return {}


class LiteRTSession(Session):
    """A TFLite interpreter; runs are serialised because the interpreter is not thread-safe."""

    def __init__(self, interp: Any):
        self._interp = interp
        names = _signature_names(interp)
        gc.collect()  # the signature runner must be gone before allocate_tensors
        in_details = interp.get_input_details()
        out_details = interp.get_output_details()
        main = {d["index"] for d in in_details} | {d["index"] for d in out_details}
        if names and set(names) != main:
            names = {}
        self.inputs = [_spec(names.get(d["index"], d["name"]), d) for d in in_details]
        self.outputs = [_spec(names.get(d["index"], d["name"]), d) for d in out_details]
        self._in = [(s.name, d["index"]) for s, d in zip(self.inputs, in_details)]
        self._out = [(s.name, d["index"]) for s, d in zip(self.outputs, out_details)]
        self._shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in in_details}
        self._lock = threading.Lock()
        interp.allocate_tensors()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            interp = self._interp
            if interp is None:
                raise RuntimeError("the LiteRT session is closed")
            resized = False
            for name, index in self._in:
                shape = inputs[name].shape
                if self._shapes[index] != shape:
                    interp.resize_tensor_input(index, shape)
                    self._shapes[index] = shape
                    resized = True
            if resized:
                interp.allocate_tensors()
            for name, index in self._in:
                interp.set_tensor(index, inputs[name])
            interp.invoke()
            return {name: interp.get_tensor(index) for name, index in self._out}  # get_tensor copies

    def close(self) -> None:
        with self._lock:
            interp, self._interp = self._interp, None
            del interp
        gc.collect()


class LiteRTBackend(Backend):
    """LiteRT/TFLite on the CPU (XNNPACK)."""

    name = "litert"
    formats = ("tflite",)
    suffixes = {".tflite": "tflite"}
    primary_formats = ("tflite",)
    install_hint = INSTALL_HINT
    aliases = ("tflite",)  # the backend's name before LiteRT
    options = {"device": str, "num_threads": int}
    memory_formats = frozenset({"tflite"})
    memory_estimate = (3 << 20, 2.0)  # calibrated: benchmarks/calibrate_memory.py

    def availability(self) -> Availability:
        try:
            _, library, version = _interpreter_class()
        except _Unavailable as exc:
            return Availability(False, reason=str(exc), install_hint=INSTALL_HINT)
        return Availability(True, version=f"{library} {version}" if version else library)

    def load(self, path: Path, options: LoadOptions) -> Session:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"litert cannot load {path}: file not found")
        return self._session({"model_path": str(path)}, options, str(path))

    def load_memory(self, model: MemoryModel, options: LoadOptions) -> Session:
        # the interpreter keeps these bytes as its model (as it maps a file): no second copy stays behind
        return self._session({"model_content": model.read_bytes(model.main)}, options,
                             f"{model.main} (decrypted in memory)")

    def _session(self, source: dict[str, Any], options: LoadOptions, shown: str) -> Session:
        try:
            interpreter, _, _ = _interpreter_class()
        except _Unavailable as exc:
            raise ModelLoadError(f"litert cannot load {shown}: {exc} ({INSTALL_HINT})") from None
        threads = options.extra.get("num_threads", options.threads)
        try:
            interp = interpreter(**source, num_threads=int(threads) if threads else None)
            source.clear()
            return LiteRTSession(interp)
        except Exception as exc:
            if _numpy1_failure(exc):
                raise ModelLoadError(f"litert cannot load {shown}: {_numpy1_reason(_dist_version('tflite-runtime'))} "
                                     f"({INSTALL_HINT})") from None
            raise ModelLoadError(f"litert cannot load {shown}: {exc}") from None


@hookimpl
def register_backends(register):
    register(LiteRTBackend)
