"""Tensors between Triton's gRPC client and edgerun's codec: requests tritonclient builds decode to the arrays it
was given, raw and typed, for every datatype; responses edgerun encodes read back as the same arrays."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc.aio")
pytest.importorskip("tritonclient.grpc")

from grpc_helpers import CONTENTS_FIELD, DATATYPES, SAMPLES, assert_same, decoded, name_of, spec_of  # noqa: E402
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, service_pb2  # noqa: E402
from tritonclient.grpc._utils import _get_inference_request  # noqa: E402

from edgerun.grpc import inference_pb2  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

from edgerun.grpc.tensors import (SPLIT_ABOVE, decode_request, encode_response, model_metadata,  # noqa: E402
                                  read_infer_request)
from edgerun.tensors import TensorSpec  # noqa: E402

TYPED = [d for d in DATATYPES if d != "FP16"]


def _triton_request(arrays: dict[str, tuple[str, np.ndarray]], outputs=(), request_id="") -> bytes:
    """What tritonclient.grpc's InferenceServerClient.infer sends: raw_input_contents for every input."""
    inputs = []
    for name, (datatype, arr) in arrays.items():
        i = InferInput(name, list(arr.shape), datatype)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    req = _get_inference_request(model_name="m", inputs=inputs, model_version="", request_id=request_id,
                                 outputs=[InferRequestedOutput(o) for o in outputs] or None, sequence_id=0,
                                 sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                 parameters=None)
    return req.SerializeToString()


def _typed_request(arrays: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """A request with typed contents, built with Triton's own message classes."""
    req = service_pb2.ModelInferRequest(model_name="m")
    for name, (datatype, arr) in arrays.items():
        t = req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        getattr(t.contents, CONTENTS_FIELD[datatype]).extend(arr.reshape(-1).tolist())
    return req.SerializeToString()


def _decode(wire: bytes, specs: list[TensorSpec]):
    return decode_request(inference_pb2.ModelInferRequest.FromString(wire), {s.name: s for s in specs})


@pytest.mark.parametrize("datatype", DATATYPES)
def test_raw_request_from_tritonclient_decodes_to_its_arrays(datatype: str) -> None:
    arr = SAMPLES[datatype]
    inputs, outputs, req_id = _decode(_triton_request({name_of(datatype): (datatype, arr)}), [spec_of(datatype)])
    assert list(inputs) == [name_of(datatype)] and outputs is None and req_id == ""
    assert_same(inputs[name_of(datatype)], decoded(datatype, arr))


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_request_decodes_to_its_arrays(datatype: str) -> None:
    arr = SAMPLES[datatype]
    inputs, _, _ = _decode(_typed_request({name_of(datatype): (datatype, arr)}), [spec_of(datatype)])
    assert_same(inputs[name_of(datatype)], decoded(datatype, arr))


@pytest.mark.parametrize("build", [_triton_request, _typed_request])
def test_every_datatype_in_one_request_keeps_each_input_its_own_data(build) -> None:
    kinds = DATATYPES if build is _triton_request else TYPED
    arrays = {name_of(d): (d, SAMPLES[d]) for d in reversed(kinds)}
    inputs, _, _ = _decode(build(arrays), [spec_of(d) for d in kinds])
    assert list(inputs) == list(arrays)
    for name, (datatype, arr) in arrays.items():
        assert_same(inputs[name], decoded(datatype, arr))


@pytest.mark.parametrize("build", [_triton_request, _typed_request])
@pytest.mark.parametrize("shape", [(), (0, 3), (1, 1, 1, 1)])
def test_scalar_and_empty_tensors_keep_their_shape(build, shape) -> None:
    specs = [TensorSpec("f", "FP32", shape), TensorSpec("s", "BYTES", shape)]
    count = int(np.prod(shape))
    f = np.arange(count, dtype=np.float32).reshape(shape)
    s = np.array([b"t%d" % i for i in range(count)], dtype=object).reshape(shape)
    inputs, _, _ = _decode(build({"f": ("FP32", f), "s": ("BYTES", s)}), specs)
    assert_same(inputs["f"], f)
    assert_same(inputs["s"], decoded("BYTES", s))


@pytest.mark.parametrize("shape", [(), (0, 3), (2, 5)])
def test_one_raw_input_keeps_its_shape(shape) -> None:
    f = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    inputs, outputs, _ = _decode(_triton_request({"f": ("FP32", f)}), [TensorSpec("f", "FP32", shape)])
    assert outputs is None
    assert_same(inputs["f"], f)


def test_requested_outputs_and_id_come_back_in_order() -> None:
    wire = _triton_request({"in_fp32": ("FP32", SAMPLES["FP32"])}, outputs=["probs", "label"], request_id="r-9")
    _, outputs, req_id = _decode(wire, [spec_of("FP32")])
    assert (outputs, req_id) == (["probs", "label"], "r-9")


@pytest.mark.parametrize("datatype", DATATYPES)
def test_response_reads_back_in_tritonclient_as_the_same_array(datatype: str) -> None:
    arr = SAMPLES[datatype]
    resp = encode_response("m", 2, "r-1", {"y": arr}, ["y"], {"y": datatype})
    result = InferResult(service_pb2.ModelInferResponse.FromString(resp.SerializeToString()))
    got = result.as_numpy("y")
    assert_same(got, arr)
    out = result.get_response()
    assert (out.model_name, out.model_version, out.id, out.outputs[0].datatype, list(out.outputs[0].shape)) == \
        ("m", "2", "r-1", datatype, [2, 3])


def test_response_carries_the_wanted_outputs_in_their_order() -> None:
    results = {"a": SAMPLES["INT64"], "b": np.array(["caf\u00e9", "x"], dtype=object), "c": SAMPLES["FP16"],
               "unwanted": SAMPLES["BOOL"]}
    resp = encode_response("m", 1, "", results, ["c", "b", "a"], {"a": "INT64", "b": "BYTES", "c": "FP16"})
    result = InferResult(service_pb2.ModelInferResponse.FromString(resp.SerializeToString()))
    assert [o.name for o in result.get_response().outputs] == ["c", "b", "a"]
    assert_same(result.as_numpy("c"), SAMPLES["FP16"])
    assert_same(result.as_numpy("a"), SAMPLES["INT64"])
    assert result.as_numpy("b").tolist() == ["caf\u00e9".encode(), b"x"]  # str outputs go out as UTF-8
    assert result.as_numpy("unwanted") is None


def test_response_writes_the_declared_datatype_whatever_the_array_dtype() -> None:
    big_endian = np.array([1.5, -2.0], dtype=">f4")
    resp = encode_response("m", 1, "", {"y": big_endian}, ["y"], {"y": "FP32"})
    got = InferResult(service_pb2.ModelInferResponse.FromString(resp.SerializeToString())).as_numpy("y")
    assert got.tolist() == [1.5, -2.0]


def test_model_metadata_reads_in_tritonclient() -> None:
    from google.protobuf.json_format import MessageToDict

    meta = model_metadata("digits", [1, 2], "onnxruntime_onnx", [TensorSpec("x", "FP32", (-1, 64))],
                          [TensorSpec("probs", "FP32", (-1, 10)), TensorSpec("label", "INT64", (-1,))])
    theirs = service_pb2.ModelMetadataResponse.FromString(meta.SerializeToString())
    assert MessageToDict(theirs, preserving_proto_field_name=True) == {
        "name": "digits", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": ["-1", "10"]},
                    {"name": "label", "datatype": "INT64", "shape": ["-1"]}]}


