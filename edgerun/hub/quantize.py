"""Making variants of an ONNX model: fp16, int8 static (QDQ) and dynamic, int4 weight-only, pruning, OpenVINO IR.

Every maker writes its files and returns; one that cannot make its variant for this model raises
``PrecisionUnavailable`` with the reason. onnx, onnxruntime, openvino and nncf are imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgerun.device import CPU_CLASSES
from edgerun.errors import PackageError
from edgerun.hub.tools import PrecisionUnavailable
from edgerun.tensors import TensorSpec

log = logging.getLogger(__name__)

HUB_EXTRA_HINT = "pip install 'edgerun[hub]'"

_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL",
               10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 8: "BYTES"}
MATMUL_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class WeightProfile:
    """Where a model's parameters live: MatMul/Gemm weights versus Conv weights."""

    matmul_params: int
    conv_params: int
    other_params: int

    @property
    def total(self) -> int:
        return self.matmul_params + self.conv_params + self.other_params

    @property
    def matmul_heavy(self) -> bool:
        """Most weights feed MatMul/Gemm (MLPs, transformers) rather than Conv."""
        return self.matmul_params > self.conv_params

    def describe(self) -> str:
        t = max(1, self.total)
        return (f"{self.total:,} parameters: {100 * self.matmul_params / t:.0f}% MatMul/Gemm, "
                f"{100 * self.conv_params / t:.0f}% Conv")


def load_onnx(path: Path, check: bool = True) -> Any:
    """The ONNX model at ``path``, checked; PackageError naming the file when it is not a loadable ONNX model."""
    import onnx

    path = Path(path)
    if not check:
        return onnx.load(str(path))
    if not path.is_file():
        raise PackageError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise PackageError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise PackageError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PackageError(f"{path}: the ONNX model fails onnx.checker: {exc}") from None
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PackageError(f"{path}: onnxruntime cannot load the model: {exc}") from None
    return model


def interface(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs (initializers excluded) and outputs as TensorSpecs; dynamic dims are -1."""
    inits = {i.name for i in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
        return TensorSpec(v.name, _ONNX_TYPES.get(t.elem_type, "BYTES"), shape)

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def weight_profile(model: Any) -> WeightProfile:
    """Count the parameters feeding MatMul/Gemm, Conv and everything else."""
    sizes = {i.name: int(np.prod(i.dims)) if i.dims else 1 for i in model.graph.initializer}
    mm = conv = 0
    used: set[str] = set()
    for node in model.graph.node:
        for name in node.input[1:2]:
            if name in sizes and name not in used:
                used.add(name)
                if node.op_type in MATMUL_OPS:
                    mm += sizes[name]
                elif node.op_type == "Conv":
                    conv += sizes[name]
    other = sum(sizes.values()) - mm - conv
    return WeightProfile(mm, conv, other)


# --- ONNX variants --------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs each tensor at INFO on the root logger; keep that out of the CLI's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def copy_fp32(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def make_fp16(src: Path, dst: Path) -> None:
    """Weights and compute in fp16; fp32 inputs/outputs stay fp32 (Casts at the edges)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise PrecisionUnavailable(f"onnxconverter-common is not installed ({HUB_EXTRA_HINT})") from None
    import warnings

    model = onnx.load(str(src))
    try:
        with warnings.catch_warnings():  # "the float32 number ... will be truncated" for tiny weights
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    except Exception as exc:
        raise PrecisionUnavailable(f"fp16 conversion failed: {exc}") from None
    _name_output_casts(converted)
    onnx.save(converted, str(dst))


def _name_output_casts(model: Any) -> None:
    """Rename the fp16 tensor feeding each output's Cast to ``<output>_fp16`` so backends report the output's own name,
    and make nodes that read an output read that fp16 tensor instead.

    OpenVINO folds that Cast when it computes in fp32, merges the two tensor names on the output port and reports
    the lexicographically smallest; onnxconverter-common's ``<node>_cast_to_<output>`` can sort first (an unnamed
    node gives ``_cast_to_probabilities``), ``<output>_fp16`` never does.
    """
    outputs = {o.name for o in model.graph.output}
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.initializer}
    renames: dict[str, str] = {}
    for node in model.graph.node:
        if (node.op_type == "Cast" and len(node.output) == 1 and node.output[0] in outputs
                and node.input[0] not in outputs):
            new = f"{node.output[0]}_fp16"
            while new in taken:
                new += "_"
            renames[node.input[0]] = new
            taken.add(new)
    for node in model.graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
        node.output[:] = [renames.get(t, t) for t in node.output]
    for info in model.graph.value_info:
        info.name = renames.get(info.name, info.name)
    # an output that also feeds other nodes (logits -> softmax): those read the fp16 tensor before its Cast,
    # as the rest of the graph computes in fp16 (the fp32 output would not match their fp16 inputs)
    casts = {n.output[0]: n for n in model.graph.node
             if n.op_type == "Cast" and len(n.output) == 1 and n.output[0] in outputs}
    for node in model.graph.node:
        if node in casts.values():
            continue
        node.input[:] = [casts[t].input[0] if t in casts else t for t in node.input]


