"""The loop gRPC server's front door: the HTTP server's connection limits, applied to gRPC connections.

With small limits (idle_timeout 2 s, header_timeout and body_timeout 1 s, body_min_rate 16 KiB/s,
max_connections 4, max_body_total 1.5 MiB), each test shows what a client sees and what /metrics counts:

- a connection with no call open is sent a GOAWAY and closed after idle_timeout; one making calls is not; a
  grpc channel that sat idle past it makes its next call as if nothing happened (it reconnects);
- request headers or a request message trickled in too slowly: the connection is closed with a GOAWAY
  ENHANCE_YOUR_CALM naming the setting; a large message sent slowly but above body_min_rate is answered;
- a connection beyond max_connections gets its call answered UNAVAILABLE naming the setting, and is closed;
- request messages being received count against max_body_total across connections: one that does not fit
  beside them is answered UNAVAILABLE (one larger than the whole budget RESOURCE_EXHAUSTED), while those already
  arriving go on and are answered;
- the HTTP server's request bodies and the gRPC messages being received count in one max_body_total: either
  leaves the other no room (a gRPC UNAVAILABLE, an HTTP 503), and there is room again once it is let go.

After each, a normal ModelInfer on a new channel is answered (the server keeps serving).
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("h2.connection", reason="python-hyper's h2 is not installed (pip install h2)")

import h2.errors  # noqa: E402
from test_grpc_loop_wire import (INFER, TIMEOUT, RawH2, assert_serves, digits_request, expected,  # noqa: E402,F401
                                 grpc_message, probabilities, raw_infer, rpc_error, serve_digits)

from edgerun.grpc import inference_pb2 as pb  # noqa: E402
from edgerun.grpc import inference_pb2_grpc  # noqa: E402

IDLE = 2.0  # server.idle_timeout
SLOW = 1.0  # server.header_timeout and server.body_timeout
MAX_CONNECTIONS = 4
PERIOD = min(IDLE, SLOW) / 2  # the loop server's sweep
LATE = PERIOD + 1.5  # how late a limit may take effect: one sweep, and a margin for a loaded machine


@pytest.fixture(scope="module")
def limited(tmp_path_factory, digits_package):
    proc = serve_digits(tmp_path_factory.mktemp("grpc-door"), digits_package,
                        f'max_body = "1MiB"\nmax_body_total = "1536KiB"\nidle_timeout = {IDLE}\n'
                        f'header_timeout = {SLOW}\nbody_timeout = {SLOW}\nbody_min_rate = "16KiB"\n'
                        f'max_connections = {MAX_CONNECTIONS}')
    yield proc
    assert proc.stop() == 0, proc.output()
    out = proc.output()
    assert "Traceback" not in out and "Exception in callback" not in out, out


def cuts(served) -> dict[str, float]:
    """edgerun_grpc_connections_cut by reason, from /metrics."""
    text = httpx.get(served.url + "/metrics", timeout=TIMEOUT).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^edgerun_grpc_connections_cut_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def gauge(served, name: str) -> float:
    text = httpx.get(served.url + "/metrics", timeout=TIMEOUT).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def big_request(rows: int, seed: int = 0):
    """A ModelInfer of ``rows`` digits rows: 256 bytes a row."""
    return digits_request(rows, seed)


# --- idle connections ---------------------------------------------------------------------------------------


def test_a_connection_with_no_call_gets_a_goaway_after_idle_timeout(limited, expected):
    before = cuts(limited).get("idle", 0)
    with RawH2(limited.grpc_port) as quiet, RawH2(limited.grpc_port) as used:
        raw_infer(used, 1, expected)  # a call, then nothing: idle from its answer on
        t0 = time.monotonic()
        quiet.read_to_eof(timeout=IDLE + LATE)
        used.read_to_eof(timeout=IDLE + LATE)
        waited = time.monotonic() - t0
        for raw in (quiet, used):
            assert raw.goaway is not None and raw.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR, raw.goaway
    assert waited >= IDLE - PERIOD - 0.2, f"closed after {waited:.2f} s, before server.idle_timeout ({IDLE} s)"
    assert cuts(limited)["idle"] >= before + 2
    assert_serves(limited, expected)


def test_a_connection_making_calls_is_not_idle(limited, expected):
    """Calls every IDLE/4 s for 2.5 × idle_timeout, none open at most moments: the connection stays."""
    with RawH2(limited.grpc_port) as raw:
        t_end = time.monotonic() + 2.5 * IDLE
        seed = 0
        while time.monotonic() < t_end:
            raw_infer(raw, seed, expected)
            seed += 1
            time.sleep(IDLE / 4)
        assert raw.goaway is None and not raw.eof


def test_a_grpc_channel_idle_past_the_timeout_calls_again_unharmed(limited, expected):
    """The server closes the idle connection; the channel's next call reconnects and is answered."""
    with grpc.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for seed in (1, 2):
            x, req = digits_request(2, seed)
            resp = stub.ModelInfer(req, timeout=TIMEOUT)
            np.testing.assert_allclose(probabilities(resp), expected(x), rtol=1e-5, atol=1e-6)
            if seed == 1:
                time.sleep(IDLE + LATE)


