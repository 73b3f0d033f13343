"""KServe v2 inference requests and responses: JSON tensors and the binary tensor data extension."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from math import prod
from typing import Any, Iterable, Mapping

import numpy as np
import orjson

from edgerun.server.errors import bad_request
from edgerun.tensors import DATATYPE_TO_DTYPE, TensorSpec, datatype_of, pack_bytes, unpack_bytes

HEADER_LENGTH = "inference-header-content-length"
_LE_DTYPES = {k: v.newbyteorder("<") for k, v in DATATYPE_TO_DTYPE.items() if k not in ("BYTES", "BOOL")}
_LE_DTYPES["BOOL"] = np.dtype(np.bool_)
_INT_KINDS = "iu"
_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY
# a float too large for FP32/FP16 is refused below with a 400; numpy's warning about it would only fill the log
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning, __name__)
MAX_JSON_DEPTH = 1024  # orjson's limit
MAX_DATA_DEPTH = 64  # numpy's limit on dimensions


@dataclass
class InferRequest:
    """A decoded request: input arrays, and which outputs to return and how."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] | None  # (name, binary) in the order asked, or None for all
    binary_default: bool

    @property
    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [name for name, _ in self.outputs]

    def wanted(self, datatypes: Mapping[str, str]) -> list[tuple[str, bool]]:
        """(name, binary) per output to answer: those asked for, else all of the model's in its order."""
        return self.outputs if self.outputs is not None else [(o, self.binary_default) for o in datatypes]


def parse_json(text: bytes | bytearray | memoryview) -> Any:
    """The JSON document; NaN/Infinity literals (which Python's json writes) are accepted.

    A malformed document is parsed once: Python's json (slower) reads it again only when it holds a literal
    that orjson refuses.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        problem = exc
    raw = bytes(text)
    if b"NaN" in raw or b"Infinity" in raw:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    raise bad_request(json_problem(problem))


def json_problem(exc: orjson.JSONDecodeError, where: str = "") -> str:
    """What is wrong with a document orjson refused, for a 400."""
    if "depth" in exc.msg or "recursion" in exc.msg:
        return f"request body JSON is nested more than {MAX_JSON_DEPTH} levels deep"
    return f"malformed JSON in request body: {where or exc}"


def split_body(body: bytes | bytearray, header_length: bytes | None
               ) -> tuple[bytes | bytearray | memoryview, memoryview]:
    """Split a body into its JSON header and binary tail per ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise bad_request(f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}") from None
    if n < 0 or n > len(body):
        raise bad_request(f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes "
                          "(truncated body?)")
    view = memoryview(body)
    return view[:n], view[n:]


