"""The built-in variant makers: ONNX (fp32, fp16, int8 static and dynamic, int4, pruned) and OpenVINO IR.

Each is a plugin on ``register_variant_makers``; the work is done by ``edgerun.hub.quantize``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from edgerun.device import CPU_CLASSES
from edgerun.hookspecs import hookimpl
from edgerun.hub import quantize as q
from edgerun.hub.tools import Made, MakeJob, PrecisionUnavailable, VariantMaker

log = logging.getLogger(__name__)


class OnnxFp32(VariantMaker):
    """The model as given: the reference every other variant is judged by."""

    id, format, precision, method, order, always = "onnx-fp32", "onnx", "fp32", "original", 0, True

    def make(self, job: MakeJob) -> Made:
        q.copy_fp32(job.source, job.stage / f"{self.id}.onnx")
        return Made([f"{self.id}.onnx"])


class OnnxPruned(VariantMaker):
    """fp32 with the smallest weights zeroed (``--prune``): smaller after compression, not faster."""

    id, format, precision, method, order, option = "onnx-fp32-pruned", "onnx", "fp32", "prune", 1, "prune"

    def variant_id(self, options: dict[str, Any]) -> str:
        return f"{self.id}{round(100 * options['prune'])}"

    def make(self, job: MakeJob) -> Made:
        rel = f"{job.variant_id}.onnx"
        sparsity = q.prune(job.source, job.stage / rel, job.options["prune"])
        return Made([rel], f"{100 * sparsity:.0f}% of MatMul/Gemm/Conv weights zeroed (magnitude)")


class _OnnxMaker(VariantMaker):
    """An ONNX variant written by one function of ``edgerun.hub.quantize``."""

    format = "onnx"

    def write(self, job: MakeJob, dst: Any) -> str:
        raise NotImplementedError

    def make(self, job: MakeJob) -> Made:
        rel = f"{self.id}.onnx"
        note = self.write(job, job.stage / rel)
        return Made([rel], note or "")


class OnnxFp16(_OnnxMaker):
    """Weights and compute in fp16, fp32 at the edges."""

    id, precision, method, order = "onnx-fp16", "fp16", "fp16", 10

    def write(self, job: MakeJob, dst: Any) -> str:
        q.make_fp16(job.source, dst)
        return ""


class OnnxInt8Static(_OnnxMaker):
    """QDQ int8 with ranges from the calibration set and the settings the targets' int8 kernels need; checked on
    the validation set here and on emulated CPUs, with NNCF's accuracy control when it drops too much."""

    id, precision, method, order = "onnx-int8-qdq", "int8", "static", 20

    def make(self, job: MakeJob) -> Made:
        if not job.calibration:
            raise PrecisionUnavailable("static int8 needs calibration data")
        rel = f"{self.id}.onnx"
        dst = job.stage / rel
        targets = tuple(job.options.get("int8_targets") or CPU_CLASSES)
        info = q.make_int8_static(job.source, dst, job.calibration, targets=targets)
        scorer = job.options.get("scorer")
        if scorer is None:
            return Made([rel], q.describe_int8(info), {"int8": info})
        here = scorer.onnx(dst)
        if scorer.baseline - here > scorer.max_drop + 1e-9:
            from edgerun.hub.accuracy import onnx_int8_with_accuracy_control

            log.info("%s drops %.2f points; NNCF accuracy control keeps sensitive layers in fp32", self.id,
                     100 * (scorer.baseline - here))
            plain = here
            here = onnx_int8_with_accuracy_control(job.source, dst, job.calibration, scorer, targets)
            # what NNCF made, read from the file: its own weights and activations, the layers it kept in fp32
            info = {"tool": "NNCF quantize_with_accuracy_control", "overflow_fix": q.narrow_weights(targets),
                    "targets": list(targets), **q.observe_onnx_int8(dst),
                    "plain_score": round(plain, 4), "score": round(here, 4)}
            if scorer.baseline - here > scorer.max_drop + 1e-9:
                raise PrecisionUnavailable(f"int8 stays {100 * (scorer.baseline - here):.2f} points below fp32 even "
                                           f"with {len(info['excluded'])} layer(s) kept in fp32 by NNCF's accuracy "
                                           f"control (plain int8: {100 * (scorer.baseline - plain):.2f} points)")
        return Made([rel], q.describe_int8(info), {"int8": info})


