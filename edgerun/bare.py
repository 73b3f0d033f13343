"""A bare model file (model.onnx, model.tflite, an OpenVINO IR .xml, ...) read as a package of one variant.

The backends say which file suffixes they load (``Backend.suffixes``); the interface is read by loading the
file once on the profile's preferred backend for its format. There are no samples and no measurements, and
the version is always 1.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence

from edgerun.backend import Backend, LoadOptions
from edgerun.errors import BackendUnavailable, ModelLoadError, PackageError
from edgerun.package import PACKAGE_FILE, ModelPackage, Variant, file_entry
from edgerun.protowire import fields, varint
from edgerun.tensors import DATATYPE_TO_DTYPE, TensorSpec
from edgerun.units import decimal

log = logging.getLogger(__name__)

VERSION = 1


def suffixes(backends: Mapping[str, Backend]) -> dict[str, str]:
    """Every file suffix the backends load, with its format (the first backend naming a suffix decides)."""
    found: dict[str, str] = {}
    for backend in backends.values():
        for suffix, fmt in dict(getattr(backend, "suffixes", None) or {}).items():
            found.setdefault(suffix.lower(), fmt)
    return found


def is_model_file(path: Path, backends: Mapping[str, Backend]) -> bool:
    """Whether ``path`` means a model file rather than a package directory (or its edgerun.toml)."""
    if path.is_file():
        return path.name != PACKAGE_FILE
    return not path.exists() and path.suffix.lower() in suffixes(backends)


def model_name(path: Path) -> str:
    """The file's stem as a model name: letters, digits, '.', '_' and '-', starting with a letter or digit."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).lstrip("._-") or "model"


def format_of(path: Path, backends: Mapping[str, Backend]) -> str:
    """The format a file is by its suffix; PackageError listing the suffixes the backends read when none claims it."""
    known = suffixes(backends)
    fmt = known.get(path.suffix.lower())
    if fmt is None:
        readable = ", ".join(sorted(known)) or "none (no backend plugin is installed)"
        raise PackageError(f"{path}: not a model file edgerun reads (suffix {path.suffix or '(none)'!r}); "
                           f"the installed backends read {readable}")
    return fmt


def from_model_file(path: str | Path, backends: Mapping[str, Backend], prefer: Sequence[str] = ()) -> ModelPackage:
    """A one-variant package for a model file, its interface read from the model on the first available backend."""
    path = Path(path)
    fmt = format_of(path, backends)
    if not path.is_file():
        raise PackageError(f"{path}: no such model file")
    files = [path]
    if fmt == "openvino" and path.with_suffix(".bin").is_file():
        files.append(path.with_suffix(".bin"))  # the IR's weights (the backend says so when it is missing)
    inputs, outputs = read_interface(path, fmt, backends, prefer)
    precision = precision_of(path, fmt)
    variant = Variant(f"{fmt}-{precision}", fmt, precision, tuple(file_entry(path.parent, f.name) for f in files))
    log.debug("%s: bare %s model, %s, inputs %s, outputs %s", path, fmt, precision, inputs, outputs)
    return ModelPackage(name=model_name(path), version=VERSION, inputs=inputs, outputs=outputs, variants=[variant],
                        description=f"bare model file {path.name}", root=path.parent, model_file=path)


