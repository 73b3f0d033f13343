"""The loop gRPC server (``server.grpc_frontend = "loop"``: the nghttp2 sessions of edgerun/grpc/_h2.cpp driven
by LoopServer in edgerun/grpc/server.py) at the wire level: what a client sees when what it sends is not what the
service takes, and that the server goes on serving afterwards.

Each test checks something a user would notice, then that a normal ModelInfer on a new channel is still answered
(and answered right):

- an unknown method (UNIMPLEMENTED, naming it), a message over the size limit (RESOURCE_EXHAUSTED naming the
  limit) and one just under it (answered), a unary method sent two messages or none (INVALID_ARGUMENT);
- gzip and deflate request compression (the answer of an uncompressed call) and a gzip bomb (RESOURCE_EXHAUSTED);
- raw HTTP/2 (python-hyper's h2): a GET (405), a non-gRPC content-type (415), a body ending inside a message
  (INTERNAL), an unknown grpc-encoding (UNIMPLEMENTED) and other malformed messages, each closing its own stream
  only; a message cut into tiny padded frames and ended by trailers; request headers over the 16 KB limit;
- a ModelStreamInfer request the session refuses (over the limit, bad flags, cut short), as the stream's first
  request or after it has answered one: the stream ends with that status;
- bytes that are not HTTP/2 (an HTTP/1.1 request, random bytes, a bad frame after the preface): that connection
  alone is closed;
- clients that go away with calls open, half-sent and in flight; 1000 calls at once on one connection;
- a ModelStreamInfer stream with 200 requests at once (more than the 64 a stream has in flight);
- SIGTERM with calls in flight: GOAWAY, the calls answered, new connections refused, exit status 0; and a stream
  left open through the drain still answered after the HTTP server has stopped.

The module's server runs with ``server.max_body = "1MiB"``: its gRPC message limit is max_body + 1 MiB. Helpers
for a raw HTTP/2 connection: ``RawH2`` (a client driven by hand), ``grpc_message`` and ``Answer``.
"""

from __future__ import annotations

import gzip
import queue
import random
import signal
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
h2_connection = pytest.importorskip("h2.connection", reason="python-hyper's h2 is not installed (pip install h2)")

import h2.config  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402

from edgerun.grpc import inference_pb2 as pb  # noqa: E402
from edgerun.grpc import inference_pb2_grpc  # noqa: E402
from edgerun.grpc.server import native_available  # noqa: E402
from edgerun.testing.serving import ServerProcess, free_port, make_slow_package  # noqa: E402

_missing = native_available("_h2")
if _missing is not None:
    pytest.skip(f"the loop gRPC server (edgerun.grpc._h2) is not built: {_missing} (install nghttp2's headers, "
                "Debian's libnghttp2-dev, and reinstall edgerun)", allow_module_level=True)

MAX_BODY = 1 << 20  # server.max_body
MAX_MESSAGE = MAX_BODY + (1 << 20)  # the gRPC message limit the server derives from it
SERVICE = "/inference.GRPCInferenceService"
INFER = f"{SERVICE}/ModelInfer"
STREAM = f"{SERVICE}/ModelStreamInfer"
TIMEOUT = 60  # seconds: generous, for a loaded CI machine; nothing here waits for it unless something is wrong


# --- the server and a normal call ---------------------------------------------------------------------------


class Reference:
    """The digits model run by onnxruntime directly (one session): what the server must answer."""

    def __init__(self, package):
        import onnxruntime as ort

        self._session = ort.InferenceSession(str(package.path_of(package.variant("onnx-fp32").main_file)),
                                             providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input": x})[0]


def serve(cfg: Path, **env: str) -> ServerProcess:
    port = free_port()
    proc = ServerProcess(["--config", str(cfg)], env={"EDGERUN_SERVER_GRPC_PORT": str(port),
                                                      "EDGERUN_SERVER_GRPC_FRONTEND": "loop", **env})
    proc.grpc_port = port
    return proc.wait_ready()


@pytest.fixture(scope="module")
def expected(digits_package) -> Reference:
    return Reference(digits_package)


def serve_digits(d: Path, digits_package, server: str = 'max_body = "1MiB"', **env: str) -> ServerProcess:
    """``edgerun serve`` with the digits model and the loop gRPC server (unless ``env`` names another), no token;
    ``server``: the lines of its [server] table."""
    cfg = d / "edgerun.toml"
    cfg.write_text(f'[server]\n{server}\n\n[[models]]\npath = "{digits_package.root}"\nvariant = "onnx-fp32"\n')
    return serve(cfg, **env)


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_package):
    """``edgerun serve`` with the digits model and the loop gRPC server, max_body 1 MiB, no token."""
    proc = serve_digits(tmp_path_factory.mktemp("loop-wire"), digits_package)
    yield proc
    assert proc.stop() == 0, proc.output()
    out = proc.output()
    assert "(loop server)" in out, out
    assert "Traceback" not in out and "Exception in callback" not in out, out


