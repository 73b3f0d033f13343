"""``edgerun serve``'s gRPC front end as tritonclient.grpc sees it: health, metadata, config, statistics, infer
(raw and typed), streams, repository control, the token, and a clear status for every refusal."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
tritongrpc = pytest.importorskip("tritonclient.grpc")

from grpc_helpers import SAMPLES, assert_same  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgerun.grpc import inference_pb2 as pb  # noqa: E402
from edgerun.grpc import inference_pb2_grpc  # noqa: E402
from edgerun.testing.models import make_digits_package  # noqa: E402
from edgerun.testing.serving import TOKEN, ServerProcess, free_port, make_echo_package, reference  # noqa: E402

AUTH = (("authorization", f"Bearer {TOKEN}"),)


def headers() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def built(module: str) -> bool:
    from edgerun.grpc.server import native_available

    return native_available(module) is None


FRONTENDS = [pytest.param("loop", marks=pytest.mark.skipif(not built("_h2"), reason="edgerun.grpc._h2 is not built "
                                                           "(nghttp2's headers were not installed)")),
             pytest.param("native", marks=pytest.mark.skipif(not built("_native"), reason="edgerun.grpc._native is "
                                                             "not built (gRPC's C++ library was not installed)")),
             "grpcio"]


@pytest.fixture(scope="module", params=FRONTENDS)
def served(request, tmp_path_factory, digits_package):
    """digits and echo (every datatype) over HTTP and gRPC, with a token and a model repository; each test runs
    against each gRPC server (``server.grpc_frontend``)."""
    d = tmp_path_factory.mktemp("grpc")
    echo = make_echo_package(d / "echo")
    repo = d / "models"
    make_digits_package(repo / "mnist", name="mnist", int8=False)
    (d / "token").write_text(TOKEN)
    cfg = d / "edgerun.toml"
    cfg.write_text(f'[server]\ntoken_file = "{d / "token"}"\nrepository_dir = "{repo}"\n'
                   f'\n[[models]]\npath = "{digits_package.root}"\nvariant = "onnx-fp32"\n'
                   f'\n[[models]]\npath = "{echo.root}"\nbackend = "onnxruntime"\n')
    port = free_port()
    proc = ServerProcess(["--config", str(cfg)], env={"EDGERUN_SERVER_GRPC_PORT": str(port),
                                                      "EDGERUN_SERVER_GRPC_FRONTEND": request.param}).wait_ready()
    proc.grpc_port = port
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "serving KServe v2 gRPC on grpc://127.0.0.1:" in proc.output()
    assert f"({request.param} server)" in proc.output()


@pytest.fixture
def client(served):
    c = tritongrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    yield c
    c.close()


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def digits(rows: int = 1, seed: int = 0) -> tuple[np.ndarray, list]:
    x = np.random.default_rng(seed).random((rows, 64), dtype=np.float32)
    i = tritongrpc.InferInput("input", [rows, 64], "FP32")
    i.set_data_from_numpy(x)
    return x, [i]


TEXT = {**SAMPLES, "BYTES": np.array([[b"abc", "h\u00e9llo".encode(), b""], [b"x" * 300, "\u2603".encode(), b"z"]],
                                     dtype=object)}  # the echo model runs on onnxruntime: its strings are UTF-8 text


def echo_inputs(samples: dict[str, np.ndarray] = TEXT) -> list:
    inputs = []
    for dt, sample in samples.items():
        i = tritongrpc.InferInput(f"in_{dt}", list(sample.shape), dt)
        i.set_data_from_numpy(sample)
        inputs.append(i)
    return inputs


def test_health_needs_no_token_and_everything_else_does(client):
    assert client.is_server_live() and client.is_server_ready()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("digits")
    assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "bearer token" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", digits()[1], headers={"authorization": "Bearer wrong"})
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"


def test_metadata_readiness_and_config(client):
    h = headers()
    assert client.is_model_ready("digits", headers=h) and not client.is_model_ready("nope", headers=h)
    assert not client.is_model_ready("digits", "9", headers=h)
    server = client.get_server_metadata(headers=h, as_json=True)
    assert server["name"] == "edgerun" and "model_configuration" in server["extensions"]
    meta = client.get_model_metadata("digits", headers=h, as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["versions"] == ["1"] and meta["platform"].endswith("_onnx")
    cfg = client.get_model_config("digits", headers=h, as_json=True)["config"]
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == ["64"]
    assert cfg["input"][0]["data_type"] == "TYPE_FP32" and "dynamic_batching" in cfg


def test_infer_raw_matches_the_model(client, digits_package):
    x, inputs = digits(3)
    result = client.infer("digits", inputs, headers=headers(), request_id="req-7")
    assert result.get_response().id == "req-7" and result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(digits_package, x), rtol=1e-5, atol=1e-6)


def test_infer_with_typed_contents(stub, digits_package):
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    req = pb.ModelInferRequest(model_name="digits")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = stub.ModelInfer(req, metadata=AUTH)
    (out,) = resp.outputs
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(out.shape))
    np.testing.assert_allclose(got, reference(digits_package, x), rtol=1e-5, atol=1e-6)


def test_every_datatype_round_trips(client):
    wanted = ["out_BYTES", "out_FP16", "out_UINT64"]
    result = client.infer("echo", echo_inputs(), headers=headers(),
                          outputs=[tritongrpc.InferRequestedOutput(o) for o in wanted])
    assert [o.name for o in result.get_response().outputs] == wanted
    every = client.infer("echo", echo_inputs(), headers=headers())
    for dt, sample in TEXT.items():
        assert_same(every.as_numpy(f"out_{dt}"), sample)


def test_bytes_that_are_not_text_are_refused_by_a_text_only_backend(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("echo", echo_inputs(SAMPLES), headers=headers())  # b"\xff\xfe\x00" is not UTF-8
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'in_BYTES': element 2 is not UTF-8 text; onnxruntime's string tensors" in info.value.message()


@pytest.mark.parametrize("model,inputs,outputs,code,message", [
    ("nope", None, None, "NOT_FOUND", "unknown model 'nope'"),
    ("digits", [("input", [1, 63], "FP32")], None, "INVALID_ARGUMENT", "shape [1, 63], model expects [-1, 64]"),
    ("digits", [("input", [1, 64], "FP64")], None, "INVALID_ARGUMENT", "datatype FP64, model expects FP32"),
    ("digits", [("other", [1, 64], "FP32")], None, "INVALID_ARGUMENT", "has no input 'other'"),
    ("digits", None, ["logits"], "INVALID_ARGUMENT", "has no output 'logits'"),
])
def test_refusals_have_clear_statuses_and_the_server_keeps_serving(client, model, inputs, outputs, code, message):
    if inputs is None:
        args = digits()[1]
    else:
        args = []
        for name, shape, dt in inputs:
            i = tritongrpc.InferInput(name, shape, dt)
            i.set_data_from_numpy(np.zeros(shape, np.float64 if dt == "FP64" else np.float32))
            args.append(i)
    wanted = [tritongrpc.InferRequestedOutput(o) for o in outputs] if outputs else None
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, args, outputs=wanted, headers=headers())
    assert info.value.status() == f"StatusCode.{code}" and message in info.value.message(), info.value.message()
    assert client.infer("digits", digits()[1], headers=headers()).as_numpy("probabilities").shape == (1, 10)


def test_a_message_above_the_body_limit_is_refused(stub):
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=[300_000, 64])
    req.raw_input_contents.append(bytes(300_000 * 64 * 4))  # 73 MiB, above the 64 MiB default
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_a_stream_answers_every_request_and_reports_each_error(client):
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)), headers=headers())
    try:
        client.async_stream_infer("echo", echo_inputs(), request_id="a")
        bad = tritongrpc.InferInput("nope", [1], "FP32")
        bad.set_data_from_numpy(np.zeros(1, np.float32))
        client.async_stream_infer("echo", [bad], request_id="b")
        for i in range(20):
            client.async_stream_infer("digits", digits(1, i)[1], request_id=f"d{i}")
        answers = [got.get(timeout=30) for _ in range(22)]
    finally:
        client.stop_stream()
    ok = {r.get_response().id: r for r, e in answers if e is None}
    errors = [e.message() for r, e in answers if e is not None]
    assert set(ok) == {"a", *(f"d{i}" for i in range(20))}
    assert len(errors) == 1 and "no input 'nope'" in errors[0]
    assert_same(ok["a"].as_numpy("out_BYTES"), TEXT["BYTES"])


def test_statistics_count_grpc_requests(client):
    h = headers()
    before = client.get_inference_statistics("digits", headers=h, as_json=True)["model_stats"][0]
    client.infer("digits", digits(4)[1], headers=h)
    after = client.get_inference_statistics("digits", headers=h, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 4
    assert int(after["inference_stats"]["success"]["count"]) > int(before["inference_stats"].get("success", {})
                                                                   .get("count", 0))
    everything = client.get_inference_statistics(headers=h, as_json=True)["model_stats"]
    assert {s["name"] for s in everything} >= {"digits", "echo"}


def test_repository_control(client):
    h = headers()
    index = {m["name"]: m["state"] for m in client.get_model_repository_index(headers=h, as_json=True)["models"]}
    assert index["mnist"] == "UNAVAILABLE" and index["digits"] == "READY"
    client.load_model("mnist", headers=h)
    assert client.is_model_ready("mnist", headers=h)
    assert client.infer("mnist", digits()[1], headers=h).as_numpy("probabilities").shape == (1, 10)
    client.unload_model("mnist", headers=h)
    assert not client.is_model_ready("mnist", headers=h)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("digits", headers=h)
    assert info.value.status() == "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException) as info:
        client.load_model("nope", headers=h)
    assert info.value.status() == "StatusCode.NOT_FOUND" and "no model 'nope'" in info.value.message()


def test_grpc_can_be_turned_off_and_a_taken_port_stops_start_up(digits_package):
    p = ServerProcess(["--model", str(digits_package.root)], env={"EDGERUN_SERVER_GRPC_PORT": "0"}).wait_ready()
    assert p.stop() == 0 and "gRPC" not in p.output()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = ServerProcess(["--model", str(digits_package.root)], env={"EDGERUN_SERVER_GRPC_PORT": str(port)})
        code = p.proc.wait(60)
        p.stop()
    assert code == 78, p.output()
    assert "server.grpc_port" in p.output() and f"127.0.0.1:{port}" in p.output()


def test_edgerun_client_over_grpc(served, digits_package):
    import edgerun
    from edgerun.errors import InvalidInput, ModelNotFound, Unauthenticated

    x = np.random.default_rng(5).random((2, 64), dtype=np.float32)
    with edgerun.Client(f"grpc://127.0.0.1:{served.grpc_port}", token=TOKEN) as c:
        assert c.live() and c.ready() and c.model_ready("digits") and not c.model_ready("digits", 3)
        assert c.metadata("digits")["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert {m["name"] for m in c.models()} == {"digits", "echo"}
        out = c.infer("digits", {"input": x}, outputs=["probabilities"])
        np.testing.assert_allclose(out["probabilities"], reference(digits_package, x), rtol=1e-5, atol=1e-6)
        words = np.array([["h\u00e9llo", "x"]], dtype=object)
        echoed = c.infer("echo", {f"in_{dt}": (words if dt == "BYTES" else sample[:1, :2])
                                  for dt, sample in TEXT.items()})
        assert echoed["out_BYTES"].tolist() == [["h\u00e9llo", "x"]]
        with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
            c.infer("nope", {"input": x})
        with pytest.raises(InvalidInput, match="model expects FP32"):
            c.infer("digits", {"input": x.astype(np.float64)})
    with edgerun.Client(f"grpc://127.0.0.1:{served.grpc_port}") as c:
        assert c.live()
        with pytest.raises(Unauthenticated, match="bearer token"):
            c.metadata("digits")


def test_sigterm_with_a_stream_open_ends_the_server_after_the_drain_time(digits_package):
    """Calls run on grpcio's worker threads and wait for the event loop: a stream the client keeps open must not
    keep the process alive past ``drain_timeout`` (the worker threads are all let go), and what it answered
    before stays answered."""
    import signal
    import time

    port = free_port()
    p = ServerProcess(["--model", str(digits_package.root)],
                      env={"EDGERUN_SERVER_GRPC_PORT": str(port), "EDGERUN_SERVER_DRAIN_TIMEOUT": "2"}).wait_ready()
    c = tritongrpc.InferenceServerClient(f"127.0.0.1:{port}")
    answers: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x, inputs = digits(seed=3)
        c.async_stream_infer("digits", inputs, request_id="before")
        result, error = answers.get(timeout=30)
        assert error is None and result.get_response().id == "before"
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference(digits_package, x), rtol=1e-5,
                                   atol=1e-6)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        code = p.proc.wait(30)  # the stream is still open on the client's side
        took = time.monotonic() - t0
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()
        p.stop()
    assert code == 0, p.output()
    assert 2 <= took < 15, f"the server took {took:.1f} s to stop with a stream open (drain_timeout 2 s)"
    assert "gRPC server stopped" in p.output()


def test_bytes_that_are_no_request_and_an_unknown_method_get_clear_statuses(served, stub):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff\xff", metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInferRequest message" in info.value.details()
        unknown = channel.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryStatus")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_calls_the_clients_give_up_on_leave_the_server_serving(served, stub, digits_package):
    """Calls cut off by their deadline, and a stream cancelled with requests in flight: their answers have no one
    to go to, and every later call is answered."""
    x, _ = digits(8, seed=9)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    futures = [stub.ModelInfer.future(req, metadata=AUTH, timeout=0.0005) for _ in range(200)]
    codes = {f.exception().code() if f.exception() else grpc.StatusCode.OK for f in futures}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    requests: queue.Queue = queue.Queue()
    for i in range(50):
        requests.put(pb.ModelInferRequest(model_name="digits", id=str(i), inputs=req.inputs,
                                          raw_input_contents=req.raw_input_contents))
    stream = stub.ModelStreamInfer(iter(requests.get, None), metadata=AUTH)
    next(stream)  # the stream is answering
    stream.cancel()
    requests.put(None)  # lets the client's request thread end
    for _ in range(20):
        resp = stub.ModelInfer(req, metadata=AUTH, timeout=30)
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(8, 10)
        np.testing.assert_allclose(got, reference(digits_package, x), rtol=1e-5, atol=1e-6)


def test_a_stream_longer_than_its_window_is_answered_whole(client):
    """More requests than a stream serves at once (64): the rest wait their turn, none is lost."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)), headers=headers())
    try:
        for i in range(300):
            client.async_stream_infer("digits", digits(1, i)[1], request_id=str(i))
        answers = [got.get(timeout=60) for _ in range(300)]
    finally:
        client.stop_stream()
    assert [e for _, e in answers if e is not None] == []
    assert sorted(int(r.get_response().id) for r, _ in answers) == list(range(300))


