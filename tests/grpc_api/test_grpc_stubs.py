"""The generated service module over a real gRPC connection: tritonclient.grpc's InferenceServerClient calls the
method paths it defines, unary and streaming, and reads what the codec writes, errors included."""

from __future__ import annotations

import queue
from concurrent import futures

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc.aio")
tritongrpc = pytest.importorskip("tritonclient.grpc")

from grpc_helpers import DATATYPES, SAMPLES, assert_same, name_of, spec_of  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgerun.errors import InvalidInput  # noqa: E402
from edgerun.grpc import inference_pb2 as pb  # noqa: E402
from edgerun.grpc import inference_pb2_grpc  # noqa: E402
from edgerun.grpc.tensors import decode_request, encode_response, model_config, model_metadata  # noqa: E402

SPECS = {name_of(d): spec_of(d) for d in DATATYPES}


class EchoService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Model 'echo' returns each input as output 'out_<input>'; the RPCs not overridden answer UNIMPLEMENTED."""

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ModelMetadata(self, request, context):
        outs = [spec_of(d) for d in DATATYPES]
        return model_metadata("echo", [1], "edgerun", SPECS.values(),
                              [type(s)(f"out_{s.name}", s.datatype, s.shape) for s in outs])

    def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=model_config("echo", "edgerun", "edgerun", SPECS.values(), [],
                                                          max_batch_size=8, max_queue_delay_us=500))

    def _infer(self, request):
        inputs, wanted, req_id = decode_request(request, SPECS)
        outputs = {f"out_{k}": v for k, v in inputs.items()}
        types = {f"out_{k}": SPECS[k].datatype for k in inputs}
        return encode_response("echo", 1, req_id, outputs, wanted or list(outputs), types)

    def ModelInfer(self, request, context):
        try:
            return self._infer(request)
        except InvalidInput as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request))
            except InvalidInput as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))


@pytest.fixture(scope="module")
def client():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(EchoService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    c = tritongrpc.InferenceServerClient(f"127.0.0.1:{port}")
    yield c
    c.close()
    server.stop(grace=None).wait()


def _inputs():
    inputs = []
    for d in DATATYPES:
        i = tritongrpc.InferInput(name_of(d), list(SAMPLES[d].shape), d)
        i.set_data_from_numpy(SAMPLES[d])
        inputs.append(i)
    return inputs


def test_liveness_metadata_and_config_reach_tritonclient(client) -> None:
    assert client.is_server_live()
    meta = client.get_model_metadata("echo", as_json=True)
    assert [t["name"] for t in meta["inputs"]] == list(SPECS)
    assert meta["outputs"][0] == {"name": "out_in_bool", "datatype": "BOOL", "shape": ["-1", "3"]}
    config = client.get_model_config("echo", as_json=True)["config"]
    assert (config["max_batch_size"], config["input"][0]["dims"], config["input"][0]["data_type"]) == (8, ["3"],
                                                                                                       "TYPE_BOOL")
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "500"}


def test_an_unimplemented_rpc_is_a_clear_status(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("echo")
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_infer_every_datatype_round_trips(client) -> None:
    wanted = ["out_in_bytes", "out_in_fp16", "out_in_uint64"]
    result = client.infer("echo", _inputs(), request_id="r-1",
                          outputs=[tritongrpc.InferRequestedOutput(o) for o in wanted])
    response = result.get_response()
    assert [o.name for o in response.outputs] == wanted and response.id == "r-1"
    assert_same(result.as_numpy("out_in_fp16"), SAMPLES["FP16"])
    assert_same(result.as_numpy("out_in_uint64"), SAMPLES["UINT64"])
    assert_same(result.as_numpy("out_in_bytes"), SAMPLES["BYTES"])
    every = client.infer("echo", _inputs())
    for d in DATATYPES:
        assert_same(every.as_numpy(f"out_{name_of(d)}"), SAMPLES[d])


def test_bad_infer_is_invalid_argument_with_the_reason(client) -> None:
    inputs = _inputs()
    inputs[0] = tritongrpc.InferInput(name_of("BOOL"), [2, 3], "INT8")
    inputs[0].set_data_from_numpy(SAMPLES["INT8"])
    with pytest.raises(InferenceServerException) as info:
        client.infer("echo", inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'in_bool': datatype INT8, model expects BOOL" in info.value.message()
    assert client.infer("echo", _inputs()).as_numpy("out_in_int8") is not None


def test_stream_answers_each_request_in_turn(client) -> None:
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("echo", _inputs(), request_id="a")
        bad = tritongrpc.InferInput("nope", [1], "FP32")
        bad.set_data_from_numpy(np.zeros(1, np.float32))
        client.async_stream_infer("echo", [bad], request_id="b")
        client.async_stream_infer("echo", _inputs(), request_id="c")
        answers = [got.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    (first, e1), (second, e2), (third, e3) = answers
    assert e1 is None and first.get_response().id == "a"
    assert_same(first.as_numpy("out_in_fp32"), SAMPLES["FP32"])
    assert second is None and "no input 'nope'" in e2.message()
    assert e3 is None and third.get_response().id == "c"
    assert_same(third.as_numpy("out_in_bytes"), SAMPLES["BYTES"])
