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


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Offer the reference-evaluator backend."""
    register(ReferenceBackend)


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