def digits_request(rows: int = 2, seed: int = 0, id: str = "") -> tuple[np.ndarray, pb.ModelInferRequest]:
    x = np.random.default_rng(seed).random((rows, 64), dtype=np.float32)
    req = pb.ModelInferRequest(model_name="digits", id=id)
    req.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    req.raw_input_contents.append(x.tobytes())
    return x, req


def probabilities(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    assert out.name == "probabilities"
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(out.shape))


def assert_serves(served, expected: Reference, seed: int = 99) -> None:
    """A normal ModelInfer on a new connection is answered, and right; the server process is up."""
    assert served.proc.poll() is None, f"the server exited with {served.proc.returncode}:\n{served.output()}"
    x, req = digits_request(3, seed)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        resp = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    np.testing.assert_allclose(probabilities(resp), expected(x), rtol=1e-5, atol=1e-6)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=TIMEOUT, **kwargs)
    return info.value


# --- raw HTTP/2 ---------------------------------------------------------------------------------------------


def grpc_message(payload: bytes, flags: int = 0, size: int | None = None) -> bytes:
    """A gRPC length-prefixed message: flags (1: compressed), the length (``size``: another than the true one)."""
    return struct.pack(">BI", flags, len(payload) if size is None else size) + payload


@dataclass
class Answer:
    """One stream's response as a raw client sees it."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code

    @property
    def status(self) -> int:
        return int(self.headers[":status"])

    def _grpc(self, name: str) -> str | None:
        # trailers, or the headers of a trailers-only response
        return self.trailers.get(name, self.headers.get(name))

    @property
    def grpc_status(self) -> int:
        value = self._grpc("grpc-status")
        assert value is not None, f"no grpc-status in {self}"
        return int(value)

    @property
    def grpc_message(self) -> str:
        return unquote(self._grpc("grpc-message") or "")

    def messages(self) -> list[bytes]:
        out, data = [], bytes(self.data)
        while data:
            flags, size = struct.unpack(">BI", data[:5])
            assert flags == 0, "the server compressed an answer it was not asked to"
            out.append(data[5:5 + size])
            data = data[5 + size:]
        return out


class RawH2:
    """A client HTTP/2 connection on a plain socket, driven by hand; h2 keeps the protocol's state.

    What the server sends is given to h2 a frame at a time: after a GOAWAY, h2 refuses every further frame, while
    HTTP/2 lets the streams the GOAWAY covers go on, so the connection is set back open for them to be read.
    """

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.conn = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         header_encoding="utf-8"))
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False
        self.corked = False  # True: what is sent waits for uncork(), to go out in one write
        self._pongs: set[bytes] = set()
        self._frames = b""
        self.conn.initiate_connection()
        self._flush()

    def __enter__(self) -> "RawH2":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def _flush(self) -> None:
        if self.corked:
            return
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def uncork(self) -> None:
        self.corked = False
        self._flush()

    def request(self, path: str = INFER, body: bytes = b"", *, method: str = "POST",
                content_type: str | None = "application/grpc", headers: tuple[tuple[str, str], ...] = (),
                end: bool = True) -> int:
        """Open a stream with a request's headers and ``body``; ``end``: the request ends there. Its id."""
        sid = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "http"), (":authority", "127.0.0.1"), (":path", path)]
        if content_type is not None:
            fields.append(("content-type", content_type))
        fields += [("te", "trailers"), *headers]
        self.answers[sid] = Answer()
        self.conn.send_headers(sid, fields, end_stream=end and not body)
        self._flush()
        if body:
            self.send(sid, body, end=end)
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """DATA on stream ``sid``, in frames as large as the server takes, as its windows allow."""
        while data:
            n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if n == 0:
                self._read()  # wait for a WINDOW_UPDATE
                continue
            self.conn.send_data(sid, data[:n], end_stream=end and n == len(data))
            data = data[n:]
            self._flush()

    def end(self, sid: int) -> None:
        """End the request on stream ``sid`` (an empty DATA frame with END_STREAM)."""
        self.conn.end_stream(sid)
        self._flush()

    def ping(self) -> None:
        """A PING, answered: the server has read everything sent before it (nghttp2 reads in order)."""
        opaque = random.randbytes(8)
        self.conn.ping(opaque)
        self._flush()
        self.read_until(lambda: opaque in self._pongs, "a PING's ACK")

    def answer(self, sid: int) -> Answer:
        """Stream ``sid``'s whole response."""
        self.read_until(lambda: self.answers[sid].ended, f"the end of stream {sid}")
        return self.answers[sid]

    def read_until(self, done, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.eof:
                pytest.fail(f"the server closed the connection before {what}")
            if time.monotonic() >= deadline:
                pytest.fail(f"waited {timeout} s for {what}")
            self._read(deadline - time.monotonic())

    def read_to_eof(self, timeout: float = TIMEOUT) -> None:
        self.read_until(lambda: self.eof, "the connection's close", timeout)

    def _read(self, timeout: float = TIMEOUT) -> None:
        self.sock.settimeout(max(timeout, 0.01))
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return  # read_until says what did not come
        if not data:
            self.eof = True
            return
        self._frames += data
        while len(self._frames) >= 9:
            end = 9 + int.from_bytes(self._frames[:3], "big")
            if len(self._frames) < end:
                break
            frame, self._frames = self._frames[:end], self._frames[end:]
            for event in self.conn.receive_data(frame):
                self._on(event)
        self._flush()

    def _on(self, event) -> None:
        answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived):
            answer.headers = dict(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            answer.trailers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            answer.data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset):
            answer.ended, answer.reset = True, event.error_code
        elif isinstance(event, h2.events.PingAckReceived):
            self._pongs.add(event.ping_data)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
            self.conn.state_machine.state = h2_connection.ConnectionState.CLIENT_OPEN


