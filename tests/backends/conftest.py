"""Fixtures for the backend tests: the digits model as ONNX, OpenVINO IR and tflite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend_helpers import TFLITE_DIR, Case, save_ir


@pytest.fixture(scope="session")
def digits_onnx(digits_package) -> Path:
    return digits_package.path_of(digits_package.variant("onnx-fp32").main_file)


@pytest.fixture(scope="session")
def digits_ir(digits_onnx, tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    return save_ir(digits_onnx, tmp_path_factory.mktemp("ir") / "digits.xml")


CASE_IDS = ["onnxruntime-onnx", "openvino-onnx", "openvino-ir", "litert-tflite"]


@pytest.fixture(params=CASE_IDS)
def case(request) -> Case:
    """Each backend on the digits MLP in each format it loads."""
    cid = request.param
    if cid == "onnxruntime-onnx":
        onnx = request.getfixturevalue("digits_onnx")
        return Case(cid, "onnxruntime", onnx, onnx)
    if cid == "openvino-onnx":
        onnx = request.getfixturevalue("digits_onnx")
        return Case(cid, "openvino", onnx, onnx)
    if cid == "openvino-ir":
        return Case(cid, "openvino", request.getfixturevalue("digits_ir"), request.getfixturevalue("digits_onnx"))
    return Case(cid, "litert", TFLITE_DIR / "digits_fp32.tflite", TFLITE_DIR / "digits_fp32.onnx")


@pytest.fixture(scope="session")
def digits_x() -> np.ndarray:
    from edgerun.testing.models import digits_data

    return digits_data()[2][:7]
