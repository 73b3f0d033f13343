"""The onnxruntime backend: ONNX models on the CPU execution provider, and CUDA/OpenVINO/other EPs when present."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.backend import Availability, Backend, LoadOptions, Session
from edgerun.errors import ModelLoadError
from edgerun.hookspecs import hookimpl
from edgerun.protect import MemoryModel
from edgerun.tensors import TensorSpec

INSTALL_HINT = "pip install 'edgerun[onnxruntime]'"

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}
_DEVICE_PROVIDERS = {
    "CUDA": "CUDAExecutionProvider", "TENSORRT": "TensorrtExecutionProvider",
    "OPENVINO": "OpenVINOExecutionProvider", "ROCM": "ROCMExecutionProvider", "COREML": "CoreMLExecutionProvider",
    "NNAPI": "NnapiExecutionProvider", "QNN": "QNNExecutionProvider", "CPU": "CPUExecutionProvider",
}

_EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
_OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                        "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


class OnnxRuntimeSession(Session):
    text_only = True  # a string tensor element must be UTF-8 text: onnxruntime would pass str(b"...") on

    def __init__(self, sess: Any, device: str):
        self._sess = sess
        self._device = device
        self.inputs = [_spec(a) for a in sess.get_inputs()]
        self.outputs = [_spec(a) for a in sess.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._run = sess.run
        binding = getattr(sess, "_sess", None)
        if sess.get_providers() == ["CPUExecutionProvider"] and callable(getattr(binding, "run", None)):
            # the session's wrapper checks each run's feed (names, graph capture, OrtValue owners) and falls back
            # to another provider on a provider's failure: with the CPU alone there is nothing to fall back from,
            # and every feed comes checked (LoadedModel.run_unchecked's callers give it check_inputs' result, or
            # the hub's datasets, checked against the model's inputs when loaded), so a run goes to the binding
            # (about 2 us less a run)
            self._run = binding.run

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._run(self._output_names, inputs, None)))

    @property
    def device(self) -> str:
        return self._device

    def close(self) -> None:
        self._sess = None
        self._run = None
        gc.collect()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = ("onnx",)
    suffixes = {".onnx": "onnx"}
    primary_formats = ("onnx",)
    install_hint = INSTALL_HINT
    aliases = ("ort",)
    options = {"device": str, "providers": list, "intra_op_threads": int, "inter_op_threads": int, "arena": bool,
               "graph_optimization": str, "execution_mode": str}
    memory_formats = frozenset({"onnx"})
    memory_estimate = (11 << 20, 1.5)  # calibrated: benchmarks/calibrate_memory.py

    def availability(self) -> Availability:
        try:
            import onnxruntime as ort
        except Exception as exc:
            return Availability(False, reason=f"onnxruntime cannot be imported ({type(exc).__name__}: {exc})",
                                install_hint=INSTALL_HINT)
        return Availability(True, version=ort.__version__)

    def devices(self) -> list[str]:
        try:
            import onnxruntime as ort
        except Exception:
            return []
        providers = set(ort.get_available_providers())
        return [dev for dev, ep in _DEVICE_PROVIDERS.items() if ep in providers]

    def tuning_options(self, facts: Any) -> dict[str, tuple[Any, ...]]:
        # "extended" leaves out the layout transformations of "all", which are slower for some models on some CPUs;
        # the parallel executor only helps a graph with independent branches, and needs more than one core
        tried: dict[str, tuple[Any, ...]] = {"graph_optimization": ("all", "extended")}
        if facts.cpu_count > 1:
            tried["execution_mode"] = ("sequential", "parallel")
        return tried

    def load(self, path: Path, options: LoadOptions) -> Session:
        return self._session(str(path), options, str(path))

    def load_memory(self, model: MemoryModel, options: LoadOptions) -> Session:
        # onnxruntime parses a model file as it reads it: from a pipe, the clear bytes are never held whole here
        # (its Python binding would copy bytes once more, and keep them for the session's life)
        with model.stream(model.main) as path:
            return self._session(path, options, f"{model.main} (decrypted in memory)")

    def _session(self, source: str, options: LoadOptions, shown: str) -> Session:
        import onnxruntime as ort

        so = ort.SessionOptions()
        threads = options.threads
        so.intra_op_num_threads = int(options.extra.get("intra_op_threads", threads or 0))
        so.inter_op_num_threads = int(options.extra.get("inter_op_threads", 1))
        mode = str(options.extra.get("execution_mode", "sequential")).lower()
        if mode not in _EXECUTION_MODES:
            raise ModelLoadError(f"onnxruntime: execution_mode {mode!r} is not one of {', '.join(_EXECUTION_MODES)}")
        level = str(options.extra.get("graph_optimization", "all")).lower()
        if level not in _OPTIMIZATION_LEVELS:
            raise ModelLoadError(f"onnxruntime: graph_optimization {level!r} is not one of "
                                 f"{', '.join(_OPTIMIZATION_LEVELS)}")
        so.execution_mode = getattr(ort.ExecutionMode, _EXECUTION_MODES[mode])
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[level])
        if mode == "parallel" and "inter_op_threads" not in options.extra:
            so.inter_op_num_threads = int(threads or 0)
        if not options.extra.get("arena", True):
            so.enable_cpu_mem_arena = False
        so.log_severity_level = 3
        available = ort.get_available_providers()
        wanted = list(options.extra.get("providers") or [])
        if options.device and options.device.upper() in _DEVICE_PROVIDERS:
            wanted.insert(0, _DEVICE_PROVIDERS[options.device.upper()])
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        try:
            sess = ort.InferenceSession(source, sess_options=so, providers=providers)  # never optimized_model_filepath
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {shown}: {exc}") from None
        used = sess.get_providers()[0]
        device = next((d for d, ep in _DEVICE_PROVIDERS.items() if ep == used), used)
        return OnnxRuntimeSession(sess, device)


@hookimpl
def register_backends(register):
    register(OnnxRuntimeBackend)