def raw_infer(raw: RawH2, seed: int, expected: Reference) -> None:
    """A ModelInfer over the raw connection is answered, and right."""
    x, req = digits_request(2, seed)
    answer = raw.answer(raw.request(INFER, grpc_message(req.SerializeToString())))
    assert answer.status == 200 and answer.grpc_status == 0, answer
    (message,) = answer.messages()
    np.testing.assert_allclose(probabilities(pb.ModelInferResponse.FromString(message)), expected(x), rtol=1e-5,
                               atol=1e-6)


# --- refusals a gRPC client sees ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [f"{SERVICE}/Nope", "/grpc.health.v1.Health/Check"])
def test_an_unknown_method_is_unimplemented_and_named(served, expected, path):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        error = rpc_error(channel.unary_unary(path), b"")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error
    assert path in error.details(), error.details()
    assert_serves(served, expected)


def test_a_message_over_the_limit_is_resource_exhausted_and_names_the_limit(served, expected):
    rows = (MAX_MESSAGE + 256) // 256  # FP32 [rows, 64]: just over the limit
    _, req = digits_request(rows)
    assert req.ByteSize() > MAX_MESSAGE
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        error = rpc_error(stub.ModelInfer, req)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert f"limit of {MAX_MESSAGE}" in error.details() and "server.max_body" in error.details(), error.details()
        assert str(req.ByteSize()) in error.details(), error.details()
        # the refusal ends that call only: the same connection goes on
        x, small = digits_request(1, seed=1)
        np.testing.assert_allclose(probabilities(stub.ModelInfer(small, timeout=TIMEOUT)), expected(x), rtol=1e-5,
                                   atol=1e-6)
    assert_serves(served, expected)


def test_a_message_just_under_the_limit_is_answered(served, expected):
    rows = (MAX_MESSAGE - 1024) // 256
    _, req = digits_request(rows)
    assert req.ByteSize() <= MAX_MESSAGE
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        resp = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    assert probabilities(resp).shape == (rows, 10)
    assert_serves(served, expected)


@pytest.mark.parametrize("count", [2, 0])
def test_a_unary_method_sent_other_than_one_message_is_invalid_argument(served, expected, count):
    _, req = digits_request(1)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        call = channel.stream_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        error = rpc_error(call, iter([req] * count))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "a unary call takes one request message" in error.details(), error.details()
    assert ("sent more" if count else "sent none") in error.details(), error.details()
    assert_serves(served, expected)