class _Reader:
    """An onnxruntime CalibrationDataReader over the calibration arrays, one row at a time."""

    def __init__(self, data: dict[str, np.ndarray]):
        self._rows = iter_rows(data)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._rows, None)


def iter_rows(data: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Batch-1 inputs: row i of every array."""
    n = len(next(iter(data.values())))
    for i in range(n):
        yield {k: v[i:i + 1] for k, v in data.items()}


WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
SAFE_WEIGHT = 64  # |int8 weight| <= 64: a pair of u8 x s8 products stays below 32768, VPMADDUBSW cannot saturate


def narrow_weights(targets: tuple[str, ...]) -> bool:
    """Whether int8 weights must use 7 bits for these targets.

    onnxruntime's u8s8 kernels (and OpenVINO's) on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply
    with VPMADDUBSW, whose 16-bit pair sums can saturate; 7-bit weights cannot. CPUs with VNNI and ARM64 have no
    such limit (onnxruntime's quantization guide), so full-range weights are kept when no target needs it.
    """
    return "x86" in targets


def observe_onnx_int8(path: Path) -> dict[str, Any]:
    """What an int8 ONNX model is, read from the file: the weight type and largest magnitude, per channel or not,
    the activation types, and the weight layers left in fp32."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    weights: list[np.ndarray] = []
    per_channel = False
    activations: set[str] = set()
    for node in model.graph.node:
        x = node.input[0] if node.input else ""
        if node.op_type == "DequantizeLinear" and x in inits:
            q = numpy_helper.to_array(inits[x])
            if q.dtype in (np.int8, np.uint8):
                zp_name = node.input[2] if len(node.input) > 2 else ""
                zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else 0
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                weights.append(q.astype(np.int32) - (np.expand_dims(zp, tuple(i for i in range(q.ndim) if i != axis))
                                                     if np.ndim(zp) else zp))
                per_channel = per_channel or numpy_helper.to_array(inits[node.input[1]]).size > 1
        elif node.op_type in ("MatMulInteger", "ConvInteger") and len(node.input) > 1 and node.input[1] in inits:
            weights.append(numpy_helper.to_array(inits[node.input[1]]).astype(np.int32))
            activations.add("uint8 at run time")
        elif node.op_type == "QuantizeLinear" and x not in inits and len(node.input) > 2 and node.input[2] in inits:
            activations.add({np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}.get(
                numpy_helper.to_array(inits[node.input[2]]).dtype, "?"))
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    integer = {n.output[0] for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger")}
    fp32 = [n.name or n.output[0] for n in model.graph.node
            if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits and n.input[1] not in dq
            and n.output[0] not in integer]
    top = max((int(np.abs(w).max()) for w in weights if w.size), default=0)
    return {"weights": "int8" if weights else "none", "weight_max": top, "per_channel": per_channel,
            "activations": ", ".join(sorted(activations)) or "float", "excluded": fp32}


def describe_int8(info: dict[str, Any]) -> str:
    """One line for the report: how an int8 variant was made, what it is and for which CPUs."""
    parts = [f"{info['tool']}: {info.get('activations', '?')} activations, {info.get('weights', '?')} weights "
             f"{'per channel' if info.get('per_channel') else 'per tensor'}"]
    if "weight_max" in info:
        parts.append(f"|weights| <= {info['weight_max']}" + (" (7-bit: no saturation without VNNI)"
                                                             if 0 < info["weight_max"] <= SAFE_WEIGHT else ""))
    if info.get("targets"):
        parts.append(f"for {', '.join(info['targets'])}")
    excluded = info.get("excluded") or []
    if excluded:
        parts.append(f"{len(excluded)} sensitive layer(s) kept in fp32: {', '.join(excluded[:4])}"
                     + ("..." if len(excluded) > 4 else ""))
    return "; ".join(parts)


def make_int8_static(src: Path, dst: Path, calibration: dict[str, np.ndarray],
                     targets: tuple[str, ...] | None = None) -> dict[str, Any]:
    """QDQ int8: per-channel int8 weights, uint8 activations with ranges from the calibration set, with the
    weight range the targets' kernels need; returns the record of what was made (``info.int8``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    targets = tuple(targets or CPU_CLASSES)
    reduce_range = narrow_weights(targets)
    prepped = dst.with_suffix(".pre.onnx")
    source = src
    try:
        from onnxruntime.quantization import quant_pre_process

        with _quiet_root_logger():
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        source = prepped
    except Exception as exc:  # pre-processing only helps; quantize without it
        log.info("quant_pre_process skipped for %s: %s", src, exc)
    try:
        with _quiet_root_logger():
            quantize_static(str(source), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    except Exception as exc:
        raise PrecisionUnavailable(f"static int8 quantization failed: {exc}") from None
    finally:
        prepped.unlink(missing_ok=True)
        for extra in dst.parent.glob(dst.stem + "*-inferred.onnx"):
            extra.unlink()
    return {"tool": "onnxruntime quantize_static", "reduce_range": reduce_range, "targets": list(targets),
            **observe_onnx_int8(dst)}


def make_int8_dynamic(src: Path, dst: Path, targets: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Dynamic int8: int8 weights (7-bit for x86 targets without VNNI), activations quantized at run time
    (MatMulInteger/ConvInteger, the same u8s8 kernels as static int8); returns the record of what was made."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    targets = tuple(targets or CPU_CLASSES)
    reduce_range = narrow_weights(targets)
    try:
        with _quiet_root_logger():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                             reduce_range=reduce_range)
    except Exception as exc:
        raise PrecisionUnavailable(f"dynamic int8 quantization failed: {exc}") from None
    return {"tool": "onnxruntime quantize_dynamic", "reduce_range": reduce_range, "targets": list(targets),
            **observe_onnx_int8(dst)}


def make_int4(src: Path, dst: Path, profile: WeightProfile, block_size: int = 32) -> int:
    """int4 weight-only: constant-weight MatMul/Gemm become onnxruntime's MatMulNBits (4-bit blocks, fp32 scales).

    Returns the number of layers converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    if not profile.matmul_heavy:
        raise PrecisionUnavailable(f"int4 weight-only covers MatMul/Gemm weights; this model is Conv-heavy "
                                   f"({profile.describe()})")
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    converted = 0
    dropped: set[str] = set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_name = node.input[1] if len(node.input) > 1 else ""
        ok = (node.op_type in MATMUL_OPS and w_name in inits and len(inits[w_name].dims) == 2
              and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if not ok:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if attrs.get("transB", 0):
            w = w.T
        k, n = w.shape
        if k < block_size:
            nodes.append(node)
            continue
        packed, scales = _pack_int4(w, block_size)
        base = node.name or w_name
        out = node.output[0] if not (node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]) else f"{base}_nbits"
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_q4"),
                                        numpy_helper.from_array(scales, f"{base}_scales")])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{base}_q4", f"{base}_scales"], [out],
                                      name=f"{base}_MatMulNBits", domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block_size))
        if out != node.output[0]:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{base}_bias"))
        dropped.add(w_name)
        converted += 1
    if not converted:
        raise PrecisionUnavailable("no MatMul/Gemm with a constant 2-D weight of at least "
                                   f"{block_size} input features to quantize to int4")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    still_used = {i for n in nodes for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in dropped or i.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return converted


def _pack_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks along K of a [K, N] weight in MatMulNBits layout: ([N, blocks, bs/2] uint8, scales)."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)
    scale = np.abs(wt).max(axis=-1) / 7.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(wt / scale[..., None]), -8, 7).astype(np.int32) + 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale.astype(np.float32).reshape(-1)


