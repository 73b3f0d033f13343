"""Protobuf's wire format read by hand, where a full parse would cost more than what is wanted from the message:
the operators and weight types of a bare ONNX file (``edgerun.bare``), the raw inputs of a large gRPC request
(``edgerun.grpc.tensors``)."""

from __future__ import annotations

import mmap
from typing import Iterator, Union

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]
Value = Union[int, tuple[int, int]]


def varint(buf: Buffer, i: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the position after it (IndexError when cut, ValueError when over 10 bytes)."""
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError(f"a varint longer than 10 bytes ends past byte {i}")


def fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, Value, int]]:
    """(field number, where its key starts, value, where it ends) of each varint and length-delimited field of the
    message in ``buf[start:end]``: a varint's int, a length-delimited field's (start, end); fixed-width fields are
    passed over. ValueError for a field that runs past ``end`` or a wire type other than 0, 1, 2 and 5 (groups)."""
    i = start
    while i < end:
        at = i
        key, i = varint(buf, i)
        wire = key & 7
        value: Value | None
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            value = (i, i + n)
            i += n
        elif wire in (1, 5):
            value = None
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {at}")
        if i > end:
            raise ValueError(f"field {key >> 3} at byte {at} runs past the end of its message ({end})")
        if value is not None:
            yield key >> 3, at, value, i
