"""The OpenVINO backend: ONNX and OpenVINO IR models on CPU, GPU, NPU or AUTO."""

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
from edgerun.tensors import TensorSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgerun[openvino]'"

_OV_TYPES = {
    "f32": "FP32", "f16": "FP16", "f64": "FP64",
    "i8": "INT8", "i16": "INT16", "i32": "INT32", "i64": "INT64",
    "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64",
    "boolean": "BOOL", "string": "BYTES",
}
_PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")  # they pick among the real ones themselves


def _message(exc: BaseException) -> str:
    """OpenVINO's error text without its 'Exception from src/...cpp:N:' location lines."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith("Exception from ")]
    return " ".join(kept) or f"{type(exc).__name__}: {exc}"


def _name(port: Any) -> str:
    if not port.get_names():
        return f"{port.get_node().get_friendly_name()}:{port.get_index()}"
    return port.get_any_name()


def _spec(port: Any, name: str) -> TensorSpec:
    type_name = port.get_element_type().get_type_name()
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    return TensorSpec(name, _OV_TYPES.get(type_name, type_name.upper()), shape)


class OpenVinoSession(Session):
    """A compiled OpenVINO model; each thread runs on its own infer request."""

    def __init__(self, compiled: Any, device: str, names: tuple[list[str], list[str]], keep: Any = None):
        """``names``: the (input, output) tensor names of the model as read, port by port; ``keep``: memory the
        compiled model reads in place (the weights of a model loaded from memory), freed when the session closes.

        Compilation folds Identity nodes, leaving a port with several names (``{'logits', 'probabilities'}``)
        and ``get_any_name()`` free to return the internal one, so the names are taken before compiling.
        """
        self._compiled = compiled
        self._device = device
        in_names, out_names = names
        self.inputs = [_spec(p, n) for p, n in zip(compiled.inputs, in_names)]
        self.outputs = [_spec(p, n) for p, n in zip(compiled.outputs, out_names)]
        self._output_names = tuple(o.name for o in self.outputs)
        self._local = threading.local()
        self._keep = keep

    def _request(self) -> Any:
        req = getattr(self._local, "request", None)
        if req is None:
            if self._compiled is None:
                raise RuntimeError("the OpenVINO session is closed")
            req = self._local.request = self._compiled.create_infer_request()
        return req

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            req = self._local.request
        except AttributeError:
            req = self._request()
        # share_inputs: zero-copy inputs; outputs are copied (share_outputs=False), so a later run
        # on this request cannot overwrite arrays already returned.
        return dict(zip(self._output_names, req.infer(inputs, share_inputs=True).to_tuple()))

    @property
    def device(self) -> str:
        return self._device

    def close(self) -> None:
        self._local = threading.local()  # drops every thread's infer request
        compiled, self._compiled = self._compiled, None
        if compiled is not None:
            try:
                compiled.release_memory()
            except Exception:  # not every device plugin supports it
                pass
            del compiled
        self._keep = None  # only once the compiled model that reads it is gone
        gc.collect()


class OpenVinoBackend(Backend):
    """OpenVINO Runtime: reads ONNX and IR (.xml with its .bin beside it)."""

    name = "openvino"
    formats = ("onnx", "openvino")
    suffixes = {".onnx": "onnx", ".xml": "openvino"}  # an IR .xml, its .bin beside it
    primary_formats = ("openvino",)
    install_hint = INSTALL_HINT
    aliases = ("ov",)
    options = {"device": str, "performance_hint": str, "inference_precision": str, "config": dict}
    memory_estimate = (40 << 20, 2.0)  # calibrated: benchmarks/calibrate_memory.py
    # String tensors load, but after one inference freeing the request corrupts the heap and aborts the
    # process (openvino 2026.4: "free(): invalid pointer"). Such models go to another backend.
    unsupported_datatypes = frozenset({"BYTES"})
    # IR from memory: the .xml as text and the .bin as a tensor over the decrypted buffer, never copied.
    # ONNX is not offered: read from memory, openvino 2026.4 holds about three copies of it and takes 3-5x as long.
    memory_formats = frozenset({"openvino"})

    def __init__(self) -> None:
        self._core: Any = None
        self._lock = threading.Lock()

    def availability(self) -> Availability:
        try:
            import openvino as ov
        except Exception as exc:
            return Availability(False, reason=f"openvino cannot be imported ({type(exc).__name__}: {exc})",
                                install_hint=INSTALL_HINT)
        version = getattr(ov, "__version__", None) or ov.get_version()
        return Availability(True, version=str(version).split("-")[0])

    def _get_core(self) -> Any:
        with self._lock:
            if self._core is None:
                import openvino as ov

                self._core = ov.Core()
            return self._core

    def devices(self) -> list[str]:
        try:
            found = list(self._get_core().available_devices)
        except Exception as exc:
            log.debug("openvino devices unavailable: %s", exc)
            return []
        return found + ["AUTO"]

    def tuning_options(self, facts: Any) -> dict[str, tuple[Any, ...]]:
        # THROUGHPUT splits the cores into streams: slower for one request, faster for several at once; a CPU with
        # bf16 (x86 AVX512-BF16/AMX) or fp16 (ARM) arithmetic may run faster in it, checked on the validation sample
        tried: dict[str, tuple[Any, ...]] = {"performance_hint": ("LATENCY", "THROUGHPUT")}
        flags = facts.cpu_flags
        native = ("bf16" if flags & {"avx512_bf16", "amx_bf16"} else
                  "f16" if facts.arch == "aarch64" and flags & {"fphp", "asimdhp"} else None)
        if native:
            tried["inference_precision"] = ("f32", native)
        return tried

    def load(self, path: Path, options: LoadOptions) -> Session:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"openvino cannot load {path}: file not found")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise ModelLoadError(f"openvino cannot load {path}: the IR weights file {path.with_suffix('.bin').name} "
                                 f"is not beside it")
        device, config = self._settings(options, str(path))
        try:
            model = self._get_core().read_model(str(path))
        except Exception as exc:
            raise ModelLoadError(f"openvino cannot load {path}: {_message(exc)}") from None
        return self._compile(model, device, config, str(path))

    def load_memory(self, model: MemoryModel, options: LoadOptions) -> Session:
        import numpy as np
        import openvino as ov

        shown = f"{model.main} (decrypted in memory)"
        device, config = self._settings(options, shown)
        if config.pop("CACHE_DIR", None):
            log.info("openvino: no model cache for %s: a cached blob would hold the clear model on disk", shown)
        weights_name = model.main.rsplit(".", 1)[0] + ".bin"
        if weights_name not in model.names:
            raise ModelLoadError(f"openvino cannot load {shown}: the IR weights file {weights_name} is not in the "
                                 f"variant")
        xml = model.read_bytes(model.main).decode("utf-8", "replace")
        # the tensor shares the decrypted buffer, and the compiled model goes on reading constants in it (as it reads
        # a mapped .bin): the session keeps the buffer
        weights = ov.Tensor(np.frombuffer(model.read(weights_name), np.uint8), shared_memory=True)
        try:
            ir = self._get_core().read_model(xml, weights)
        except Exception as exc:
            raise ModelLoadError(f"openvino cannot load {shown}: {_message(exc)}") from None
        finally:
            del xml
        return self._compile(ir, device, config, shown, keep=weights)

    def _settings(self, options: LoadOptions, shown: str) -> tuple[str, dict[str, Any]]:
        """The device to compile for and the compile configuration, checked."""
        extra = options.extra
        device = str(options.device or extra.get("device") or "CPU").upper()
        hint = str(extra.get("performance_hint", "LATENCY")).upper()
        if hint not in _PERFORMANCE_HINTS:
            raise ModelLoadError(f"openvino: performance_hint {hint!r} is not one of {', '.join(_PERFORMANCE_HINTS)}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if device.startswith("CPU"):
            if options.threads:
                config["INFERENCE_NUM_THREADS"] = int(options.threads)
            # a device shares its cores with other services: a thread pinned to a core waits whenever another
            # process runs there (median latency 3-5x the fastest on a busy 2-core host, 1.1x unpinned)
            config["ENABLE_CPU_PINNING"] = False
            # f32 by default so results (and the variant's measured accuracy) hold; "bf16"/"f16" trade them for speed
            config["INFERENCE_PRECISION_HINT"] = str(extra.get("inference_precision", "f32"))
        for key, value in dict(extra.get("config") or {}).items():
            config[str(key)] = value
        present = list(self._get_core().available_devices)
        if device.split(":")[0] not in _VIRTUAL_DEVICES and device not in present \
                and device not in {d.split(".")[0] for d in present}:
            raise ModelLoadError(f"openvino cannot load {shown} on {device}: no such device here "
                                 f"(devices: {', '.join(present + ['AUTO'])})")
        return device, config

    def _compile(self, model: Any, device: str, config: dict[str, Any], shown: str, keep: Any = None) -> Session:
        ports = (*model.inputs, *model.outputs)
        strings = [_name(p) for p in ports if p.get_element_type().get_type_name() == "string"]
        if strings:
            del model
            raise ModelLoadError(f"openvino cannot run {shown}: the openvino backend does not take string tensors "
                                 f"({', '.join(strings)}); use onnxruntime")
        names = ([_name(p) for p in model.inputs], [_name(p) for p in model.outputs])
        try:
            compiled = self._get_core().compile_model(model, device, config)
        except Exception as exc:
            raise ModelLoadError(f"openvino cannot compile {shown} for {device}: {_message(exc)}") from None
        finally:
            del model  # the compiled model holds what it needs; the source graph's weights go
        log.debug("openvino compiled %s on %s with %s", shown, device, config)
        return OpenVinoSession(compiled, device, names, keep)


@hookimpl
def register_backends(register):
    register(OpenVinoBackend)