def read_interface(path: Path, fmt: str, backends: Mapping[str, Backend],
                   prefer: Sequence[str] = ()) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs and outputs as a backend reads them (the file is loaded once, then closed)."""
    order = [*prefer, *(name for name in backends if name not in prefer)]
    able = [backends[name] for name in order if name in backends and fmt in backends[name].formats]
    backend = next((b for b in able if b.check().available), None)
    if backend is None:
        hints = sorted({b.install_hint for b in able if getattr(b, "install_hint", None)})
        raise BackendUnavailable(f"{path}: no available backend reads {fmt} models"
                                 + (f"; install one: {' or '.join(hints)}" if hints else ""))
    try:
        session = backend.load(path, LoadOptions(threads=1))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a valid {fmt} model ({exc})") from None
    try:
        inputs, outputs = list(session.inputs), list(session.outputs)
    finally:
        session.close()
    for kind, specs in (("input", inputs), ("output", outputs)):
        if not specs:
            raise PackageError(f"{path}: the model has no {kind}s")
        for spec in specs:
            if spec.datatype not in DATATYPE_TO_DTYPE:
                raise PackageError(f"{path}: {kind} {spec.name!r} is {spec.datatype}, not a KServe datatype "
                                   f"({', '.join(DATATYPE_TO_DTYPE)})")
    return inputs, outputs


# --- precision, read from the file -------------------------------------------------------------

def precision_of(path: Path, fmt: str) -> str:
    """fp32, fp16, int8 or int4 as the file's weights and operators show it; fp32 when it cannot tell."""
    reader = _PRECISION.get(fmt)
    if reader is None:
        return "fp32"
    try:
        return reader(path)
    except Exception as exc:  # an unexpected layout: the backend read the file, so it is a model all the same
        log.debug("%s: cannot tell its precision (%s: %s); calling it fp32", path, type(exc).__name__, exc)
        return "fp32"


def _by_weights(int4: bool, int8: bool, elements: Counter) -> str:
    """The least precise kind of weight present; fp16 when half-precision weights outnumber fp32 ones."""
    if int4:
        return "int4"
    if int8:
        return "int8"
    return "fp16" if elements["fp16"] > elements["fp32"] else "fp32"


def _mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# ONNX: a protobuf ModelProto, scanned for node op types and initializer data types (no onnx package needed).
_ONNX_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}  # and every QLinear* op
_ONNX_INT4_OPS = {"MatMulNBits", "GatherBlockQuantized"}
_ONNX_TYPES = {1: "fp32", 10: "fp16", 16: "fp16", 21: "int4", 22: "int4"}  # TensorProto.DataType


def _onnx_precision(path: Path) -> str:
    ops: set[str] = set()
    elements: Counter = Counter()
    with _mapped(path) as buf:
        def spans(span: tuple[int, int], number: int) -> list[tuple[int, int]]:
            """The length-delimited fields ``number`` of the message at ``span``."""
            return [v for f, _, v, _ in fields(buf, *span) if f == number and isinstance(v, tuple)]

        def op_types(span: tuple[int, int], node_field: int) -> None:
            for node in spans(span, node_field):
                ops.update(bytes(buf[s:e]).decode() for s, e in spans(node, 4))  # NodeProto.op_type

        whole = (0, len(buf))
        for graph in spans(whole, 7):  # ModelProto.graph
            op_types(graph, 1)  # GraphProto.node
            for tensor in spans(graph, 5):  # GraphProto.initializer
                dims, kind = 1, None
                for f, _, v, _ in fields(buf, *tensor):
                    if f == 1:  # TensorProto.dims, one by one or packed
                        dims *= math.prod(_packed(buf, v)) if isinstance(v, tuple) else v
                    elif f == 2 and isinstance(v, int):  # TensorProto.data_type
                        kind = _ONNX_TYPES.get(v)
                if kind:
                    elements[kind] += dims
        for function in spans(whole, 25):  # ModelProto.functions
            op_types(function, 7)  # FunctionProto.node
    int8 = bool(ops & _ONNX_INT8_OPS) or any(op.startswith("QLinear") for op in ops)  # int8 weights need them
    return _by_weights(bool(ops & _ONNX_INT4_OPS) or elements["int4"] > 0, int8, elements)


def _packed(buf: mmap.mmap, span: tuple[int, int]) -> list[int]:
    values, i = [], span[0]
    while i < span[1]:
        value, i = varint(buf, i)
        values.append(value)
    return values


