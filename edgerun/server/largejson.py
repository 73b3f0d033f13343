"""Large KServe JSON bodies decoded in pieces, so the thread decoding one never holds the GIL for long.

orjson reads a 40 MB tensor in one call of a few hundred milliseconds and keeps the GIL all along: the event
loop, though in another thread, answers nothing meanwhile. Here each input's ``data`` array that holds only
numbers (no string, no object) is cut out of the text; the rest, small, is parsed at once, and each array is
parsed and converted to its datatype about a mebibyte at a time, the GIL free between pieces.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
import orjson

from edgerun.server import codec
from edgerun.server.errors import bad_request
from edgerun.tensors import DATATYPE_TO_DTYPE, TensorSpec

PIECE = 1 << 20  # bytes of JSON text per call
_STEP = 4 << 20  # bytes searched per call
_DATA = re.compile(rb'"data"\s{0,64}:\s{0,64}\[')
_OVERLAP = 160  # longer than any match of _DATA
_SPACE = b" \t\r\n"
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[],")
_NOT_NUMBER = b",[] \t\r\n"
_HOLE = f"\x00edgerun-{os.urandom(8).hex()}-"  # stands for an array cut out; no client can guess it


def decode_request(body: bytes | bytearray, header_length: bytes | None, model_name: str,
                   specs: Mapping[str, TensorSpec]) -> codec.InferRequest:
    """``codec.decode_request``, its JSON parsed and its tensor data converted in pieces (in a worker thread)."""
    header, _ = codec.split_body(body, header_length)
    text = bytes(header) if type(header) is memoryview else header  # a JSON header before binary data: small
    return codec.decode_request(body, header_length, model_name, specs, doc=parse_request(text))


def parse_request(text: bytes | bytearray) -> Any:
    """An infer request's JSON: each input's numbers-only ``data`` becomes a flat array of its datatype."""
    arrays = find_arrays(text)
    doc, owners = _parse(text, arrays)
    for i, t in owners.items():
        start, end = arrays[i]
        datatype = t.get("datatype")
        # a datatype that is not the model's is refused before the data is looked at
        t["data"] = (_array(text, start, end, datatype, str(t.get("name")))
                     if type(datatype) is str and datatype in DATATYPE_TO_DTYPE else [])
    return doc


def _parse(text: bytes | bytearray, arrays: list[tuple[int, int]]) -> tuple[Any, dict[int, dict]]:
    """The document with ``arrays`` cut out, and the input (dict) whose ``data`` each one is."""
    doc = _loads_skeleton(text, arrays)
    owners = _owners(doc)
    if len(owners) < len(arrays):  # an array elsewhere than under inputs[i].data: keep it in the skeleton
        arrays[:] = [a for i, a in enumerate(arrays) if i in owners]
        doc = _loads_skeleton(text, arrays)
        owners = _owners(doc)
    return doc, owners


def find_arrays(text: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) of each ``"data": [...]`` array longer than a piece that holds no string nor object."""
    arrays = []
    n = len(text)
    pos = 0
    while pos < n:
        stop = min(pos + _STEP, n)
        m = _DATA.search(text, pos, min(stop + _OVERLAP, n))
        if m is None:
            pos = stop
            continue
        pos = m.end()
        if _escaped(text, m.start()):
            continue  # inside a string
        start = pos - 1
        end = _array_end(text, start)
        if end - start > PIECE:
            arrays.append((start, end))
            pos = end
    return arrays


def _escaped(text: bytes | bytearray, quote: int) -> bool:
    i = quote
    while i > 0 and text[i - 1] == 0x5C:  # backslash
        i -= 1
    return (quote - i) % 2 == 1


def _array_end(text: bytes | bytearray, start: int) -> int:
    """The end of the array at ``start`` if no '"', '{' or '}' comes before its closing bracket, else -1."""
    n = len(text)
    pos = start
    while True:
        stop = min(pos + _STEP, n)
        hits = [i for i in (text.find(b'"', pos, stop), text.find(b"{", pos, stop), text.find(b"}", pos, stop))
                if i >= 0]
        if hits:
            end = min(hits)
            break
        if stop == n:  # a JSON object cannot end inside an array
            raise bad_request(f"malformed JSON in request body: it ends inside the array that starts at byte "
                              f"{start} (truncated body?)")
        pos = stop
    # what follows the array before the next key or the end of its object: whitespace and a comma
    while end > start and text[end - 1] in _SPACE:
        end -= 1
    if end > start and text[end - 1] == 0x2C:  # comma
        end -= 1
        while end > start and text[end - 1] in _SPACE:
            end -= 1
    return end if end - start >= 2 and text[end - 1] == 0x5D else -1  # closing bracket