def prune(src: Path, dst: Path, sparsity: float) -> float:
    """Magnitude pruning: zero the smallest ``sparsity`` of each MatMul/Gemm/Conv weight; returns the overall sparsity."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    targets = {n.input[1] for n in model.graph.node if n.op_type in (*MATMUL_OPS, "Conv") and len(n.input) > 1}
    zeros = total = 0
    for i, init in enumerate(model.graph.initializer):
        if init.name not in targets:
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        cut = np.quantile(np.abs(w), sparsity)
        w = np.where(np.abs(w) <= cut, 0.0, w).astype(np.float32)
        zeros += int((w == 0).sum())
        total += w.size
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
    if not total:
        raise PrecisionUnavailable("no MatMul/Gemm/Conv weights to prune")
    onnx.save(model, str(dst))
    return zeros / total


# --- OpenVINO IR ------------------------------------------------------------------------------------


def openvino_missing() -> str | None:
    """Why OpenVINO IR variants cannot be made here, or None."""
    try:
        import openvino  # noqa: F401
    except Exception as exc:
        return f"openvino is not installed ({type(exc).__name__}); {HUB_EXTRA_HINT}"
    return None


OPENVINO_INT8_CLASSES = ("x86-vnni", "x86")  # OpenVINO's CPU plugin has int8 kernels on x86-64 only
IR_WEIGHT_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


def observe_ir_int8(xml: Path) -> dict[str, Any]:
    """What an NNCF-quantized OpenVINO IR is, read from it: the largest int8 weight, per channel or not, the
    activations' quantizers and the weight layers left in fp32."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    top, per_channel, fp32, levels = 0, False, [], set()

    def quantized_weight(node: Any) -> bool:
        nonlocal top, per_channel
        for _ in range(4):  # Multiply(scale) <- [Subtract(zero point) <-] Convert <- Constant(i8)
            kind = node.get_type_name()
            if kind == "Constant":
                if node.get_element_type().get_type_name() not in ("i8", "u8"):
                    return False
                top = max(top, int(np.abs(node.get_data().astype(np.int32)).max()))
                return True
            if kind == "FakeQuantize":
                return True
            if kind == "Multiply":
                per_channel = per_channel or int(np.prod(list(node.input(1).get_partial_shape().to_shape()))) > 1
            node = node.input(0).get_source_output().get_node()
        return False

    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            levels.add(int(op.get_attributes()["levels"]))
        elif kind in IR_WEIGHT_OPS and not quantized_weight(op.input(1).get_source_output().get_node()):
            fp32.append(op.get_friendly_name())
    return {"weights": "int8", "weight_max": top, "per_channel": per_channel,
            "activations": ", ".join(f"{int(np.log2(n))}-bit (FakeQuantize, {n} levels)" for n in sorted(levels))
            or "float", "excluded": fp32}