# --- compression ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_get_the_answer_of_uncompressed_ones(served, expected, compression):
    x, req = digits_request(4, seed=7)
    target = f"127.0.0.1:{served.grpc_port}"
    with grpc.insecure_channel(target) as channel:
        plain = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    with grpc.insecure_channel(target, compression=compression) as channel:  # every call of the channel
        by_channel = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT)
    with grpc.insecure_channel(target) as channel:  # this call only
        by_call = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=TIMEOUT,
                                                                                  compression=compression)
    for resp in (by_channel, by_call):
        assert [o.name for o in resp.outputs] == [o.name for o in plain.outputs]
        np.testing.assert_allclose(probabilities(resp), probabilities(plain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities(plain), expected(x), rtol=1e-5, atol=1e-6)
    assert_serves(served, expected)


@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_a_message_compressed_by_hand_is_inflated(served, expected, encoding, compress):
    """The same over raw HTTP/2, where the message is surely compressed (grpc-encoding and the prefix's flag)."""
    x, req = digits_request(2, seed=11)
    with RawH2(served.grpc_port) as raw:
        answer = raw.answer(raw.request(INFER, grpc_message(compress(req.SerializeToString()), flags=1),
                                        headers=(("grpc-encoding", encoding),)))
    assert answer.status == 200 and answer.grpc_status == 0, answer
    (message,) = answer.messages()
    np.testing.assert_allclose(probabilities(pb.ModelInferResponse.FromString(message)), expected(x), rtol=1e-5,
                               atol=1e-6)
    assert_serves(served, expected)


def test_a_gzip_bomb_is_resource_exhausted(served, expected):
    """A message small on the wire that inflates past the limit, sent by grpc (its own gzip) and by hand."""
    rows = (MAX_MESSAGE + 256) // 256
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    req.raw_input_contents.append(bytes(rows * 256))  # zeros: a few KB once gzipped
    bomb = gzip.compress(req.SerializeToString())
    assert len(bomb) < MAX_MESSAGE // 100
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}", compression=grpc.Compression.Gzip) as channel:
        error = rpc_error(inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert f"limit of {MAX_MESSAGE} bytes" in error.details() and "inflates" in error.details(), error.details()
    with RawH2(served.grpc_port) as raw:
        answer = raw.answer(raw.request(INFER, grpc_message(bomb, flags=1), headers=(("grpc-encoding", "gzip"),)))
        assert answer.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], answer
        assert f"limit of {MAX_MESSAGE} bytes" in answer.grpc_message, answer
        raw_infer(raw, 12, expected)  # the same connection goes on
    assert_serves(served, expected)


# --- raw HTTP/2: requests that are not gRPC calls, or not whole ones ------------------------------------------


def _valid() -> bytes:
    return digits_request(1)[1].SerializeToString()