def _large_request() -> tuple[bytes, dict[str, np.ndarray]]:
    """Three raw inputs, 600 KB of them, with the other fields before, between and after their contents (a
    producer may write protobuf fields in any order)."""
    rng = np.random.default_rng(7)
    arrays = {"image": rng.random((1, 3, 224, 224), dtype=np.float32), "scale": np.array([[0.5]], np.float32),
              "ids": rng.integers(0, 1 << 40, (2, 4), dtype=np.int64)}
    parts = [inference_pb2.ModelInferRequest(model_name="m", id="req-7").SerializeToString()]
    for name, arr in arrays.items():
        datatype = "FP32" if arr.dtype == np.float32 else "INT64"
        parts.append(inference_pb2.ModelInferRequest(raw_input_contents=[arr.tobytes()]).SerializeToString())
        parts.append(inference_pb2.ModelInferRequest(inputs=[inference_pb2.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=arr.shape)]).SerializeToString())
    parts.append(inference_pb2.ModelInferRequest(outputs=[
        inference_pb2.ModelInferRequest.InferRequestedOutputTensor(name="out")]).SerializeToString())
    return b"".join(parts), arrays


def test_a_large_request_is_read_with_its_raw_contents_in_place_and_decodes_the_same() -> None:
    wire, arrays = _large_request()
    assert len(wire) > SPLIT_ABOVE
    request, raw = read_infer_request(wire)
    whole = inference_pb2.ModelInferRequest.FromString(wire)
    assert [bytes(r) for r in raw] == list(whole.raw_input_contents)
    assert all(isinstance(r, memoryview) and r.obj is wire for r in raw)  # views of the message, not copies
    whole.ClearField("raw_input_contents")
    assert request == whole
    specs = {"image": TensorSpec("image", "FP32", (-1, 3, 224, 224)), "scale": TensorSpec("scale", "FP32", (1, 1)),
             "ids": TensorSpec("ids", "INT64", (2, 4))}
    got, wanted, request_id = decode_request(request, specs, raw)
    assert wanted == ["out"] and request_id == "req-7"
    for name, arr in arrays.items():
        assert_same(got[name], arr)


def test_a_small_request_is_read_whole() -> None:
    wire = _triton_request({"x": ("FP32", np.ones((1, 64), np.float32))})
    request, raw = read_infer_request(wire)
    assert list(raw) == [np.ones((1, 64), np.float32).tobytes()] and request.raw_input_contents == raw


def test_a_large_request_cut_or_corrupted_reads_as_protobuf_reads_it() -> None:
    """Every cut and a few hundred byte flips of a large request: refused exactly when protobuf refuses the whole
    message, and otherwise read to the same request and contents."""
    wire, arrays = _large_request()
    rng = np.random.default_rng(3)
    image = arrays["image"].tobytes()
    after = wire.index(image) + len(image)  # the framing of the other fields, past the image's contents
    spots = sorted({*range(0, 64), *range(after - 8, len(wire)), *(int(i) for i in rng.integers(0, len(wire), 200))})
    tried = []
    for i in spots:
        tried.append(wire[:i])
        for flip in (0x80, 0x7F, 0x07):
            tried.append(wire[:i] + bytes([wire[i] ^ flip]) + wire[i + 1:])
    refused = 0
    for bad in tried:
        try:
            whole = inference_pb2.ModelInferRequest.FromString(bad)
        except DecodeError:
            with pytest.raises(DecodeError):
                read_infer_request(bad)
            refused += 1
            continue
        request, raw = read_infer_request(bad)
        assert [bytes(r) for r in raw] == list(whole.raw_input_contents)
        whole.ClearField("raw_input_contents")
        assert request == whole
    assert 0 < refused < len(tried)
