"""Each malformed gRPC infer request is refused with an InvalidInput that names what is wrong."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("google.protobuf")

from edgerun.errors import InvalidInput  # noqa: E402
from edgerun.grpc.inference_pb2 import ModelInferRequest  # noqa: E402
from edgerun.grpc.tensors import decode_request  # noqa: E402
from edgerun.tensors import TensorSpec  # noqa: E402

SPECS = {"x": TensorSpec("x", "FP32", (-1, 4)), "mask": TensorSpec("mask", "BOOL", (-1, 4)),
         "text": TensorSpec("text", "BYTES", (-1,)), "half": TensorSpec("half", "FP16", (-1, 2)),
         "small": TensorSpec("small", "INT8", (-1,))}


def _raw() -> ModelInferRequest:
    """A valid request, every input raw."""
    req = ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.inputs.add(name="mask", datatype="BOOL", shape=[1, 4])
    req.inputs.add(name="text", datatype="BYTES", shape=[2])
    req.inputs.add(name="half", datatype="FP16", shape=[1, 2])
    req.inputs.add(name="small", datatype="INT8", shape=[3])
    req.raw_input_contents.extend([np.arange(4, dtype="<f4").tobytes(), b"\x01\x00\x01\x01",
                                   struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0), b"\x00" * 4, b"\x01\x02\x03"])
    return req


def _typed() -> ModelInferRequest:
    """A valid request, every input typed (FP16 cannot be: a model without one)."""
    req = ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    req.inputs.add(name="mask", datatype="BOOL", shape=[1, 4]).contents.bool_contents.extend([1, 0, 0, 1])
    req.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"hi", b""])
    req.inputs.add(name="small", datatype="INT8", shape=[3]).contents.int_contents.extend([-128, 0, 127])
    return req


TYPED_SPECS = {k: v for k, v in SPECS.items() if k != "half"}


def _refused(req: ModelInferRequest, *fragments: str, specs=SPECS) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_request(ModelInferRequest.FromString(req.SerializeToString()), specs)
    message = str(info.value)
    for f in fragments:
        assert f in message, message
    return message


def test_the_valid_requests_decode() -> None:
    inputs, _, _ = decode_request(_raw(), SPECS)
    assert inputs["text"].tolist() == ["hi", ""] and inputs["small"].tolist() == [1, 2, 3]
    inputs, _, _ = decode_request(_typed(), TYPED_SPECS)
    assert inputs["small"].dtype == np.int8 and inputs["small"].tolist() == [-128, 0, 127]


def test_wrong_datatype() -> None:
    req = _raw()
    req.inputs[0].datatype = "FP64"
    _refused(req, "'x'", "datatype FP64, model expects FP32")


def test_unknown_datatype() -> None:
    req = _raw()
    req.inputs[0].datatype = "FLOAT"
    _refused(req, "'x'", "unknown or missing datatype 'FLOAT'")


def test_wrong_element_count_in_typed_contents() -> None:
    req = _typed()
    req.inputs[0].contents.fp32_contents.append(5.0)
    _refused(req, "'x'", "shape needs 4 elements but contents.fp32_contents has 5", specs=TYPED_SPECS)


def test_typed_data_in_the_wrong_list() -> None:
    req = _typed()
    req.inputs[0].contents.ClearField("fp32_contents")
    req.inputs[0].contents.fp64_contents.extend([1, 2, 3, 4])
    _refused(req, "'x'", "FP32 data goes in contents.fp32_contents, not contents.fp64_contents", specs=TYPED_SPECS)


def test_typed_int8_out_of_range() -> None:
    req = _typed()
    req.inputs[3].contents.int_contents[2] = 128
    _refused(req, "'small'", "out of range for INT8", specs=TYPED_SPECS)


@pytest.mark.parametrize("delta", [-1, 1], ids=["short", "long"])
def test_raw_buffer_of_the_wrong_length(delta: int) -> None:
    req = _raw()
    req.raw_input_contents[0] = b"\x00" * (16 + delta)
    _refused(req, "'x'", f"has {16 + delta} bytes but shape and FP32 need 16")


def test_raw_bytes_element_count_differs_from_shape() -> None:
    req = _raw()
    req.inputs[2].shape[0] = 3
    _refused(req, "'text'", "shape needs 3 elements but its raw_input_contents holds 2")


def test_raw_and_typed_mixed() -> None:
    req = _raw()
    req.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    _refused(req, "'x'", "typed contents", "raw_input_contents")


def test_raw_contents_for_fewer_inputs_than_given() -> None:
    req = _raw()
    del req.raw_input_contents[-1]
    _refused(req, "5 inputs but 4 raw_input_contents")


def test_unknown_input() -> None:
    req = _raw()
    req.inputs[0].name = "pixels"
    _refused(req, "no input 'pixels'", "'x'")


def test_missing_input() -> None:
    req = _raw()
    del req.inputs[1]
    del req.raw_input_contents[1]
    _refused(req, "needs input(s) ['mask']")


def test_no_inputs() -> None:
    _refused(ModelInferRequest(model_name="m"), "no inputs")


def test_input_given_twice() -> None:
    req = _raw()
    req.inputs[1].name = "x"
    req.inputs[1].datatype = "FP32"
    req.raw_input_contents[1] = b"\x00" * 16
    _refused(req, "'x' is given more than once")


def test_fp16_in_typed_contents() -> None:
    req = _typed()
    req.inputs.add(name="half", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend([0.5, 1.0])
    _refused(req, "'half'", "FP16 has no typed contents", "raw_input_contents")


@pytest.mark.parametrize("raw, message", [
    (struct.pack("<I", 2) + b"hi" + b"\x00\x00", "ends inside an element's 4-byte length"),
    (struct.pack("<I", 2) + b"hi" + struct.pack("<I", 9) + b"abc", "element of 9 bytes runs past the end"),
    (struct.pack("<I", 0xFFFFFFFF), "element of 4294967295 bytes runs past the end"),
], ids=["cut-prefix", "long-length", "huge-length"])
def test_malformed_bytes_length_prefix(raw: bytes, message: str) -> None:
    req = _raw()
    req.raw_input_contents[2] = raw
    _refused(req, "'text'", message)


def test_negative_dims() -> None:
    req = _raw()
    req.inputs[0].shape[:] = [-1, 4]
    _refused(req, "'x'", "shape must be non-negative integers, got [-1, 4]")


def test_output_requested_twice() -> None:
    req = _raw()
    req.outputs.add(name="probs")
    req.outputs.add(name="probs")
    _refused(req, "output 'probs' is requested more than once")


def test_classification_output_is_refused() -> None:
    req = _raw()
    req.outputs.add(name="probs").parameters["classification"].int64_param = 3
    _refused(req, "'probs'", "classification extension is not supported")


def test_shared_memory_input_is_refused() -> None:
    req = _raw()
    req.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    _refused(req, "'x'", "shared memory is not supported")