# (what is sent, the answer's :status, its grpc-status, words of its grpc-message)
RAW_CASES = {
    "GET": (dict(method="GET"), 405, None, "POST"),
    "text/plain": (dict(content_type="text/plain", body=grpc_message(b"")), 415, None, "text/plain"),
    "no content-type": (dict(content_type=None, body=grpc_message(b"")), 415, None, "application/grpc"),
    "application/grpc-web": (dict(content_type="application/grpc-web", body=grpc_message(b"")), 415, None, ""),
    "ends inside a message": (dict(body=grpc_message(_valid()[:10], size=100)), 200, 13, "inside a gRPC message"),
    "ends inside a prefix": (dict(body=b"\x00\x00\x00"), 200, 13, "inside a gRPC message"),
    "grpc-encoding snappy": (dict(body=grpc_message(b"\x01\x02\x03", flags=1),
                                  headers=(("grpc-encoding", "snappy"),)), 200, 12, "'snappy' is not supported"),
    "compressed, no grpc-encoding": (dict(body=grpc_message(b"\x01\x02\x03", flags=1)), 200, 13,
                                     "without a grpc-encoding"),
    "unknown prefix flags": (dict(body=grpc_message(_valid(), flags=2)), 200, 13, "unknown flags"),
    "not gzip": (dict(body=grpc_message(b"not gzip at all", flags=1), headers=(("grpc-encoding", "gzip"),)),
                 200, 13, "cannot inflate"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_requests_that_are_no_whole_grpc_call_get_clear_answers(served, expected, case):
    request, status, grpc_status, words = RAW_CASES[case]
    with RawH2(served.grpc_port) as raw:
        answer = raw.answer(raw.request(INFER, **request))
        assert answer.status == status, answer
        if grpc_status is not None:
            assert answer.headers.get("content-type") == "application/grpc", answer
            assert answer.grpc_status == grpc_status, answer
        assert words in answer.grpc_message, answer
        assert answer.reset is None, answer
        raw_infer(raw, 13, expected)  # the refusal closed its stream only: the connection goes on
    assert_serves(served, expected)


def test_many_refused_and_answered_streams_share_one_connection(served, expected):
    """Refusals of every kind interleaved with calls on one connection: each stream gets its own answer."""
    with RawH2(served.grpc_port) as raw:
        sent = []
        for i in range(3):
            for case, (request, status, grpc_status, _) in RAW_CASES.items():
                sent.append((raw.request(INFER, **request), status, grpc_status))
            x, req = digits_request(1, seed=i)
            sent.append((raw.request(INFER, grpc_message(req.SerializeToString())), 200, 0))
        for sid, status, grpc_status in sent:
            answer = raw.answer(sid)
            assert answer.status == status, answer
            if grpc_status is not None:
                assert answer.grpc_status == grpc_status, answer
    assert_serves(served, expected)


def test_a_request_in_tiny_padded_frames_ending_with_trailers_is_one_call(served, expected):
    """A message cut into DATA frames of 1 to 7 bytes (its 5-byte prefix cut too), some padded, the request ended
    by a trailers HEADERS frame rather than END_STREAM on DATA: read as the one message it is."""
    x, req = digits_request(2, seed=14)
    body = grpc_message(req.SerializeToString())
    with RawH2(served.grpc_port) as raw:
        sid = raw.request(INFER, end=False)
        i = 0
        while i < len(body):
            n = 1 + i % 7
            raw.conn.send_data(sid, body[i:i + n], pad_length=(i % 5) if i % 3 else None)
            i += n
        raw.conn.send_headers(sid, [("x-trailer", "end")], end_stream=True)
        raw.sock.sendall(raw.conn.data_to_send())
        answer = raw.answer(sid)
        assert answer.grpc_status == 0, answer
        (message,) = answer.messages()
        np.testing.assert_allclose(probabilities(pb.ModelInferResponse.FromString(message)), expected(x),
                                   rtol=1e-5, atol=1e-6)
        for content_type in ("application/grpc+proto", "application/grpc;charset=utf-8"):
            answer = raw.answer(raw.request(INFER, body, content_type=content_type))
            assert answer.grpc_status == 0, (content_type, answer)
    assert_serves(served, expected)


def test_more_calls_at_once_than_a_connection_takes_are_all_answered(served, expected):
    """1000 calls at once on one channel, above the 256 streams a connection has open: the client queues the
    rest (SETTINGS_MAX_CONCURRENT_STREAMS), none is refused."""
    x, req = digits_request(1, seed=15)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(req, timeout=TIMEOUT) for _ in range(1000)]
        answers = [f.result() for f in futures]
    want = expected(x)
    for resp in answers:
        np.testing.assert_allclose(probabilities(resp), want, rtol=1e-5, atol=1e-6)
    assert_serves(served, expected)


def test_metadata_over_the_header_limit_fails_that_call_only(served, expected):
    """Request headers above 16 KB (the session's limit, its SETTINGS_MAX_HEADER_LIST_SIZE): the call fails at
    once, and the same connection goes on."""
    _, req = digits_request(1)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        error = rpc_error(stub.ModelInfer, req, metadata=(("x-big", "a" * (20 << 10)),))
        assert error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED), error
        x, small = digits_request(1, seed=16)
        np.testing.assert_allclose(probabilities(stub.ModelInfer(small, timeout=TIMEOUT)), expected(x), rtol=1e-5,
                                   atol=1e-6)
    assert_serves(served, expected)


def test_request_headers_over_the_limit_get_a_status_that_names_it(served, expected):
    """20 KB of metadata sent as is (grpc's own client may refuse to send it): RESOURCE_EXHAUSTED naming the
    16 KiB limit, and the connection goes on; headers far beyond the limit close that connection only."""
    _, req = digits_request(1)
    body = grpc_message(req.SerializeToString())
    with RawH2(served.grpc_port) as raw:
        answer = raw.answer(raw.request(INFER, body, headers=(("x-big", "a" * (20 << 10)),)))
        assert answer.grpc_status == 8, answer
        assert "limit of 16384" in answer.grpc_message, answer.grpc_message
        raw_infer(raw, 17, expected)
    with RawH2(served.grpc_port) as raw:  # 90 KB of headers: the connection is dropped
        try:
            raw.request(INFER, body, headers=tuple((f"x-big-{i}", "a" * (15 << 10)) for i in range(6)))
            raw.read_to_eof()
        except (ConnectionResetError, BrokenPipeError):
            raw.eof = True
        assert raw.eof
    assert_serves(served, expected)


# --- a stream whose request the session refuses ---------------------------------------------------------------

STREAM_REFUSALS = {  # the bad request bytes, the grpc-status the stream must end with, words of its grpc-message
    "a message over the limit": (grpc_message(b"", size=MAX_MESSAGE + 1), 8, f"limit of {MAX_MESSAGE}"),
    "unknown prefix flags": (grpc_message(b"xx", flags=2), 13, "unknown flags"),
    "the request ends inside a message": (grpc_message(b"x", size=10), 13, "inside a gRPC message"),
}
REFUSAL_TIMEOUT = 20  # seconds a refused stream is given to end (it ends at once, or never)