def _loads_skeleton(text: bytes | bytearray, arrays: list[tuple[int, int]]) -> Any:
    parts = []
    prev = 0
    for i, (start, end) in enumerate(arrays):
        parts.append(text[prev:start])
        parts.append(orjson.dumps(f"{_HOLE}{i}"))
        prev = end
    parts.append(text[prev:])
    skeleton = b"".join(parts) if arrays else text
    try:
        return orjson.loads(skeleton)
    except orjson.JSONDecodeError as exc:
        problem = exc
    if b"NaN" in skeleton or b"Infinity" in skeleton:
        try:
            return json.loads(skeleton)
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    raise bad_request(codec.json_problem(problem, f"{problem.msg} (near byte {_position(problem.pos, arrays)})"))


def _position(pos: int, arrays: list[tuple[int, int]]) -> int:
    """Where a position in the skeleton is in the text."""
    for i, (start, end) in enumerate(arrays):
        if pos <= start:
            break
        pos += (end - start) - len(orjson.dumps(f"{_HOLE}{i}"))
    return pos


def _owners(doc: Any) -> dict[int, dict]:
    owners: dict[int, dict] = {}
    inputs = doc.get("inputs") if type(doc) is dict else None
    if type(inputs) is list:
        for t in inputs:
            data = t.get("data") if type(t) is dict else None
            if type(data) is str and data.startswith(_HOLE) and data[len(_HOLE):].isdigit():
                owners[int(data[len(_HOLE):])] = t
    return owners


def _array(text: bytes | bytearray, start: int, end: int, datatype: str, name: str) -> np.ndarray:
    """The numbers of the (flat or rectangular nested) array ``text[start:end]``, flat, as ``datatype``."""
    nested = text.find(b"[", start + 1, end - 1) >= 0
    if nested:
        _check_rectangular(text, start, end, datatype, name)
    pieces = []
    pos = start + 1
    last = end - 1  # the closing bracket
    while pos < last:
        cut = text.find(b",", pos + PIECE, last)
        if cut < 0:
            cut = last
        piece = text[pos:cut]
        if nested:
            piece = piece.translate(None, b"[]")
        values = _loads_piece(piece, pos, cut, name)
        if values:
            pieces.append(codec.tensor_from_json(values, datatype, len(values), name))
        pos = cut + 1
    if not pieces:
        return np.empty(0, DATATYPE_TO_DTYPE[datatype])
    try:
        return np.concatenate(pieces)
    except (ValueError, TypeError):
        raise bad_request(f"input {name!r}: data is not a list of {datatype} values (mixed kinds of values)") from None


def _loads_piece(piece: bytes | bytearray, start: int, end: int, name: str) -> list:
    text = b"[" + piece + b"]"
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        problem = exc
    if b"NaN" in piece or b"Infinity" in piece:
        try:
            return json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    if not piece.translate(None, _NOT_NUMBER):
        return []  # empty rows only, e.g. [[], []]
    raise bad_request(f"malformed JSON in request body: {problem.msg} in the data of input {name!r} "
                      f"(between bytes {start} and {end})")


def _check_rectangular(text: bytes | bytearray, start: int, end: int, datatype: str, name: str) -> None:
    """Refuse nested lists of unequal lengths (what numpy refuses when it reads a nested list)."""
    shape = b"".join(text[p:min(p + PIECE, end)].translate(None, _NOT_STRUCTURE) for p in range(start, end, PIECE))
    depth = len(shape) - len(shape.lstrip(b"["))
    if depth > codec.MAX_DATA_DEPTH:
        raise bad_request(f"input {name!r}: 'data' is nested more than {codec.MAX_DATA_DEPTH} levels deep")
    while depth > 1:
        inner = shape[1:-1]
        close = inner.find(b"]" * (depth - 1))
        first = inner[:close + depth - 1]
        count, rest = divmod(len(inner) + 1, len(first) + 1)
        if close < 0 or rest or (first + b",") * count != inner + b",":
            raise bad_request(f"input {name!r}: data is not a list of {datatype} values (nested lists of "
                              "unequal lengths)")
        shape = first
        depth -= 1
    if shape[1:-1].strip(b","):
        raise bad_request(f"input {name!r}: data is not a list of {datatype} values (nested lists of unequal "
                          "lengths)")