# --- slow requests ------------------------------------------------------------------------------------------


def goaway_of(data: bytes) -> tuple[int, bytes] | None:
    """(error code, debug data) of the GOAWAY among raw HTTP/2 frames from the server, if there is one."""
    while len(data) >= 9:
        size, kind = int.from_bytes(data[:3], "big"), data[3]
        if kind == 0x7:
            payload = data[9:9 + size]
            return int.from_bytes(payload[4:8], "big"), payload[8:]
        data = data[9 + size:]
    return None


def test_request_headers_not_all_in_within_header_timeout_are_cut(limited, expected):
    """A call's HEADERS frame all but its last byte, then nothing (not even the SETTINGS acknowledgement, which
    would complete the frame): the connection is closed with GOAWAY ENHANCE_YOUR_CALM naming the setting."""
    before = cuts(limited).get("header_timeout", 0)
    with RawH2(limited.grpc_port) as raw:
        raw.corked = True
        raw.request(INFER, end=False)
        head = raw.conn.data_to_send()
        raw.sock.sendall(head[:-1])
        t0 = time.monotonic()
        got = b""
        raw.sock.settimeout(SLOW + 2 * LATE)
        while chunk := raw.sock.recv(1 << 16):  # read, but give h2 nothing to answer
            got += chunk
        took = time.monotonic() - t0
    assert goaway_of(got) is not None, got
    error, debug = goaway_of(got)
    assert error == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM and b"server.header_timeout" in debug, (error, debug)
    assert took >= SLOW - 0.2, f"cut after {took:.2f} s, before server.header_timeout ({SLOW} s)"
    assert cuts(limited)["header_timeout"] == before + 1
    assert_serves(limited, expected)


def test_a_trickled_request_message_is_cut(limited, expected):
    before = cuts(limited).get("body_timeout", 0)
    x, req = big_request(400)
    body = grpc_message(req.SerializeToString())
    with RawH2(limited.grpc_port) as raw:
        sid = raw.request(INFER, end=False)
        t0 = time.monotonic()
        for i in range(0, len(body), 64):  # 64 bytes every 0.1 s: 640 B/s, far below 16 KiB/s
            try:
                raw.send(sid, body[i:i + 64])
            except OSError:
                raw.read_to_eof()
                break
            raw._read(0.1)
            if raw.eof:
                break
        else:
            pytest.fail("the trickled message was never cut")
        took = time.monotonic() - t0
        assert raw.goaway is not None and raw.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert b"server.body_min_rate" in (raw.goaway.additional_data or b""), raw.goaway
    assert took <= 2 * SLOW + 2 * LATE, took
    assert cuts(limited)["body_timeout"] == before + 1
    assert_serves(limited, expected)


def test_a_large_message_sent_slowly_but_above_the_minimum_rate_is_answered(limited, expected):
    """About 100 KiB/s (above 16 KiB/s) for 4 × body_timeout: answered, and right."""
    x, req = big_request(1600)  # 400 KiB
    body = grpc_message(req.SerializeToString())
    with RawH2(limited.grpc_port) as raw:
        sid = raw.request(INFER, end=False)
        step = 10 << 10
        for i in range(0, len(body), step):
            raw.send(sid, body[i:i + step])
            time.sleep(0.1)
        raw.end(sid)
        answer = raw.answer(sid)
        assert answer.grpc_status == 0, answer
        resp = pb.ModelInferResponse.FromString(answer.messages()[0])
        np.testing.assert_allclose(probabilities(resp), expected(x), rtol=1e-5, atol=1e-6)
        assert raw.goaway is None


# --- the connection cap -------------------------------------------------------------------------------------