# OpenVINO IR: the .xml's Const layers and their element types; FakeQuantize layers mean int8.
_IR_TYPES = {"f32": "fp32", "f16": "fp16", "bf16": "fp16", "i8": "int8", "u8": "int8", "i4": "int4", "u4": "int4",
             "nf4": "int4"}


def _ir_precision(path: Path) -> str:
    elements: Counter = Counter()
    fake_quantize = False
    for _, el in ET.iterparse(path):
        if el.tag != "layer":
            continue
        if el.get("type") == "FakeQuantize":
            fake_quantize = True
        elif el.get("type") == "Const" and (data := el.find("data")) is not None:
            kind = _IR_TYPES.get(data.get("element_type", ""))
            if kind:
                shape = [d for d in map(decimal, (data.get("shape") or "").split(",")) if d is not None]
                elements[kind] += math.prod(shape)
        el.clear()
    return _by_weights(elements["int4"] > 0, fake_quantize or elements["int8"] > 0, elements)


# TFLite: a flatbuffer Model; the types of its constant tensors (those with data in a buffer), integer ones
# counting when quantized (they carry quantization parameters).
_TFLITE_TYPES = {0: ("fp32", 4), 1: ("fp16", 2), 3: ("int8", 1), 9: ("int8", 1), 17: ("int4", 0.5),
                 18: ("fp16", 2)}  # TensorType: FLOAT32, FLOAT16, UINT8, INT8, INT4, BFLOAT16


class _Flat:
    """Just enough of the flatbuffers format to read tables, vectors and scalars."""

    def __init__(self, buf: mmap.mmap):
        self.buf = buf

    def u32(self, at: int) -> int:
        return struct.unpack_from("<I", self.buf, at)[0]

    def field(self, table: int, index: int) -> int | None:
        """Where field ``index`` of the table at ``table`` is, or None when absent."""
        vtable = table - struct.unpack_from("<i", self.buf, table)[0]
        size = struct.unpack_from("<H", self.buf, vtable)[0]
        entry = 4 + 2 * index
        off = struct.unpack_from("<H", self.buf, vtable + entry)[0] if entry < size else 0
        return table + off if off else None

    def ref(self, at: int | None) -> int | None:
        return None if at is None else at + self.u32(at)

    def tables(self, table: int, index: int) -> list[int]:
        vec = self.ref(self.field(table, index))
        if vec is None:
            return []
        return [vec + 4 + 4 * j + self.u32(vec + 4 + 4 * j) for j in range(self.u32(vec))]

    def scalar(self, table: int, index: int, fmt: str, default: int) -> int:
        at = self.field(table, index)
        return default if at is None else struct.unpack_from(fmt, self.buf, at)[0]


def _tflite_precision(path: Path) -> str:
    elements: Counter = Counter()
    with _mapped(path) as buf:
        fb = _Flat(buf)
        model = fb.u32(0)
        sizes = []
        for b in fb.tables(model, 4):  # Model.buffers: Buffer.data (bytes), or Buffer.size past 2 GiB
            data = fb.ref(fb.field(b, 0))
            sizes.append(fb.u32(data) if data is not None else fb.scalar(b, 2, "<Q", 0))
        for subgraph in fb.tables(model, 2):  # Model.subgraphs
            for tensor in fb.tables(subgraph, 0):  # SubGraph.tensors
                kind = _TFLITE_TYPES.get(fb.scalar(tensor, 1, "<b", 0))  # Tensor.type
                index = fb.scalar(tensor, 2, "<I", 0)  # Tensor.buffer
                quantized = fb.field(tensor, 4) is not None  # Tensor.quantization
                if kind and 0 < index < len(sizes) and sizes[index] and (kind[0].startswith("fp") or quantized):
                    elements[kind[0]] += int(sizes[index] / kind[1])
    return _by_weights(elements["int4"] > 0, elements["int8"] > 0, elements)


_PRECISION: dict[str, Callable[[Path], str]] = {"onnx": _onnx_precision, "openvino": _ir_precision,
                                                "tflite": _tflite_precision}