def decode_request(body: bytes | bytearray, header_length: bytes | None, model_name: str,
                   specs: Mapping[str, TensorSpec], doc: Any = None) -> InferRequest:
    """Decode and check an infer request against a model's inputs (names, datatypes, element counts).

    ``doc``: the JSON part when already parsed (see ``largejson``).
    """
    header, binary = split_body(body, header_length)
    if doc is None:
        doc = parse_json(header)
    if type(doc) is not dict:
        raise bad_request("request body must be a JSON object with an 'inputs' list")
    req_id = doc.get("id")
    if req_id is not None and type(req_id) is not str:
        raise bad_request("'id' must be a string")
    params = doc.get("parameters")
    if params is not None and type(params) is not dict:
        raise bad_request("'parameters' must be an object")
    binary_default = _flag(params, "binary_data_output", False, "parameters") if params else False
    inputs = doc.get("inputs")
    if type(inputs) is not list or not inputs:
        raise bad_request("request needs 'inputs': a non-empty list of {name, shape, datatype, data} tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(inputs):
        if type(t) is not dict:
            raise bad_request(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = t.get("name")
        if type(name) is not str:
            raise bad_request(f"inputs[{i}] needs a string 'name'")
        if name in arrays:
            raise bad_request(f"input {name!r} is given more than once")
        spec = specs.get(name)
        if spec is None:
            raise bad_request(f"model {model_name!r} has no input {name!r}; its inputs are {sorted(specs)}")
        datatype = t.get("datatype")
        if datatype != spec.datatype:
            if type(datatype) is not str or datatype not in DATATYPE_TO_DTYPE:
                raise bad_request(f"input {name!r}: unknown or missing datatype {datatype!r}; expected "
                                  f"{spec.datatype}")
            raise bad_request(f"input {name!r}: datatype {datatype}, model expects {spec.datatype}")
        shape = t.get("shape")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise bad_request(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
        count = prod(shape)
        tparams = t.get("parameters")
        size = tparams.get("binary_data_size") if type(tparams) is dict else None
        if size is not None:
            if type(size) is not int or size < 0:
                raise bad_request(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise bad_request(f"input {name!r}: binary_data_size is {size} but only {len(binary) - offset} "
                                  "bytes of binary data remain in the body (truncated body?)")
            arr = tensor_from_binary(binary[offset:offset + size], datatype, count, name)
            offset += size
        else:
            if "data" not in t:
                raise bad_request(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            arr = tensor_from_json(t["data"], datatype, count, name)
        arrays[name] = arr.reshape(shape)
    if offset != len(binary):
        raise bad_request(f"the body has {len(binary)} bytes of binary data but the inputs' binary_data_size "
                          f"values add up to {offset}")
    return InferRequest(req_id, arrays, _wanted_outputs(doc.get("outputs"), binary_default), binary_default)


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if type(value) is not bool:
        raise bad_request(f"{where}.{key} must be true or false, got {value!r:.40}")
    return value


def _wanted_outputs(outputs: Any, binary_default: bool) -> list[tuple[str, bool]] | None:
    """(name, binary) per requested output; None (all outputs) when 'outputs' is absent or empty."""
    if outputs is None:
        return None
    if type(outputs) is not list:
        raise bad_request("'outputs' must be a list of {name, parameters?} objects")
    wanted = []
    seen = set()
    for i, o in enumerate(outputs):
        if type(o) is not dict or type(o.get("name")) is not str:
            raise bad_request(f"outputs[{i}] needs a string 'name'")
        name = o["name"]
        if name in seen:
            raise bad_request(f"output {name!r} is requested more than once")
        seen.add(name)
        p = o.get("parameters")
        binary = binary_default
        if p is not None:
            if type(p) is not dict:
                raise bad_request(f"outputs[{i}].parameters must be an object")
            if "classification" in p:
                raise bad_request(f"output {name!r}: the classification extension is not supported; ask for the "
                                  "raw output and take the top classes on the client")
            binary = _flag(p, "binary_data", binary_default, f"outputs[{i}].parameters")
        wanted.append((name, binary))
    return wanted or None


def tensor_from_json(data: Any, datatype: str, count: int, name: str) -> np.ndarray:
    """A flat or nested JSON list as an array of ``datatype`` with ``count`` elements.

    ``data`` may also be the flat array ``largejson`` made of it, piece by piece, with this function.
    """
    if type(data) is not list:
        if type(data) is not np.ndarray:
            raise bad_request(f"input {name!r}: 'data' must be a list")
        if data.size != count:
            raise bad_request(f"input {name!r}: shape needs {count} elements but 'data' has {data.size}")
        return data
    dtype = DATATYPE_TO_DTYPE[datatype]
    try:
        if datatype == "BYTES":
            flat = _flatten(data)
            if not all(type(x) is str for x in flat):
                raise bad_request(f"input {name!r}: BYTES data must be strings")
            arr = np.empty(len(flat), dtype=object)
            arr[:] = flat
        elif dtype.kind == "f":
            # let numpy find the element type first: asked for floats directly, it would parse "1.5" and true
            raw = np.array(data)
            kind = raw.dtype.kind
            if kind not in "fiu":
                if kind == "O" and None in _flatten(data):
                    raise bad_request(f"input {name!r}: null in {datatype} data (write NaN for not-a-number)")
                raise bad_request(f"input {name!r}: data is not a list of {datatype} values (found "
                                  f"{'strings' if kind in 'US' else 'true/false' if kind == 'b' else 'non-numbers'})")
            arr = raw.astype(dtype, copy=False)
            if arr.dtype != raw.dtype and not np.isfinite(arr).all():
                big = np.isinf(arr) & np.isfinite(raw)  # finite here, infinite as the model's type: out of range
                if big.any():
                    raise bad_request(f"input {name!r}: {float(raw[big].flat[0]):g} is out of range for {datatype} "
                                      f"(largest {float(np.finfo(dtype).max):g})")
        else:
            raw = np.array(data)
            if raw.dtype.kind in "fO" and datatype != "BOOL":
                flat = _flatten(data)
                if all(type(x) is int for x in flat):  # big 64-bit integers: numpy guessed float64 or object
                    raw = np.array(flat, dtype=dtype)
            arr = _integers(raw, dtype, datatype, name)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_request(f"input {name!r}: data is not a list of {datatype} values ({exc})") from None
    if arr.size != count:
        raise bad_request(f"input {name!r}: shape needs {count} elements but 'data' has {arr.size}")
    return arr.reshape(-1)


def _integers(raw: np.ndarray, dtype: np.dtype, datatype: str, name: str) -> np.ndarray:
    kind = raw.dtype.kind
    if datatype == "BOOL":
        if kind != "b" and raw.size:
            raise bad_request(f"input {name!r}: BOOL data must be true/false")
        return raw.astype(dtype)
    if kind == "f":
        if not np.isfinite(raw).all():
            raise bad_request(f"input {name!r}: NaN or Inf in {datatype} data")
        if (raw != np.trunc(raw)).any():
            raise bad_request(f"input {name!r}: non-integer value in {datatype} data")
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise bad_request(f"input {name!r}: value out of range for {datatype}")
        return raw.astype(dtype)
    if kind in _INT_KINDS or kind == "b":
        info = np.iinfo(dtype)
        if raw.size and kind != "b" and (int(raw.min()) < info.min or int(raw.max()) > info.max):
            raise bad_request(f"input {name!r}: value out of range for {datatype}")
        return raw.astype(dtype)
    raise bad_request(f"input {name!r}: {datatype} data must be integers")


def _flatten(data: list, depth: int = 1) -> list:
    if not data or type(data[0]) is not list:
        return data
    if depth >= MAX_DATA_DEPTH:
        raise ValueError(f"nested more than {MAX_DATA_DEPTH} levels deep")
    out: list = []
    for x in data:
        if type(x) is not list:
            raise ValueError("ragged nested list")
        out.extend(_flatten(x, depth + 1))
    return out


def tensor_from_binary(buf: memoryview, datatype: str, count: int, name: str) -> np.ndarray:
    """Raw little-endian bytes (BYTES: 4-byte length + bytes per element) as a flat array."""
    if datatype == "BYTES":
        items = unpack_bytes(buf, name, "binary data")
        if len(items) != count:
            raise bad_request(f"input {name!r}: shape needs {count} elements but the binary data holds {len(items)}")
        return items
    dtype = _LE_DTYPES[datatype]
    if len(buf) != count * dtype.itemsize:
        raise bad_request(f"input {name!r}: binary_data_size is {len(buf)} bytes but shape and {datatype} need "
                          f"{count * dtype.itemsize}")
    return np.frombuffer(buf, dtype=dtype)


def tensor_to_binary(arr: np.ndarray) -> bytes:
    """The binary tensor data encoding of an array."""
    if arr.dtype.kind in "OSU":
        return pack_bytes(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def _dumps(doc: dict, float_arrays: list[np.ndarray]) -> bytes:
    """orjson, or where a float tensor holds NaN/Inf, Python's json writing them as NaN/Infinity (not null).

    orjson writes NaN/Inf as ``null``, so the arrays are checked only when ``null`` appears in its output
    (rare: a NaN, or an id or name holding the word), keeping the check off the common path.
    """
    out = orjson.dumps(doc, option=_DUMPS_OPTS)
    if not float_arrays or b"null" not in out or all(np.isfinite(a).all() for a in float_arrays):
        return out
    return json.dumps(doc, allow_nan=True, separators=(",", ":"), default=lambda a: a.tolist()).encode()


def _json_data(arr: np.ndarray) -> Any:
    kind = arr.dtype.kind
    if kind in "OSU":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    if arr.dtype == np.float16:
        return arr.astype(np.float32).reshape(-1)
    return np.ascontiguousarray(arr).reshape(-1)


def encode_response(model_name: str, model_version: int, req_id: str | None, results: Mapping[str, np.ndarray],
                    wanted: Iterable[tuple[str, bool]], datatypes: Mapping[str, str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    outs = []
    chunks = []
    floats: list[np.ndarray] = []
    for name, binary in wanted:
        arr = results[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatypes.get(name) or datatype_of(arr.dtype),
                                 "shape": list(arr.shape)}
        if binary:
            b = tensor_to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(b)}
            chunks.append(b)
        else:
            entry["data"] = _json_data(arr)
            if arr.dtype.kind == "f":
                floats.append(arr)
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if req_id is not None:
        doc["id"] = req_id
    doc["outputs"] = outs
    header = _dumps(doc, floats)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_request(inputs: Mapping[str, np.ndarray], *, binary: bool, outputs: Iterable[str] | None = None,
                   binary_output: bool | None = None, req_id: str | None = None) -> tuple[bytes, int | None]:
    """A request body for ``inputs`` (used by edgerun.Client); returns the header length when binary."""
    tensors = []
    chunks = []
    floats: list[np.ndarray] = []
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype_of(arr.dtype)}
        if binary:
            b = tensor_to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(b)}
            chunks.append(b)
        else:
            entry["data"] = _json_data(arr)
            if arr.dtype.kind == "f":
                floats.append(arr)
        tensors.append(entry)
    bin_out = binary if binary_output is None else binary_output
    doc: dict[str, Any] = {"inputs": tensors, "parameters": {"binary_data_output": bin_out}}
    if req_id is not None:
        doc["id"] = req_id
    if outputs is not None:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": bin_out}} for o in outputs]
    header = _dumps(doc, floats)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def decode_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A response's JSON document and its outputs as arrays (used by edgerun.Client)."""
    header, binary = split_body(body, None if header_length is None else str(header_length).encode())
    doc = parse_json(header)
    out = {}
    offset = 0
    for t in doc.get("outputs", []):
        shape = t["shape"]
        count = prod(shape)
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = tensor_from_binary(binary[offset:offset + size], t["datatype"], count, t["name"])
            offset += size
            if arr.dtype.kind != "O":
                arr = arr.copy()  # own the memory rather than pin the response body
        elif t["datatype"] == "BYTES":
            arr = np.array(_flatten(t["data"]), dtype=object)
        else:
            arr = np.array(t["data"], dtype=DATATYPE_TO_DTYPE[t["datatype"]])
        out[t["name"]] = arr.reshape(shape)
    return doc, out
