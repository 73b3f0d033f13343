"""Sample tensors of every KServe v2 datatype, and what a decoder must make of them."""

from __future__ import annotations

import numpy as np

from edgerun.tensors import TensorSpec

# Each datatype's typed-contents list, as the protocol documents it (INT8/16/32 share int_contents, etc.).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _ints(dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, info.max - 1, info.min + 1]], dtype=dtype)


SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    **{name: _ints(dt) for name, dt in (("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
                                         ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16),
                                         ("INT32", np.int32), ("INT64", np.int64))},
    "FP16": np.array([[0.5, -2.25, 65504.0], [np.inf, -0.0, 1e-4]], dtype=np.float16),
    "FP32": np.array([[1.5, -0.0, 3.4e38], [np.nan, -np.inf, 1e-30]], dtype=np.float32),
    "FP64": np.array([[1.5, -1e300, 2.0 ** -1070], [np.nan, np.inf, 0.1]], dtype=np.float64),
    "BYTES": np.array([[b"abc", "h\u00e9llo".encode(), b"\xff\xfe\x00"], [b"", b"x" * 300, "\u2603".encode()]],
                      dtype=object),
}
DATATYPES = list(SAMPLES)


def name_of(datatype: str) -> str:
    return f"in_{datatype.lower()}"


def spec_of(datatype: str) -> TensorSpec:
    return TensorSpec(name_of(datatype), datatype, (-1, 3))


def decoded(datatype: str, arr: np.ndarray) -> np.ndarray:
    """What decoding ``arr`` must give: BYTES elements that are UTF-8 become str, like the HTTP API's."""
    if datatype != "BYTES":
        return arr
    out = np.empty(arr.shape, dtype=object)
    for idx, b in np.ndenumerate(arr):
        try:
            out[idx] = b.decode("utf-8")
        except UnicodeDecodeError:
            out[idx] = b
    return out


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal shape, dtype and elements (NaN equals NaN; BYTES compared element by element, str vs bytes kept)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype == object:
        assert [(type(x), x) for x in got.reshape(-1)] == [(type(x), x) for x in want.reshape(-1)]
    else:
        np.testing.assert_array_equal(got, want)
        if want.dtype.kind == "f":  # -0.0 stays -0.0
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
