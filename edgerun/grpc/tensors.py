"""KServe v2 gRPC messages to and from numpy: infer requests and responses, model metadata."""

from __future__ import annotations

from math import prod
from typing import Iterable, Mapping, Sequence

import numpy as np

from edgerun.errors import InvalidInput
from edgerun.grpc.inference_pb2 import ModelInferRequest, ModelInferResponse, ModelMetadataResponse
from edgerun.protowire import fields
from edgerun.tensors import (DATATYPE_TO_DTYPE, TensorSpec, as_text, datatype_of, object_array, pack_bytes,
                             unpack_bytes)

_LE_DTYPES = {k: v.newbyteorder("<") for k, v in DATATYPE_TO_DTYPE.items() if k not in ("BYTES", "BOOL")}
_LE_DTYPES["BOOL"] = np.dtype(np.bool_)

# The InferTensorContents list each datatype travels in, and the numpy type protobuf hands its elements in.
_CONTENTS = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", None),
}
_NARROW = ("INT8", "INT16", "UINT8", "UINT16")


_SHARED_MEMORY = "shared_memory_region"


RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents, a repeated bytes field
SPLIT_ABOVE = 64 << 10  # messages larger than this have their raw_input_contents taken in place
RawInputs = Sequence[bytes | memoryview] | None  # a request's raw_input_contents taken apart, or None


def read_infer_request(payload: bytes) -> tuple[ModelInferRequest, RawInputs]:
    """A serialized ModelInferRequest and its raw_input_contents. Above ``SPLIT_ABOVE`` bytes the contents are
    views of ``payload`` and the message is parsed without them: protobuf would copy each twice (into the message
    and again into a bytes object when read), and a large copy costs fresh pages too: about 0.3 ms on a 600 KB
    image, against 3 us for the split. DecodeError as ``FromString`` when it is not a ModelInferRequest."""
    if len(payload) > SPLIT_ABOVE:
        split = _split_raw_inputs(payload)
        if split is not None:
            rest, raw = split
            return ModelInferRequest.FromString(rest), raw
    req = ModelInferRequest.FromString(payload)
    return req, req.raw_input_contents


def _split_raw_inputs(payload: bytes) -> tuple[bytes, list[memoryview]] | None:
    """(the message's other fields, its raw_input_contents as views): protobuf's wire format is a sequence of
    fields, so the message without field 7 is those fields' bytes joined. None when a field is not framed as the
    wire format says (the ordinary parse then refuses the message)."""
    view = memoryview(payload)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    kept = 0
    try:
        for number, at, value, end in fields(payload, 0, len(payload)):
            if number == RAW_INPUT_CONTENTS and isinstance(value, tuple):
                rest.append(view[kept:at])
                raw.append(view[value[0]:value[1]])
                kept = end
    except (IndexError, ValueError):
        return None  # cut, overlong, a group, or not protobuf at all
    rest.append(view[kept:])
    return b"".join(rest), raw