def make_openvino(src: Path, xml: Path, precision: str, method: str, calibration: dict[str, np.ndarray] | None,
                  profile: WeightProfile, scorer: Any = None, targets: tuple[str, ...] = CPU_CLASSES) -> str:
    """An OpenVINO IR (.xml + .bin) from the ONNX model; returns the tool that made it.

    fp32/fp16: ``convert_model`` + ``save_model`` (fp16 compresses weights). int8 ``nncf``: post-training
    quantization with the calibration set, scored on the validation set with ``scorer`` and made again with NNCF's
    accuracy control when it drops more than the bound; int8/int4 ``weights``: NNCF weight-only compression.
    """
    why = openvino_missing()
    if why:
        raise PrecisionUnavailable(why)
    import openvino as ov

    model = ov.convert_model(str(src))
    tool = "openvino convert_model"
    if precision in ("fp32", "fp16"):
        ov.save_model(model, str(xml), compress_to_fp16=(precision == "fp16"))
        return tool
    try:
        import nncf
    except Exception as exc:
        raise PrecisionUnavailable(f"nncf is not installed ({type(exc).__name__}); {HUB_EXTRA_HINT}") from None
    import io
    import logging as _logging

    nncf.set_log_level(_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws its own progress bars and tables
            if method == "nncf":
                if not calibration:
                    raise PrecisionUnavailable("NNCF int8 quantization needs a calibration set")
                from edgerun.hub.accuracy import (advanced_parameters, openvino_int8_with_accuracy_control,
                                                  openvino_score)

                rows = list(iter_rows(calibration))
                quantized = nncf.quantize(model, nncf.Dataset(rows), subset_size=min(300, len(rows)),
                                          advanced_parameters=advanced_parameters(targets))
                tool = "NNCF quantize"
                if scorer is not None and scorer.baseline - openvino_score(quantized, scorer) > scorer.max_drop + 1e-9:
                    # keeps the most sensitive layers in fp32 until the drop fits the bound
                    quantized = openvino_int8_with_accuracy_control(ov.convert_model(str(src)), calibration, scorer,
                                                                    targets)
                    tool = "NNCF quantize_with_accuracy_control"
                    drop = scorer.baseline - openvino_score(quantized, scorer)
                    if drop > scorer.max_drop + 1e-9:
                        raise PrecisionUnavailable(f"int8 stays {100 * drop:.2f} points below fp32 even with NNCF's "
                                                   f"accuracy control")
                model = quantized
            elif method == "weights":
                if not profile.matmul_heavy:
                    raise PrecisionUnavailable(f"weight-only compression covers MatMul weights; this model is Conv-heavy "
                                               f"({profile.describe()})")
                tool = "NNCF compress_weights"
                if precision == "int8":
                    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
                else:
                    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, ratio=1.0,
                                                  group_size=32, all_layers=True)
            else:
                raise ValueError(f"unknown OpenVINO method {method!r}")
    except PrecisionUnavailable:
        raise
    except Exception as exc:
        raise PrecisionUnavailable(f"NNCF {method} {precision} failed: {type(exc).__name__}: {exc}") from None
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return tool