class OnnxInt8Dynamic(_OnnxMaker):
    """int8 weights, activations quantized at run time, with the weight range the targets' kernels need."""

    id, precision, method, order = "onnx-int8-dynamic", "int8", "dynamic", 21

    def make(self, job: MakeJob) -> Made:
        rel = f"{self.id}.onnx"
        info = q.make_int8_dynamic(job.source, job.stage / rel, targets=job.options.get("int8_targets"))
        return Made([rel], q.describe_int8(info), {"int8": info})


class OnnxInt4(_OnnxMaker):
    """4-bit weight-only MatMulNBits for MatMul-heavy models."""

    id, precision, method, order = "onnx-int4", "int4", "matmulnbits", 30

    def write(self, job: MakeJob, dst: Any) -> str:
        n = q.make_int4(job.source, dst, q.weight_profile(q.load_onnx(job.source, check=False)))
        return f"{n} MatMul/Gemm layer(s) as 4-bit MatMulNBits, block 32"


class _OpenVinoMaker(VariantMaker):
    """An OpenVINO IR (.xml + .bin) by conversion, NNCF quantization (with accuracy control) or weight compression."""

    format = "openvino"

    def missing(self) -> str | None:
        return q.openvino_missing()

    def make(self, job: MakeJob) -> Made:
        rel = f"{self.id}/model.xml"
        targets = tuple(job.options.get("int8_targets") or CPU_CLASSES)
        quantized = self.method == "nncf"
        if quantized:  # int8 kernels on x86-64 only: on ARM the FakeQuantize layers run in floating point
            targets = tuple(t for t in targets if t in q.OPENVINO_INT8_CLASSES)
            if not targets:
                raise PrecisionUnavailable("OpenVINO runs int8 on x86-64 CPUs only (on ARM its CPU plugin computes "
                                           "quantized layers in floating point), and the targets are ARM")
        (job.stage / self.id).mkdir(parents=True, exist_ok=True)
        scorer = job.options.get("scorer") if quantized else None
        tool = q.make_openvino(job.source, job.stage / rel, self.precision, self.method, job.calibration,
                               q.weight_profile(q.load_onnx(job.source, check=False)), scorer=scorer, targets=targets)
        files = [rel, f"{self.id}/model.bin"]
        if not quantized:
            return Made(files)
        info = {"tool": tool, "overflow_fix": q.narrow_weights(targets), "targets": list(targets),
                **q.observe_ir_int8(job.stage / rel)}
        return Made(files, q.describe_int8(info), {"int8": info})


def _openvino(vid: str, precision: str, method: str, order: int) -> type[VariantMaker]:
    return type(vid.replace("-", "_"), (_OpenVinoMaker,), {"id": vid, "precision": precision, "method": method,
                                                          "order": order, "__doc__": f"OpenVINO IR, {precision}."})


BUILTIN: list[Callable[[], VariantMaker]] = [
    OnnxFp32, OnnxPruned, OnnxFp16, OnnxInt8Static, OnnxInt8Dynamic, OnnxInt4,
    _openvino("openvino-fp32", "fp32", "convert", 40), _openvino("openvino-fp16", "fp16", "convert", 41),
    _openvino("openvino-int8-nncf", "int8", "nncf", 42), _openvino("openvino-int8-weights", "int8", "weights", 43),
    _openvino("openvino-int4", "int4", "weights", 44),
]


@hookimpl
def register_variant_makers(register: Callable[[VariantMaker], None]) -> None:
    for cls in BUILTIN:
        register(cls())