def wait_for_open(served, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while gauge(served, "edgerun_grpc_connections_open") != n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gauge(served, "edgerun_grpc_connections_open") == n


def test_a_connection_beyond_max_connections_is_answered_unavailable(limited, expected):
    before = cuts(limited).get("connection_limit", 0)
    wait_for_open(limited, 0)  # the connections of the tests before are gone
    held = [RawH2(limited.grpc_port) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, raw in enumerate(held):
            raw_infer(raw, i, expected)  # each one accepted and serving
        assert gauge(limited, "edgerun_grpc_connections_open") == MAX_CONNECTIONS
        x, req = digits_request(2, 7)
        with grpc.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
            err = rpc_error(inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "server.max_connections" in err.details() and str(MAX_CONNECTIONS) in err.details()
        raw_infer(held[0], 9, expected)  # those within the limit go on
    finally:
        for raw in held:
            raw.sock.close()
    assert cuts(limited)["connection_limit"] >= before + 1
    wait_for_open(limited, 0)
    assert_serves(limited, expected)  # room again


# --- request bytes held across connections ------------------------------------------------------------------


def test_request_messages_being_received_count_against_max_body_total(limited, expected):
    """1 MiB arriving on one connection: a second 1 MiB message on another does not fit in 1.5 MiB (UNAVAILABLE,
    naming server.max_body_total) while the first, completed, is answered; then there is room again."""
    x1, req1 = big_request(4000)  # 1,024,000 bytes of tensor data
    first = grpc_message(req1.SerializeToString())
    x2, req2 = big_request(4000, seed=1)
    with RawH2(limited.grpc_port) as raw, grpc.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        sid = raw.request(INFER, end=False)
        raw.send(sid, first[:200_000])
        raw.ping()  # the server has read the message's prefix: its whole size is held
        assert gauge(limited, "edgerun_grpc_request_bytes_held") >= len(first) - 5
        err = rpc_error(stub.ModelInfer, req2)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "server.max_body_total" in err.details() and "retry later" in err.details()
        raw.send(sid, first[200_000:], end=True)
        answer = raw.answer(sid)
        assert answer.grpc_status == 0, answer
        resp = pb.ModelInferResponse.FromString(answer.messages()[0])
        np.testing.assert_allclose(probabilities(resp), expected(x1), rtol=1e-5, atol=1e-6)
        assert gauge(limited, "edgerun_grpc_request_bytes_held") == 0
        resp = stub.ModelInfer(req2, timeout=TIMEOUT)  # room again
        np.testing.assert_allclose(probabilities(resp), expected(x2), rtol=1e-5, atol=1e-6)
    assert_serves(limited, expected)


class HeldHttpBody:
    """An HTTP infer request declaring ``declared`` body bytes of which ``sent`` are sent, the rest never."""

    def __init__(self, served, declared: int, sent: int):
        self.sock = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
        self.sock.sendall(f"POST /v2/models/digits/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                          f"content-type: application/json\r\ncontent-length: {declared}\r\n\r\n".encode())
        self.sock.sendall(b" " * sent)

    def close(self) -> None:
        self.sock.close()


def wait_for_gauge(served, name: str, done) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done(gauge(served, name)):
        assert time.monotonic() < deadline, f"{name} is {gauge(served, name)}"
        time.sleep(0.02)


def test_http_bodies_and_grpc_messages_share_max_body_total(tmp_path, digits_package, expected):
    """Two HTTP bodies holding 1,540,000 of the 1.5 MiB of server.max_body_total (patient timeouts): a 100 KB gRPC
    message no longer fits (UNAVAILABLE, "retry later"), one under 64 KiB is still let in and answered, and once
    the HTTP clients leave a 1 MiB message is answered."""
    proc = serve_digits(tmp_path, digits_package, 'max_body = "1MiB"\nmax_body_total = "1536KiB"\n'
                                                  'body_timeout = 60\nheader_timeout = 60')
    bodies = []
    try:
        # (each declared size fits beside what is held when its head arrives: else a 503 before its body)
        bodies = [HeldHttpBody(proc, 810_000, 800_000)]
        wait_for_gauge(proc, "edgerun_request_body_bytes_held", lambda v: v >= 800_000)
        bodies.append(HeldHttpBody(proc, 760_000, 740_000))
        wait_for_gauge(proc, "edgerun_request_body_bytes_held", lambda v: v >= 1_540_000)
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            err = rpc_error(stub.ModelInfer, big_request(400)[1])  # 102,400 bytes of tensor data
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
            assert "server.max_body_total" in err.details() and "retry later" in err.details()
            xs, small = big_request(200, seed=2)  # 51,200 bytes: over the room left, but small enough to get in
            np.testing.assert_allclose(probabilities(stub.ModelInfer(small, timeout=TIMEOUT)), expected(xs),
                                       rtol=1e-5, atol=1e-6)
            for body in bodies:
                body.close()
            wait_for_gauge(proc, "edgerun_request_body_bytes_held", lambda v: v == 0)
            x, req = big_request(4000)
            np.testing.assert_allclose(probabilities(stub.ModelInfer(req, timeout=TIMEOUT)), expected(x),
                                       rtol=1e-5, atol=1e-6)
        assert_serves(proc, expected)
    finally:
        for body in bodies:
            body.close()
        assert proc.stop() == 0, proc.output()


def test_a_grpc_message_arriving_leaves_no_room_for_a_large_http_body(limited, expected):
    """A 1 MiB gRPC message arriving: an HTTP request declaring 600 KB gets 503 with Retry-After naming
    server.max_body_total before its body is read; the gRPC call, completed, is answered, and then the HTTP
    request fits."""
    x, req = big_request(4000)
    message = grpc_message(req.SerializeToString())
    with RawH2(limited.grpc_port) as raw:
        sid = raw.request(INFER, end=False)
        raw.send(sid, message[:200_000])
        raw.ping()  # the server has read the message's prefix: its whole size is held
        with socket.create_connection(("127.0.0.1", limited.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                         b"content-type: application/json\r\ncontent-length: 600000\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, text = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in head.lower(), head
        assert "server.max_body_total" in text.decode() and "gRPC" in text.decode(), text
        raw.send(sid, message[200_000:], end=True)
        done = raw.answer(sid)
        assert done.grpc_status == 0, done
        np.testing.assert_allclose(probabilities(pb.ModelInferResponse.FromString(done.messages()[0])), expected(x),
                                   rtol=1e-5, atol=1e-6)
    rows = np.random.default_rng(5).random((600, 64), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [600, 64], "datatype": "FP32",
                                   "data": rows.ravel().tolist()}]}).encode()
    assert len(body) > 600_000
    resp = httpx.post(limited.url + "/v2/models/digits/infer", content=body, timeout=TIMEOUT,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(np.array(resp.json()["outputs"][0]["data"], np.float32).reshape(600, 10),
                               expected(rows), rtol=1e-4, atol=1e-5)
    assert_serves(limited, expected)


def test_a_message_larger_than_max_body_total_is_refused_outright(tmp_path, digits_package, expected):
    """max_body 1 MiB but max_body_total 512 KiB: a 1 MiB message can never fit (RESOURCE_EXHAUSTED)."""
    proc = serve_digits(tmp_path, digits_package, 'max_body = "1MiB"\nmax_body_total = "512KiB"')
    try:
        x, req = big_request(4000)
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            err = rpc_error(inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
        assert "server.max_body_total" in err.details()
        assert_serves(proc, expected)
    finally:
        assert proc.stop() == 0, proc.output()



@pytest.mark.parametrize("frontend", ["native", "grpcio"])
def test_grpcs_own_servers_send_an_idle_connection_a_goaway(tmp_path, digits_package, expected, frontend):
    """The native and grpcio servers take server.idle_timeout as gRPC's max_connection_idle."""
    from edgerun.grpc.server import native_available

    if frontend == "native" and native_available("_native") is not None:
        pytest.skip(f"the native gRPC server is not built: {native_available('_native')}")
    proc = serve_digits(tmp_path, digits_package, f"idle_timeout = {IDLE}", EDGERUN_SERVER_GRPC_FRONTEND=frontend)
    try:
        assert f"({frontend} server)" in proc.output()
        with RawH2(proc.grpc_port) as raw:
            raw_infer(raw, 3, expected)
            t0 = time.monotonic()
            raw.read_until(lambda: raw.goaway is not None, "a GOAWAY", timeout=IDLE + 10)
            waited = time.monotonic() - t0
        assert waited >= IDLE - 0.5, f"a GOAWAY after {waited:.2f} s, before server.idle_timeout ({IDLE} s)"
        assert_serves(proc, expected)
    finally:
        assert proc.stop() == 0, proc.output()
