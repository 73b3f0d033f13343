"""A third-party edgerun plugin for tests: ONNX models on onnx's pure-Python reference evaluator."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgerun import Availability, Backend, LoadOptions, Session, TensorSpec, hookimpl
from edgerun.errors import ModelLoadError

log = logging.getLogger(__name__)

NAME = "onnx-reference"
EVENTS: list[tuple[str, dict[str, Any]]] = []  # notifications received, for the tests to read
_ONNX_TYPES = {1: "FP32", 10: "FP16", 11: "FP64", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64", 9: "BOOL"}


def _spec(value_info: Any) -> TensorSpec:
    t = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorSpec(value_info.name, _ONNX_TYPES.get(t.elem_type, str(t.elem_type)), shape)


class ReferenceSession(Session):
    """One ONNX model on ``onnx.reference.ReferenceEvaluator``."""

    def __init__(self, model: Any):
        from onnx.reference import ReferenceEvaluator

        self._evaluator: Any = ReferenceEvaluator(model)
        self.inputs = [_spec(v) for v in model.graph.input]
        self.outputs = [_spec(v) for v in model.graph.output]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._evaluator.run(None, inputs)
        return {spec.name: np.asarray(r) for spec, r in zip(self.outputs, results)}

    def close(self) -> None:
        self._evaluator = None


class ReferenceBackend(Backend):
    """ONNX on the reference evaluator: slow, exact, pure Python."""

    name = NAME
    formats = ("onnx",)
    install_hint = "pip install onnx"

    def availability(self) -> Availability:
        try:
            import onnx
            import onnx.reference  # noqa: F401
        except ImportError as exc:
            return Availability(False, reason=str(exc), install_hint=self.install_hint)
        return Availability(True, version=onnx.__version__)

    def load(self, path: Path, options: LoadOptions) -> Session:
        import onnx

        try:
            return ReferenceSession(onnx.load(str(path)))
        except Exception as exc:
            raise ModelLoadError(f"{NAME} cannot load {path}: {exc}") from None


LINEAR = "linear-numpy"


def write_linear(path: Path, w: np.ndarray, b: np.ndarray, input_name: str, output_name: str,
                 precision: str = "fp32") -> Path:
    """A ``.linear`` model file: an .npz of the weights ``W`` [in, out], the bias and the tensor names."""
    if precision == "bf16":  # bfloat16 weights: float32 with the low 16 bits of the mantissa dropped
        w = (np.ascontiguousarray(w, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    with open(path, "wb") as f:
        np.savez(f, W=np.asarray(w, np.float32), b=np.asarray(b, np.float32), input=np.array(input_name),
                 output=np.array(output_name), precision=np.array(precision))
    return path


class LinearSession(Session):
    """``x @ W + b`` in numpy."""

    def __init__(self, path: Path):
        with np.load(path, allow_pickle=False) as z:
            self._w, self._b = z["W"], z["b"]
            self.inputs = [TensorSpec(str(z["input"]), "FP32", (-1, self._w.shape[0]))]
            self.outputs = [TensorSpec(str(z["output"]), "FP32", (-1, self._w.shape[1]))]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.outputs[0].name: inputs[self.inputs[0].name] @ self._w + self._b}

    def close(self) -> None:
        self._w = self._b = None


class LinearBackend(Backend):
    """A format of its own: linear classifiers in ``.linear`` files, run by numpy, with a precision of its own."""

    name = LINEAR
    formats = ("linear",)
    suffixes = {".linear": "linear"}
    aliases = ("lin",)
    precisions = {"bf16": 16}
    memory_estimate = (2 << 20, 1.0)
    install_hint = "pip install edgerun-fakebackend"

    def availability(self) -> Availability:
        return Availability(True, version=np.__version__)

    def load(self, path: Path, options: LoadOptions) -> Session:
        try:
            return LinearSession(Path(path))
        except Exception as exc:
            raise ModelLoadError(f"{LINEAR} cannot load {path}: {exc}") from None


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Offer the reference-evaluator backend and the linear one."""
    register(ReferenceBackend)
    register(LinearBackend)


@hookimpl
def describe_device(facts: Any) -> dict[str, Any]:
    """Report a pretend NPU and a free-form fact."""
    return {"accelerators": ["fake_npu"], "fake_plugin": "present"}


@hookimpl
def on_model_activated(model: str, version: int, variant: str, backend: str) -> None:
    """Record the activation."""
    EVENTS.append(("activated", {"model": model, "version": version, "variant": variant, "backend": backend}))


@hookimpl
def on_update_event(model: str, version: int, state: str, detail: str) -> None:
    """Record the update transition."""
    EVENTS.append(("update", {"model": model, "version": version, "state": state, "detail": detail}))


class LinearNpz:
    """A model source: a linear classifier stored as ``W`` and ``b`` in a ``.linear.npz`` file, written as ONNX."""

    name = "linear-npz"
    describe = "a linear classifier in a .linear.npz file (arrays W and b)"

    def matches(self, spec: str) -> bool:
        return spec.endswith(".linear.npz")

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        with np.load(spec) as z:
            w, b = z["W"].astype(np.float32), z["b"].astype(np.float32)
        (name, x), = example.items()
        graph = helper.make_graph(
            [helper.make_node("Gemm", [name, "W", "b"], ["scores"])], "linear",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", x.shape[1]])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", w.shape[1]])],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out))
        return out


class CopyMaker:
    """A variant maker: another fp32 ONNX copy, to show a third-party method competes like the built-ins."""

    id, format, precision, method, order, always, option = "onnx-fp32-copy", "onnx", "fp32", "copy", 5, False, None

    def variant_id(self, options: dict[str, Any]) -> str:
        return self.id

    def make(self, job: Any) -> Any:
        import shutil

        from edgerun.hub.tools import Made

        shutil.copyfile(job.source, job.stage / f"{self.id}.onnx")
        return Made([f"{self.id}.onnx"], "copied by the fake plugin")


class LinearMaker:
    """A variant maker of the plugin's format and precision: a single-Gemm ONNX model as a bf16 ``.linear`` file."""

    id, format, precision, method, order, always, option = "linear-bf16", "linear", "bf16", "bf16", 60, False, None

    def variant_id(self, options: dict[str, Any]) -> str:
        return self.id

    def missing(self) -> str | None:
        return None

    def make(self, job: Any) -> Any:
        import onnx
        from onnx import helper, numpy_helper

        from edgerun.hub.tools import Made, PrecisionUnavailable

        model = onnx.load(str(job.source))
        ops = [n.op_type for n in model.graph.node]
        if ops != ["Gemm"]:
            raise PrecisionUnavailable(f"a .linear file holds one Gemm; this model has {ops}")
        gemm = model.graph.node[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        w = inits[gemm.input[1]].T if attrs.get("transB") else inits[gemm.input[1]]
        rel = f"{self.id}.linear"
        write_linear(job.stage / rel, w, inits[gemm.input[2]], gemm.input[0], gemm.output[0], "bf16")
        return Made([rel], "bfloat16 weights, by the fake plugin")


@hookimpl
def register_model_sources(register: Callable[[Any], None]) -> None:
    """Offer the .linear.npz source."""
    register(LinearNpz())


@hookimpl
def register_variant_makers(register: Callable[[Any], None]) -> None:
    """Offer the copying maker and the .linear one."""
    register(CopyMaker())
    register(LinearMaker())