@pytest.mark.parametrize("answered_first", [False, True], ids=["first", "after an answer"])
@pytest.mark.parametrize("case", list(STREAM_REFUSALS))
def test_a_stream_the_session_refuses_ends_with_a_status(served, expected, case, answered_first):
    """A ModelStreamInfer request the session refuses by itself ends the stream with a status, whether it is the
    stream's first request or comes once the stream has answered one (its response headers are then out)."""
    bad, code, words = STREAM_REFUSALS[case]
    with RawH2(served.grpc_port) as raw:
        if answered_first:
            _, req = digits_request(1, seed=17, id="first")
            sid = raw.request(STREAM, grpc_message(req.SerializeToString()), end=False)
            raw.read_until(lambda: raw.answers[sid].data, "the first request's answer")
            raw.send(sid, bad, end=True)
        else:
            sid = raw.request(STREAM, bad)
        raw.read_until(lambda: raw.answers[sid].ended, f"the refused stream's end (so far: {raw.answers[sid]})",
                       REFUSAL_TIMEOUT)
        answer = raw.answers[sid]
        assert answer.grpc_status == code and words in answer.grpc_message, answer
        if answered_first:
            got = [pb.ModelStreamInferResponse.FromString(m) for m in answer.messages()]
            assert [g.infer_response.id for g in got] == ["first"], got
        raw_infer(raw, 18, expected)
    assert_serves(served, expected)


def test_a_grpc_stream_sent_a_message_over_the_limit_after_an_answer_is_resource_exhausted(served, expected):
    """What a tritonclient or stub user sees of the case above: the stream ends RESOURCE_EXHAUSTED, and does not
    hang until its deadline."""
    requests: queue.Queue = queue.Queue()
    _, small = digits_request(1, id="small")
    _, big = digits_request((MAX_MESSAGE + 256) // 256, id="big")
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        requests.put(small)
        stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=REFUSAL_TIMEOUT)
        try:
            assert next(stream).infer_response.id == "small"
            requests.put(big)
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
        finally:
            requests.put(None)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert f"limit of {MAX_MESSAGE}" in info.value.details(), info.value.details()
    assert_serves(served, expected)


# --- bytes that are not HTTP/2 --------------------------------------------------------------------------------


def _preface_then_bad_frame() -> bytes:
    conn = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    # a frame of 4 bytes, type DATA, no flags, on stream 0 (where DATA never goes): a connection error
    return conn.data_to_send() + struct.pack(">I", 4)[1:] + bytes([0, 0]) + struct.pack(">I", 0) + b"oops"


NOT_HTTP2 = {
    "HTTP/1.1 request": b"POST /inference.GRPCInferenceService/ModelInfer HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00",
    "4 KB of random bytes": random.Random(4).randbytes(4096),
    "a DATA frame on stream 0 after the preface": _preface_then_bad_frame(),
}


@pytest.mark.parametrize("case", list(NOT_HTTP2))
def test_bytes_that_are_not_http2_close_that_connection_only(served, expected, case):
    with RawH2(served.grpc_port) as bystander:  # another client, open throughout
        raw_infer(bystander, 21, expected)
        with socket.create_connection(("127.0.0.1", served.grpc_port), timeout=TIMEOUT) as sock:
            sock.sendall(NOT_HTTP2[case])
            got = b""
            deadline = time.monotonic() + 10
            while True:
                assert time.monotonic() < deadline, "the server kept the connection open"
                try:
                    chunk = sock.recv(1 << 16)
                except ConnectionResetError:  # closed with bytes of ours unread: a reset, not a FIN
                    break
                if not chunk:
                    break
                got += chunk
        if case.startswith("a DATA frame"):
            client = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            events = client.receive_data(got)
            goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, events
        raw_infer(bystander, 22, expected)
    assert_serves(served, expected)


# --- clients that go away -------------------------------------------------------------------------------------


