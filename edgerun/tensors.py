"""Tensor metadata and the mapping between KServe v2 datatypes and numpy dtypes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
DTYPE_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_DTYPE.items()}


def datatype_of(dtype: np.dtype | type) -> str:
    """The KServe v2 datatype name of a numpy dtype (bytes and str arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return DTYPE_TO_DATATYPE[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe v2 datatype") from None


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of a KServe v2 datatype name."""
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise ValueError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_TO_DTYPE)}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape of a model input or output; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return dtype_of(self.datatype)

    def shape_matches(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape fits this spec."""
        if len(shape) != len(self.shape):
            return False
        return all(want < 0 or want == got for want, got in zip(self.shape, shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=str(d["name"]), datatype=str(d["datatype"]), shape=tuple(int(x) for x in d["shape"]))


_LENGTH = struct.Struct("<I")


def pack_bytes(arr: np.ndarray) -> bytes:
    """A BYTES tensor as the protocol sends it raw: each element a 4-byte little-endian length, then its bytes
    (``str`` elements as UTF-8)."""
    parts = []
    for x in arr.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode("utf-8")
        parts.append(_LENGTH.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def unpack_bytes(buf: bytes | memoryview, name: str, where: str) -> np.ndarray:
    """The elements of a raw BYTES tensor (``pack_bytes``'s encoding), flat; those that are UTF-8 text as ``str``,
    others as ``bytes``. InvalidInput naming the input and ``where`` its data came from when the encoding is cut."""
    from edgerun.errors import InvalidInput

    items = []
    pos, end = 0, len(buf)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: BYTES {where} ends inside an element's 4-byte length")
        (n,) = _LENGTH.unpack_from(buf, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(f"input {name!r}: BYTES element of {n} bytes runs past the end of its {where} "
                               f"({end - pos} bytes left)")
        items.append(as_text(bytes(buf[pos:pos + n])))
        pos += n
    return object_array(items)


def as_text(b: bytes) -> str | bytes:
    """A BYTES element that is UTF-8 as ``str`` (what ONNX string tensors hold), else the bytes as they are."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def object_array(items: list) -> np.ndarray:
    """A flat object array of ``items`` (numpy would make a 2-D array of equal-length bytes)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