def _grpc_thread(pid: int) -> int:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "edgerun-grpc":
            return int(task.name)
    raise AssertionError("no thread named edgerun-grpc in the server")


def _policy_becomes(tid: int, policy: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while os.sched_getscheduler(tid) != policy:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_native_server_thread_gives_way_to_the_event_loop_only_under_load(served, stub, digits_package):
    """The native server's gRPC thread is an ordinary thread with no call open (woken while another process has
    the CPU, it runs at once), SCHED_BATCH while several are (it leaves the event loop be until the loop sleeps),
    and ordinary again once they end; calls are answered throughout."""
    if "(native server)" not in served.output():
        pytest.skip("only the native server has a thread of its own")
    tid = _grpc_thread(served.proc.pid)
    x, inputs = digits(2, seed=5)
    req = pb.ModelInferRequest(model_name="digits", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[2, 64])], raw_input_contents=[x.tobytes()])

    def answered() -> None:
        resp = stub.ModelInfer(req, metadata=AUTH, timeout=30)
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 10)
        np.testing.assert_allclose(got, reference(digits_package, x), rtol=1e-5, atol=1e-6)

    answered()
    assert _policy_becomes(tid, os.SCHED_OTHER), "the gRPC thread is SCHED_BATCH with no call open"
    ends = [threading.Event() for _ in range(6)]

    def held_open(end: threading.Event) -> Iterator[pb.ModelInferRequest]:
        end.wait(60)
        return
        yield

    streams = [stub.ModelStreamInfer(held_open(end), metadata=AUTH, timeout=60) for end in ends]
    try:
        assert _policy_becomes(tid, os.SCHED_BATCH), "six open streams did not make the gRPC thread SCHED_BATCH"
        answered()
    finally:
        for end in ends:
            end.set()
        for s in streams:
            assert list(s) == []
    assert _policy_becomes(tid, os.SCHED_OTHER), "the gRPC thread stayed SCHED_BATCH once the streams ended"
    answered()