def test_a_client_that_drops_its_connection_with_calls_open_leaves_the_server_serving(served, expected):
    """20 calls of every state (headers only, half a message, whole unary calls in flight, streams with requests
    in flight, one over its 64 in flight), then the socket reset; twice over, the second time closed cleanly."""
    for abortive in (True, False):
        raw = RawH2(served.grpc_port)
        _, req = digits_request(4, seed=3)
        message = grpc_message(req.SerializeToString())
        for i in range(4):
            raw.request(INFER, end=False)  # headers only
            raw.request(INFER, message[:len(message) // 2], end=False)  # half a message
            raw.request(INFER, message)  # whole: in flight
            stream = raw.request(STREAM, message * 3, end=False)  # requests in flight, the stream open
            if i == 0:
                raw.send(stream, message * 100)  # more than a stream has in flight: its connection is held
        raw.request(STREAM, message * 5)  # ended, its answers in flight
        raw.request(STREAM, end=False)
        raw.request(STREAM, message[:7], end=False)
        raw.request(f"{SERVICE}/ServerMetadata", grpc_message(b""))
        assert len(raw.answers) == 20
        if abortive:
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.sock.close()
        assert_serves(served, expected, seed=31)
    assert_serves(served, expected, seed=32)


def test_a_grpc_channel_closed_with_calls_in_flight_leaves_the_server_serving(served, expected):
    target = f"127.0.0.1:{served.grpc_port}"
    _, req = digits_request(8, seed=5)
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    futures = [stub.ModelInfer.future(req, timeout=TIMEOUT) for _ in range(15)]
    streams = [stub.ModelStreamInfer(iter([req] * 50), timeout=TIMEOUT) for _ in range(5)]
    next(streams[0])  # the stream is being answered
    channel.close()
    for f in futures:
        assert f.exception(TIMEOUT) is None or f.exception().code() == grpc.StatusCode.CANCELLED
    assert_serves(served, expected)


# --- a long stream ------------------------------------------------------------------------------------------


def test_a_stream_of_200_requests_at_once_is_answered_whole(served, expected):
    """200 requests sent at once on one ModelStreamInfer stream, more than the 64 it has in flight: reading pauses
    until answers go out, and every request is answered, by id, right."""
    xs = np.random.default_rng(8).random((200, 64), dtype=np.float32)
    want = expected(xs)
    requests = []
    for i in range(200):
        req = pb.ModelInferRequest(model_name="digits", id=f"r{i}")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        req.raw_input_contents.append(xs[i:i + 1].tobytes())
        requests.append(req)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT))
    assert [a.error_message for a in answers if a.error_message] == []
    ids = [a.infer_response.id for a in answers]
    assert sorted(ids) == sorted(r.id for r in requests), ids
    for a in answers:
        i = int(a.infer_response.id[1:])
        np.testing.assert_allclose(probabilities(a.infer_response), want[i:i + 1], rtol=1e-5, atol=1e-6)
    # the same over raw HTTP/2, the 200 messages in as few writes as the windows allow
    with RawH2(served.grpc_port) as raw:
        answer = raw.answer(raw.request(STREAM, b"".join(grpc_message(r.SerializeToString()) for r in requests)))
        assert answer.grpc_status == 0, answer
        got = [pb.ModelStreamInferResponse.FromString(m) for m in answer.messages()]
        assert sorted(g.infer_response.id for g in got) == sorted(r.id for r in requests)
    assert_serves(served, expected)


# --- a graceful stop ------------------------------------------------------------------------------------------


def slow_request(rounds: int, id: str = "") -> pb.ModelInferRequest:
    """The slow model echoes x after x rounds of work (a 256 x 256 MatMul each, about 1 ms)."""
    req = pb.ModelInferRequest(model_name="slow", id=id)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    req.raw_input_contents.append(np.full((1, 1), rounds, np.float32).tobytes())
    return req


def slow_value(resp: pb.ModelInferResponse) -> float:
    return float(np.frombuffer(resp.raw_output_contents[0], np.float32)[0])


@pytest.fixture
def stopping_server(tmp_path, digits_package, expected):
    """A server of its own (the test stops it) with the slow model and digits; its exit status is the test's to
    check."""
    slow = make_slow_package(tmp_path / "slow")
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[server]\nmax_body = "1MiB"\n'
                   f'\n[[models]]\npath = "{slow.root}"\nbackend = "onnxruntime"\n'
                   f'\n[[models]]\npath = "{digits_package.root}"\nvariant = "onnx-fp32"\n')
    proc = serve(cfg, EDGERUN_SERVER_DRAIN_TIMEOUT=str(DRAIN))
    assert_serves(proc, expected)
    yield proc
    proc.stop()


DRAIN = 15  # server.drain_timeout of the servers the tests stop: a call not answered by then never is


