"""Helpers for the backend tests: the installed backends, IR conversion and the onnxruntime reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgerun.backend import Backend

REPO = Path(__file__).resolve().parents[2]
TFLITE_DIR = REPO / "examples" / "tflite"


def backend(name: str) -> Backend:
    """The installed backend called ``name``, or skip when its library is not installed here."""
    from edgerun_litert import LiteRTBackend
    from edgerun_onnxruntime import OnnxRuntimeBackend
    from edgerun_openvino import OpenVinoBackend

    b = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend, "litert": LiteRTBackend}[name]()
    avail = b.availability()
    if not avail.available:
        pytest.skip(f"{name} {avail}")
    return b


def save_ir(onnx_path: Path, xml_path: Path) -> Path:
    """Convert an ONNX file to OpenVINO IR (.xml + .bin) in fp32."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


@dataclass(frozen=True)
class Case:
    """A backend, a model file it loads, and the ONNX file holding the same weights (the reference)."""

    id: str
    backend: str
    path: Path
    reference: Path


def reference_run(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output on ``x``: the reference every backend is compared with."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]
