"""Scoring candidate models on the validation set while they are made, and NNCF's accuracy-controlled int8.

A ``Scorer`` holds the validation set and what the fp32 model scores on it; makers use it to check an int8
model right after making it and, when it drops more than the bound, to let NNCF's
``quantize_with_accuracy_control`` keep the most sensitive layers in fp32 until the drop fits.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgerun.hub.tools import PrecisionUnavailable

log = logging.getLogger(__name__)

@dataclass
class Scorer:
    """Top-1 accuracy on labels, or top-1 agreement with the fp32 model, over the validation set (batch 1)."""

    data: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: np.ndarray  # the fp32 model's top-1 per example
    max_drop: float  # the bound, as a fraction (0.01 = one point)

    @property
    def metric(self) -> str:
        return "accuracy" if self.labels is not None else "agreement"

    @property
    def truth(self) -> np.ndarray:
        return self.labels if self.labels is not None else self.reference

    @property
    def baseline(self) -> float:
        """What the fp32 model scores (agreement with itself is 1)."""
        return float(np.mean(self.reference == self.truth))

    def __len__(self) -> int:
        return len(self.truth)

    def rows(self, n: int | None = None) -> Iterable[dict[str, np.ndarray]]:
        for i in range(len(self) if n is None else min(n, len(self))):
            yield {k: v[i:i + 1] for k, v in self.data.items()}

    def score_top1(self, top1: np.ndarray) -> float:
        return float(np.mean(top1 == self.truth[:len(top1)]))

    def onnx(self, model: Any, n: int | None = None) -> float:
        """Score an ONNX model (a path or a ModelProto) on onnxruntime, here."""
        return self.score_top1(onnx_top1(model, self.rows(n)))

    @classmethod
    def for_fp32(cls, model: Path, data: dict[str, np.ndarray], labels: np.ndarray | None,
                 max_drop: float) -> "Scorer":
        rows = ({k: v[i:i + 1] for k, v in data.items()} for i in range(len(next(iter(data.values())))))
        return cls(data, labels, onnx_top1(model, rows), max_drop)


def onnx_top1(model: Any, rows: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output's argmax for each row, on onnxruntime's CPU provider."""
    import onnxruntime as ort

    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return np.array([int(np.argmax(session.run([first], row)[0])) for row in rows], np.int64)


def _nncf_datasets(calibration: dict[str, np.ndarray], scorer: Scorer) -> tuple[Any, Any, int]:
    """NNCF's calibration and validation datasets, and the calibration subset size."""
    import nncf

    cal_rows = [{k: v[i:i + 1] for k, v in calibration.items()} for i in range(len(next(iter(calibration.values()))))]
    items = list(zip(scorer.rows(), scorer.truth))
    return nncf.Dataset(cal_rows), nncf.Dataset(items, lambda item: item[0]), min(300, len(cal_rows))


@contextlib.contextmanager
def quiet_nncf():
    """NNCF draws progress bars on stdout and logs at INFO: keep both out of the command line."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def advanced_parameters(targets: tuple[str, ...]) -> Any:
    """NNCF's overflow fix on every layer (7-bit weights) when an x86 target lacks VNNI, as onnxruntime's
    reduce_range; none otherwise."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from edgerun.hub.quantize import narrow_weights

    return AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if narrow_weights(targets)
                                          else OverflowFix.DISABLE)


def onnx_int8_with_accuracy_control(src: Path, dst: Path, calibration: dict[str, np.ndarray], scorer: Scorer,
                                    targets: tuple[str, ...]) -> float:
    """Quantize with NNCF, keeping layers in fp32 until the drop is within the bound; the score here."""
    import nncf
    import onnx

    model = onnx.load(str(src))
    cal, val, subset = _nncf_datasets(calibration, scorer)

    def validate(m: Any, items: Iterable[Any]) -> tuple[float, list[float]]:
        items = list(items)
        top = onnx_top1(m, (row for row, _ in items))
        hits = [float(t == want) for t, (_, want) in zip(top, items)]
        return float(np.mean(hits)), hits

    try:
        with quiet_nncf():
            quantized = nncf.quantize_with_accuracy_control(
                model, cal, val, validate, max_drop=scorer.max_drop, drop_type=nncf.DropType.ABSOLUTE,
                target_device=nncf.TargetDevice.CPU, subset_size=subset,
                advanced_quantization_parameters=advanced_parameters(targets))
    except Exception as exc:
        raise PrecisionUnavailable(f"NNCF accuracy-controlled int8 failed: {type(exc).__name__}: {exc}") from None
    onnx.save(quantized, str(dst))
    return scorer.onnx(quantized)


def openvino_score(model: Any, scorer: Scorer) -> float:
    """Score an OpenVINO model (from ``openvino.convert_model`` or NNCF) on the validation set, on one CPU thread."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    out = compiled.outputs[0]
    return scorer.score_top1(np.array([int(np.argmax(compiled(row)[out])) for row in scorer.rows()], np.int64))


def openvino_int8_with_accuracy_control(model: Any, calibration: dict[str, np.ndarray], scorer: Scorer,
                                        targets: tuple[str, ...]) -> Any:
    """The OpenVINO model quantized by NNCF with accuracy control (``model`` from ``openvino.convert_model``)."""
    import nncf

    cal, val, subset = _nncf_datasets(calibration, scorer)

    def validate(compiled: Any, items: Iterable[Any]) -> tuple[float, list[float]]:
        items = list(items)
        out = compiled.outputs[0]
        hits = [float(int(np.argmax(compiled(row)[out])) == want) for row, want in items]
        return float(np.mean(hits)), hits

    with quiet_nncf():
        return nncf.quantize_with_accuracy_control(
            model, cal, val, validate, max_drop=scorer.max_drop, drop_type=nncf.DropType.ABSOLUTE,
            target_device=nncf.TargetDevice.CPU, subset_size=subset,
            advanced_quantization_parameters=advanced_parameters(targets))


__all__ = ["Scorer", "onnx_int8_with_accuracy_control", "onnx_top1", "openvino_score",
           "openvino_int8_with_accuracy_control", "quiet_nncf"]