def wait_for_log(proc: ServerProcess, line: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while line not in proc.output():
        assert time.monotonic() < deadline, f"no {line!r} in the server's log:\n{proc.output()}"
        time.sleep(0.05)


def test_sigterm_answers_the_calls_in_flight_then_refuses_connections_and_exits_0(stopping_server):
    """Slow unary calls in flight and a stream open (its one request answered) when the server is told to stop:
    GOAWAY comes (NO_ERROR, covering them), the listening socket is closed, every call is answered and the stream
    ends once its client ends it, then the server closes the connection and exits 0."""
    proc = stopping_server
    raw = RawH2(proc.grpc_port)
    stream = raw.request(STREAM, grpc_message(slow_request(300, id="s300").SerializeToString()), end=False)
    raw.read_until(lambda: raw.answers[stream].data, "the stream's first answer")
    raw.corked = True  # the calls go in one write: the server reads them at once (one batch of the model)
    unary = {raw.request(INFER, grpc_message(slow_request(r).SerializeToString())): float(r)
             for r in (1500, 2000, 2500)}
    raw.uncork()
    raw.ping()  # the server has read them all
    proc.proc.send_signal(signal.SIGTERM)
    raw.read_until(lambda: raw.goaway is not None, "a GOAWAY")
    assert raw.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert raw.goaway.last_stream_id >= max(*unary, stream), raw.goaway
    with pytest.raises(ConnectionRefusedError):  # the listener is closed before the GOAWAY goes
        socket.create_connection(("127.0.0.1", proc.grpc_port), timeout=TIMEOUT).close()
    for sid, rounds in unary.items():
        answer = raw.answer(sid)
        assert answer.grpc_status == 0, answer
        assert slow_value(pb.ModelInferResponse.FromString(answer.messages()[0])) == rounds
    assert not raw.eof and not raw.answers[stream].ended  # the stream keeps the connection open
    raw.end(stream)
    answer = raw.answer(stream)
    assert answer.grpc_status == 0, answer
    (message,) = answer.messages()
    assert pb.ModelStreamInferResponse.FromString(message).infer_response.id == "s300"
    raw.read_to_eof()  # every call answered: the server closes the connection
    raw.sock.close()
    assert proc.proc.wait(TIMEOUT) == 0, proc.output()
    out = proc.output()
    assert "gRPC server stopped" in out and "Traceback" not in out, out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proc.grpc_port), timeout=TIMEOUT).close()


def test_a_stream_open_through_the_drain_is_served_after_http_has_stopped(stopping_server):
    """A tritonclient-style stream open when the server is told to stop goes on: HTTP stops at once (nothing in
    flight there), and a request the stream sends after that is still answered before the stream ends and the
    process exits 0. (gRPC and HTTP share the inference service: HTTP's end must not end it for gRPC.)"""
    proc = stopping_server
    requests: queue.Queue = queue.Queue()  # the stream's requests; None ends them
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            # the slow model's runs are long: they go to its worker threads, never inline on the event loop
            requests.put(slow_request(200, id="before"))
            stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=TIMEOUT)
            got = next(stream)
            assert got.infer_response.id == "before" and not got.error_message, got
            proc.proc.send_signal(signal.SIGTERM)
            wait_for_log(proc, "HTTP server stopped")
            requests.put(slow_request(201, id="after"))
            try:
                got = next(stream)
            except grpc.RpcError as exc:
                pytest.fail(f"the request sent on the open stream after HTTP stopped got no answer: {exc.code()} "
                            f"{exc.details()}\n{proc.output()}")
            assert got.infer_response.id == "after" and not got.error_message, got
            assert slow_value(got.infer_response) == 201.0
            requests.put(None)
            assert list(stream) == []
        assert proc.proc.wait(TIMEOUT) == 0, proc.output()
    finally:
        requests.put(None)
    out = proc.output()
    assert "gRPC server stopped" in out and "Traceback" not in out, out


def test_modelinfer_calls_whose_clients_gave_up_are_not_run(tmp_path, digits_package, expected):
    """One slow call runs (max_inflight 1, batching off) while five more wait behind it with a 0.3 s deadline:
    each fails DEADLINE_EXCEEDED at the client, which resets its stream, and the server drops it from the queue
    instead of running it afterwards (the model's statistics count one execution and five failures)."""
    slow = make_slow_package(tmp_path / "slow")
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[[models]]\npath = "{slow.root}"\nbackend = "onnxruntime"\nmax_inflight = 1\n'
                   f'inline_below_us = 0\n[models.batching]\nenabled = false\n')
    proc = serve(cfg)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            first = stub.ModelInfer.future(slow_request(15000, id="first"), timeout=TIMEOUT)  # seconds
            time.sleep(0.3)  # running now
            for i in range(5):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(slow_request(5000, id=f"late{i}"), timeout=0.3)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
            assert not first.done(), "the first call was over before the others had timed out: make it slower"
            assert slow_value(first.result()) == 15000.0
            time.sleep(2)  # a late call run after the first would have finished by now
        stats = httpx.get(f"{proc.url}/v2/models/slow/stats", timeout=TIMEOUT).json()["model_stats"][0]
        assert stats["execution_count"] == 1, stats
        assert stats["inference_stats"]["fail"]["count"] == 5, stats
        metrics = httpx.get(f"{proc.url}/metrics", timeout=TIMEOUT).text
        assert 'reason="client_gone"' in metrics
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:  # and it goes on serving
            resp = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(slow_request(5), timeout=TIMEOUT)
        assert slow_value(resp) == 5.0
    finally:
        assert proc.stop() == 0, proc.output()
