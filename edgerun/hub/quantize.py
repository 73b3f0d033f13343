"""Making variants of an ONNX model: fp16, int8 static (QDQ) and dynamic, int4 weight-only, pruning, OpenVINO IR.

Every maker writes its files and returns; one that cannot make its variant for this model raises
``PrecisionUnavailable`` with the reason. onnx, onnxruntime, openvino and nncf are imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Int8Settings:
    """How a static int8 variant was quantized, and for which CPUs' int8 kernels."""

    reduce_range: bool
    per_channel: bool = True
    activations: str = "uint8"
    weights: str = "int8"
    targets: tuple[str, ...] = ()  # CPU classes it is made for: x86-vnni, x86, arm64
    excluded: tuple[str, ...] = ()  # nodes left in fp32 to meet the accuracy bound
    tool: str = "onnxruntime quantize_static"

    def describe(self) -> str:
        parts = [f"{self.tool}: {self.activations} activations, {self.weights} weights "
                 f"{'per channel' if self.per_channel else 'per tensor'}"]
        if self.reduce_range:
            parts.append("7-bit weight range (reduce_range) for x86 CPUs without VNNI")
        if self.targets:
            parts.append(f"for {', '.join(self.targets)}")
        if self.excluded:
            parts.append(f"{len(self.excluded)} sensitive node(s) kept in fp32: {', '.join(self.excluded[:4])}"
                         + ("..." if len(self.excluded) > 4 else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "reduce_range": self.reduce_range, "per_channel": self.per_channel,
                "activations": self.activations, "weights": self.weights, "targets": list(self.targets),
                "excluded": list(self.excluded)}


def int8_settings(targets: tuple[str, ...] | None, exclude: tuple[str, ...] = ()) -> Int8Settings:
    """The static int8 settings the targets' kernels need.

    onnxruntime's u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply with VPMADDUBSW,
    whose 16-bit pair sums can saturate; a 7-bit weight range avoids that. CPUs with VNNI and ARM64 have no
    such limit, so full-range weights are kept when no target needs it.
    """
    targets = tuple(targets or CPU_CLASSES)
    return Int8Settings(reduce_range="x86" in targets, targets=targets, excluded=tuple(exclude))


def make_int8_static(src: Path, dst: Path, calibration: dict[str, np.ndarray],
                     targets: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> Int8Settings:
    """QDQ int8: per-channel int8 weights, uint8 activations with ranges from the calibration set, with the
    weight range the targets' kernels need; ``exclude`` names nodes left in fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    settings = int8_settings(targets, exclude)
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
                            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(settings.excluded),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    except Exception as exc:
        raise PrecisionUnavailable(f"static int8 quantization failed: {exc}") from None
    finally:
        prepped.unlink(missing_ok=True)
        for extra in dst.parent.glob(dst.stem + "*-inferred.onnx"):
            extra.unlink()
    return settings


def make_int8_dynamic(src: Path, dst: Path, targets: tuple[str, ...] | None = None) -> Int8Settings:
    """Dynamic int8: int8 weights (7-bit for x86 targets without VNNI), activations quantized at run time
    (MatMulInteger/ConvInteger, the same u8s8 kernels as static int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = replace(int8_settings(targets), per_channel=False, activations="uint8 at run time",
                       tool="onnxruntime quantize_dynamic")
    try:
        with _quiet_root_logger():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                             reduce_range=settings.reduce_range)
    except Exception as exc:
        raise PrecisionUnavailable(f"dynamic int8 quantization failed: {exc}") from None
    return settings


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


def make_openvino(src: Path, xml: Path, precision: str, method: str, calibration: dict[str, np.ndarray] | None,
                  profile: WeightProfile, scorer: Any = None, targets: tuple[str, ...] = CPU_CLASSES) -> None:
    """An OpenVINO IR (.xml + .bin) from the ONNX model.

    fp32/fp16: ``convert_model`` + ``save_model`` (fp16 compresses weights). int8 ``nncf``: post-training
    quantization with the calibration set; int8/int4 ``weights``: NNCF weight-only compression of MatMul layers.
    """
    why = openvino_missing()
    if why:
        raise PrecisionUnavailable(why)
    import openvino as ov

    model = ov.convert_model(str(src))
    if precision in ("fp32", "fp16"):
        ov.save_model(model, str(xml), compress_to_fp16=(precision == "fp16"))
        return
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
                if scorer is not None:  # keeps the most sensitive layers in fp32 until the drop fits the bound
                    from edgerun.hub.accuracy import openvino_int8_with_accuracy_control

                    model = openvino_int8_with_accuracy_control(model, calibration, scorer, targets)
                else:
                    rows = list(iter_rows(calibration))
                    model = nncf.quantize(model, nncf.Dataset(rows), subset_size=min(300, len(rows)))
            elif method == "weights":
                if not profile.matmul_heavy:
                    raise PrecisionUnavailable(f"weight-only compression covers MatMul weights; this model is Conv-heavy "
                                               f"({profile.describe()})")
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
