"""The built-in model sources: an ONNX file as it is (PyTorch and TensorFlow sources plug in here too)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from edgerun.hookspecs import hookimpl
from edgerun.hub.tools import ModelSource


class OnnxFile(ModelSource):
    """An ``.onnx`` file."""

    name = "onnx"
    describe = "an ONNX file (.onnx)"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith(".onnx")

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        shutil.copyfile(spec, out)
        return out


@hookimpl
def register_model_sources(register: Callable[[ModelSource], None]) -> None:
    register(OnnxFile())