def decode_request(req: ModelInferRequest, specs: Mapping[str, TensorSpec], raw: RawInputs = None
                   ) -> tuple[dict[str, np.ndarray], list[str] | None, str]:
    """The input arrays, the requested output names (None: all) and the id of a request, checked against a
    model's inputs; every error is an InvalidInput naming the input. ``raw``: its raw_input_contents, when they
    were taken apart from the message (``read_infer_request``)."""
    if raw is None:
        raw = req.raw_input_contents
    if len(raw) == 1 and len(specs) == 1:
        arrays = _one_raw_input(req, raw[0], specs)  # what tritonclient and edgerun.Client send a one-input model
        if arrays is not None:
            return arrays, _wanted_outputs(req), req.id
    model = req.model_name
    if not req.inputs:
        raise InvalidInput(f"the request has no inputs; model {model!r} takes {sorted(specs)}")
    for t in req.inputs:
        if _SHARED_MEMORY in t.parameters:
            raise InvalidInput(f"input {t.name!r}: shared memory is not supported; send the data in the request")
        if raw and t.HasField("contents"):
            raise InvalidInput(f"input {t.name!r} has typed contents but the request also has raw_input_contents; "
                               "send every input raw or every input typed")
    if raw and len(raw) != len(req.inputs):
        raise InvalidInput(f"the request has {len(req.inputs)} inputs but {len(raw)} raw_input_contents; "
                           "give one per input, in the order of the inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        name = t.name
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given more than once")
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"model {model!r} has no input {name!r}; its inputs are {sorted(specs)}")
        datatype = t.datatype
        if datatype != spec.datatype:
            if datatype not in DATATYPE_TO_DTYPE:
                raise InvalidInput(f"input {name!r}: unknown or missing datatype {datatype!r}; expected "
                                   f"{spec.datatype}")
            raise InvalidInput(f"input {name!r}: datatype {datatype}, model expects {spec.datatype}")
        shape = list(t.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input {name!r}: shape must be non-negative integers, got {shape}")
        count = prod(shape)
        if raw:
            arr = _from_raw(raw[i], datatype, count, name)
        else:
            arr = _from_contents(t, datatype, count, name)
        arrays[name] = arr.reshape(shape)
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InvalidInput(f"model {model!r} needs input(s) {sorted(missing)}; the request has {sorted(arrays)}")
    return arrays, _wanted_outputs(req), req.id


def _one_raw_input(req: ModelInferRequest, buf: bytes | memoryview, specs: Mapping[str, TensorSpec]
                   ) -> dict[str, np.ndarray] | None:
    """The input of a request holding one raw input for a one-input model, when nothing in it needs a closer
    look (None: decode_request's checks say what is wrong, or take what is unusual)."""
    inputs = req.inputs
    if len(inputs) != 1:
        return None
    t = inputs[0]
    name, datatype = t.name, t.datatype
    spec = specs.get(name)
    if spec is None or datatype != spec.datatype or datatype == "BYTES" or t.parameters or t.HasField("contents"):
        return None
    shape = tuple(t.shape[:])  # (a slice is a list at once; iterating the field goes element by element)
    if shape and min(shape) < 0:
        return None
    dtype = _LE_DTYPES[datatype]
    if len(buf) != prod(shape) * dtype.itemsize:
        return None
    return {name: np.ndarray(shape, dtype, buf)}  # a view of buf, as np.frombuffer(...).reshape(...) in one call


def _wanted_outputs(req: ModelInferRequest) -> list[str] | None:
    outputs = req.outputs
    if not outputs:
        return None
    if len(outputs) == 1:  # the common case, without the loop's iterator over the field
        only = outputs[0]
        if not only.parameters:
            return [only.name]
    wanted: list[str] = []
    for o in outputs:
        if o.name in wanted:
            raise InvalidInput(f"output {o.name!r} is requested more than once")
        if "classification" in o.parameters:
            raise InvalidInput(f"output {o.name!r}: the classification extension is not supported; ask for the "
                               "raw output and take the top classes on the client")
        if _SHARED_MEMORY in o.parameters:
            raise InvalidInput(f"output {o.name!r}: shared memory is not supported; the output comes back in the "
                               "response")
        wanted.append(o.name)
    return wanted or None


def _from_raw(buf: bytes | memoryview, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        items = unpack_bytes(buf, name, "raw_input_contents")
        if len(items) != count:
            raise InvalidInput(f"input {name!r}: shape needs {count} elements but its raw_input_contents "
                               f"holds {len(items)}")
        return items
    dtype = _LE_DTYPES[datatype]
    if len(buf) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: raw_input_contents has {len(buf)} bytes but shape and {datatype} "
                           f"need {count * dtype.itemsize}")
    return np.frombuffer(buf, dtype=dtype)


def _from_contents(t: ModelInferRequest.InferInputTensor, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == "FP16":
        if count == 0:
            return np.empty(0, np.float16)
        raise InvalidInput(f"input {name!r}: FP16 has no typed contents; send it in raw_input_contents")
    field, wire = _CONTENTS[datatype]
    c = t.contents
    for fd, _ in c.ListFields():
        if fd.name != field:
            raise InvalidInput(f"input {name!r}: {datatype} data goes in contents.{field}, not contents.{fd.name}")
    values = getattr(c, field)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape needs {count} elements but contents.{field} has {len(values)}")
    if datatype == "BYTES":
        return object_array([as_text(b) for b in values])
    arr = np.fromiter(values, dtype=wire, count=len(values))
    if datatype in _NARROW and arr.size:
        info = np.iinfo(DATATYPE_TO_DTYPE[datatype])
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"input {name!r}: value out of range for {datatype}")
        return arr.astype(DATATYPE_TO_DTYPE[datatype])
    return arr


def encode_response(model_name: str, model_version: int | str, id: str, outputs: Mapping[str, np.ndarray],
                    wanted: Iterable[str], out_types: Mapping[str, str]) -> ModelInferResponse:
    """A response carrying the ``wanted`` outputs, in that order, in raw_output_contents."""
    resp = ModelInferResponse(model_name=model_name, model_version=str(model_version), id=id)
    raw = resp.raw_output_contents
    for name in wanted:
        arr = outputs[name]
        datatype = out_types.get(name) or datatype_of(arr.dtype)
        resp.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        raw.append(to_raw(arr, datatype))
    return resp


def to_raw(arr: np.ndarray, datatype: str) -> bytes:
    """The raw contents of an array as ``datatype``: little-endian row-major, BYTES length-prefixed."""
    if datatype == "BYTES":
        return pack_bytes(arr)
    dtype = _LE_DTYPES[datatype]
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr.tobytes()


def model_metadata(name: str, versions: Iterable[int | str], platform: str, inputs: Iterable[TensorSpec],
                   outputs: Iterable[TensorSpec]) -> ModelMetadataResponse:
    """The ModelMetadata answer for a model."""
    resp = ModelMetadataResponse(name=name, versions=[str(v) for v in versions], platform=platform)
    for spec in inputs:
        resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    for spec in outputs:
        resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    return resp


def encode_request(model: str, version: int | None, inputs: Mapping[str, np.ndarray],
                   outputs: Iterable[str] | None = None) -> ModelInferRequest:
    """A request carrying ``inputs`` in raw_input_contents (what ``edgerun.Client`` sends over gRPC)."""
    req = ModelInferRequest(model_name=model, model_version=str(version) if version is not None else "")
    for name, arr in inputs.items():
        datatype = datatype_of(arr.dtype)
        req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        req.raw_input_contents.append(to_raw(arr, datatype))
    for name in outputs or ():
        req.outputs.add(name=name)
    return req


def decode_response(resp: ModelInferResponse) -> dict[str, np.ndarray]:
    """The output arrays of a response, raw or typed."""
    out = {}
    raw = resp.raw_output_contents
    for i, t in enumerate(resp.outputs):
        shape = list(t.shape)
        count = prod(shape)
        arr = _from_raw(raw[i], t.datatype, count, t.name) if raw else _from_contents(t, t.datatype, count, t.name)
        out[t.name] = arr.reshape(shape)
    return out
