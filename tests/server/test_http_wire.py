"""HTTP/1.1 on the wire, read from a raw socket: pipelining, Connection: close, a large answer to a slow reader."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import orjson

from edgerun.server.codec import encode_request
from edgerun.tensors import DATATYPE_TO_DTYPE
from edgerun.testing.serving import ALL_DATATYPES, reference

INFER_JSON = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})


def _connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: edgerun", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Reader:
    """Responses read off one connection, one at a time, by Content-Length."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed inside a response head: {self.buf[:200]!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            assert self._fill(), f"connection closed after {len(self.buf)} of {length} body bytes"
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        return not self.buf and not self._fill()


def test_pipelined_requests_are_answered_in_order(server):
    with _connect(server) as s:
        s.sendall(_request("GET", "/v2/health/ready")
                  + _request("POST", "/v2/models/digits/versions/1/infer", INFER_JSON, {"Content-Type": "application/json"})
                  + _request("POST", "/v2/models/nosuchmodel/infer", INFER_JSON)
                  + _request("GET", "/v2/models/digits/versions/2"))
        r = _Reader(s)
        status, _, _ = r.response()
        assert status == 200
        status, _, body = r.response()
        assert status == 200 and orjson.loads(body)["model_version"] == "1"
        status, _, body = r.response()
        assert status == 404 and "nosuchmodel" in orjson.loads(body)["error"]
        status, _, body = r.response()
        assert status == 200 and orjson.loads(body)["name"] == "digits"


def test_large_bodies_followed_by_more_requests_in_the_same_writes_are_answered_in_order(server, digits_package):
    """Large binary-tensor bodies (read straight into their buffers) with the next request right behind each, in
    one write and split at odd places: each answer is right and in order, none takes bytes of the next."""
    rng = np.random.default_rng(11)
    xs = [rng.random((n, 64), dtype=np.float32) for n in (3000, 1500, 3500)]  # under the 1 MiB max_body
    wire = b""
    for x in xs:
        body, hlen = encode_request({"input": x}, binary=True, outputs=["probabilities"])
        wire += _request("POST", "/v2/models/digits/versions/1/infer", body,
                         {"Inference-Header-Content-Length": str(hlen)})
    wire += _request("GET", "/v2/health/ready")
    for cuts in ([], [77, 300_001, 800_000, 1_300_000]):
        with _connect(server) as s:
            start = 0
            for end in [*cuts, len(wire)]:
                s.sendall(wire[start:end])
                start = end
                time.sleep(0.02)
            r = _Reader(s)
            for x in xs:
                status, headers, body = r.response()
                assert status == 200, body[:300]
                n = int(headers["inference-header-content-length"])
                got = np.frombuffer(body[n:], np.float32).reshape(len(x), 10)
                np.testing.assert_allclose(got, reference(digits_package, x), rtol=1e-5, atol=1e-6)
            assert r.response()[0] == 200


def test_connection_close_gets_the_whole_answer_then_eof(server):
    with _connect(server) as s:
        s.sendall(_request("POST", "/v2/models/digits/infer", INFER_JSON, {"Connection": "close"}))
        r = _Reader(s)
        status, headers, body = r.response()
        assert status == 200 and headers.get("connection") == "close"
        assert len(orjson.loads(body)["outputs"][0]["data"]) == 10
        assert r.closed(), "the server kept the connection open after Connection: close"


def test_back_to_back_infer_requests_answered_in_order_then_http10_closes(server):
    """Several small infer requests in one write (the listener answers them without the ASGI layer, one at a time),
    each with its own id, then an HTTP/1.0 request, whose answer ends the connection."""
    docs = [orjson.dumps({"id": f"r{i}", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                     "data": [i / 10] * 64}]}) for i in range(5)]
    with _connect(server) as s:
        s.sendall(b"".join(_request("POST", "/v2/models/digits/infer", d) for d in docs)
                  + _request("POST", "/v2/models/digits/infer", docs[0]).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        r = _Reader(s)
        ids = [orjson.loads(r.response()[2])["id"] for _ in docs]
        status, headers, body = r.response()
        assert ids == [f"r{i}" for i in range(5)] and status == 200 and orjson.loads(body)["id"] == "r0"
        assert headers.get("connection") == "close" and r.closed()


def test_a_large_answer_reaches_a_slow_reader_whole(server):
    """A ~1 MB binary answer: the reader waits before reading, so the server's writes back up."""
    big = np.arange(900_000, dtype=np.uint8).reshape(1, -1)
    inputs = {f"in_{dt}": np.zeros((1, 1), DATATYPE_TO_DTYPE[dt]) for dt in ALL_DATATYPES if dt != "BYTES"}
    inputs["in_BYTES"] = np.array([[b"x"]], dtype=object)
    inputs["in_UINT8"] = big
    body, hlen = encode_request(inputs, binary=True, outputs=["out_UINT8"])
    with _connect(server) as s:
        s.sendall(_request("POST", "/v2/models/echo/infer", body, {"Inference-Header-Content-Length": str(hlen)}))
        time.sleep(0.5)
        status, headers, got = _Reader(s).response()
    assert status == 200, got[:300]
    n = int(headers["inference-header-content-length"])
    head = orjson.loads(got[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == big.size
    assert got[n:] == big.tobytes()


def test_writes_of_one_loop_iteration_leave_as_one_send_and_close_flushes_first():
    from edgerun.server.http import _CorkedTransport

    class Recorder:
        def __init__(self):
            self.sent: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            assert not self.closed, "wrote after close"
            self.sent.append(bytes(data))

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def get_extra_info(self, name: str):
            return ("127.0.0.1", 8000) if name == "sockname" else None

    async def scenario():
        raw = Recorder()
        t = _CorkedTransport(raw, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"ok")
        assert raw.sent == [], "nothing leaves before the loop iteration ends"
        await asyncio.sleep(0)
        assert raw.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        t.write(b"last")
        t.close()
        assert raw.sent[-1] == b"last" and raw.closed
        assert t.get_extra_info("sockname") == ("127.0.0.1", 8000)

    asyncio.run(scenario())
