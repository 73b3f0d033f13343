"""Tensor metadata and the mapping between KServe v2 datatypes and numpy dtypes."""

from __future__ import annotations

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
