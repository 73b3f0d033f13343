"""Hostile clients on raw sockets: slow heads and bodies, idle and surplus connections, held and huge bodies,
deep JSON, compressed bodies; each is cut or refused with a clear status, counted, and the server keeps serving."""

from __future__ import annotations

import fcntl
import gzip
import select
import socket
import struct
import termios
import time
import zlib
from typing import Callable

import httpx
import numpy as np
import orjson
import pytest

from edgerun.testing.serving import ServerProcess, reference

GOOD = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.25] * 64}]})
MiB = 1 << 20


@pytest.fixture(scope="module")
def tight(digits_package, tmp_path_factory):
    """A server with short timeouts and room for six connections."""
    cfg = tmp_path_factory.mktemp("tight") / "edgerun.toml"
    cfg.write_text(f"""
[server]
header_timeout = 1
body_timeout = 1
body_min_rate = "1KiB"
idle_timeout = 2
max_connections = 6

[[models]]
path = "{digits_package.root}"
""")
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    proc.package = digits_package
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def roomy(digits_package, tmp_path_factory):
    """A server taking bodies of up to 64 MiB, and holding at most 48 MiB of them at once."""
    cfg = tmp_path_factory.mktemp("roomy") / "edgerun.toml"
    cfg.write_text(f"""
[server]
max_body = "64MiB"
max_body_total = "48MiB"

[[models]]
path = "{digits_package.root}"
""")
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    proc.package = digits_package
    yield proc
    assert proc.stop() == 0, proc.output()


def _connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _head(method: str, path: str, length: int = 0, headers: dict[str, str] | None = None) -> bytes:
    fields = {"Host": "edgerun", "Content-Length": str(length), **(headers or {})}
    return "\r\n".join([f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items()), "", ""]).encode()


def _response(s: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One response, read by its Content-Length."""
    s.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(1 << 16)
        assert chunk, f"connection closed before a response: {buf[:200]!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(1 << 16)
        assert chunk, "connection closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed(s: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (what it sent first is skipped)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            try:
                if not s.recv(1 << 16):
                    return True
            except ConnectionResetError:
                return True
    return False


def _metric(server, sample: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _held_when(server, reached: Callable[[float], bool], within: float) -> float:
    """The request-body bytes the server holds, once ``reached`` says so or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    held = _metric(server, "edgerun_request_body_bytes_held")
    while not reached(held) and time.monotonic() < deadline:
        time.sleep(0.05)
        held = _metric(server, "edgerun_request_body_bytes_held")
    return held


def _cuts(server, reason: str) -> float:
    return _metric(server, f'edgerun_connections_cut_total{{reason="{reason}"}}')


def _serves(server) -> None:
    """A normal inference still gets the right answer."""
    x = np.full((1, 64), 0.25, np.float32)
    r = httpx.post(server.url + "/v2/models/digits/infer", content=GOOD, timeout=10)
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, reference(server.package, x), rtol=1e-5, atol=1e-6)


def _trickle(s: socket.socket, piece: bytes, every: float, within: float) -> bytes:
    """Send ``piece`` every ``every`` seconds until the server answers and closes (or ``within`` passes)."""
    got = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        ready, _, _ = select.select([s], [], [], every)
        if ready:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    else:
        return got + b"<still open>"
    s.settimeout(2)
    try:
        while chunk := s.recv(1 << 16):
            got += chunk
    except OSError:
        pass
    return got


def test_a_trickled_request_head_is_cut_after_header_timeout(tight):
    before = _cuts(tight, "header_timeout")
    with _connect(tight) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        got = _trickle(s, b"X-Slow: 1\r\n", every=0.2, within=15)
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b"server.header_timeout" in got
    assert _cuts(tight, "header_timeout") == before + 1
    _serves(tight)


def test_a_trickled_request_body_is_cut(tight):
    before = _cuts(tight, "body_timeout")
    with _connect(tight) as s:
        s.sendall(_head("POST", "/v2/models/digits/infer", 100_000))
        got = _trickle(s, b"0" * 10, every=0.2, within=15)
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b"server.body_min_rate" in got
    assert _cuts(tight, "body_timeout") == before + 1
    _serves(tight)


def test_idle_connections_are_closed(tight):
    before = _cuts(tight, "idle")
    with _connect(tight) as fresh, _connect(tight) as used:
        used.sendall(_head("GET", "/v2/health/live"))
        assert _response(used)[0] == 200
        assert _closed(used, within=15), "a keep-alive connection stayed open past idle_timeout"
        assert _closed(fresh, within=15), "a connection that never sent a request stayed open"
    assert _cuts(tight, "idle") == before + 2
    _serves(tight)


def test_a_connection_in_use_is_not_cut_as_idle(tight):
    """The idle timer is not armed again per request: used every 0.4 s for twice idle_timeout, a connection stays
    open, and it is cut once it has been idle for idle_timeout."""
    before = _cuts(tight, "idle")
    with _connect(tight) as s:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            s.sendall(_head("GET", "/v2/health/live"))
            assert _response(s)[0] == 200, "a connection in use was cut"
            time.sleep(0.4)
        assert _cuts(tight, "idle") == before
        assert _closed(s, within=15), "the connection stayed open past idle_timeout once idle"
    assert _cuts(tight, "idle") == before + 1


def test_connections_beyond_the_cap_are_refused(tight):
    before = _cuts(tight, "connection_limit")
    time.sleep(0.2)  # the connection that read the metrics is gone
    held = [_connect(tight) for _ in range(6)]
    try:
        for s in held:  # each one accepted and served
            s.sendall(_head("GET", "/v2/health/live"))
            assert _response(s)[0] == 200
        with _connect(tight) as extra:
            status, headers, body = _response(extra)
            assert status == 503 and headers["retry-after"] == "1"
            assert "server.max_connections" in orjson.loads(body)["error"]
            assert _closed(extra, within=5)
        held.pop().close()
        time.sleep(0.2)
        with _connect(tight) as again:
            again.sendall(_head("GET", "/v2/health/live"))
            assert _response(again)[0] == 200
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert _cuts(tight, "connection_limit") == before + 1
    _serves(tight)


def test_request_bodies_held_beyond_the_cap_are_refused_while_the_server_serves(roomy):
    before = _cuts(roomy, "body_budget")
    with _connect(roomy) as holder:
        holder.sendall(_head("POST", "/v2/models/digits/infer", 30 * MiB) + b" " * (25 * MiB))
        _held_when(roomy, lambda held: held >= 25 * MiB, within=20)
        with _connect(roomy) as late:
            late.sendall(_head("POST", "/v2/models/digits/infer", 30 * MiB))
            status, headers, body = _response(late, timeout=5)
            assert status == 503 and headers["retry-after"] == "1", body
            assert "server.max_body_total" in orjson.loads(body)["error"]
        with _connect(roomy) as huge:
            huge.sendall(_head("POST", "/v2/models/digits/infer", 50 * MiB))
            status, _, body = _response(huge, timeout=5)
            assert status == 413 and "server.max_body_total" in orjson.loads(body)["error"]
        assert httpx.get(roomy.url + "/v2/health/ready", timeout=10).status_code == 200
        _serves(roomy)
    held = _held_when(roomy, lambda held: held == 0, within=10)
    assert held == 0, "the held body was not let go with its client"
    assert _cuts(roomy, "body_budget") == before + 2


def _binary_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer body for ``x`` (the digits input) and its headers."""
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def test_binary_tensor_bodies_of_megabytes_are_answered_and_held_like_any_body(roomy, digits_package):
    """A binary-tensor body of megabytes, sent in many writes, is read whole and answered right; one held open
    counts against server.max_body_total (a second does not fit) until its client leaves."""
    x = np.random.default_rng(4).random((16384, 64), dtype=np.float32)  # 4 MiB
    body, headers = _binary_request(x)
    with _connect(roomy) as s:
        s.sendall(_head("POST", "/v2/models/digits/infer", len(body), headers))
        for i in range(0, len(body), 100_000):
            s.sendall(body[i:i + 100_000])
        status, answer_headers, answer = _response(s, timeout=30)
        assert status == 200, answer[:300]
        n = int(answer_headers["inference-header-content-length"])
        got = np.frombuffer(answer[n:], np.float32).reshape(16384, 10)
        np.testing.assert_allclose(got, reference(digits_package, x), rtol=1e-5, atol=1e-6)
        s.sendall(_head("POST", "/v2/models/digits/infer", len(GOOD)) + GOOD)  # the connection goes on
        assert _response(s)[0] == 200

    before = _cuts(roomy, "body_budget")
    big, headers = _binary_request(np.zeros((122_880, 64), np.float32))  # 30 MiB
    with _connect(roomy) as holder:
        holder.sendall(_head("POST", "/v2/models/digits/infer", len(big), headers) + big[:25 * MiB])
        assert _held_when(roomy, lambda held: held >= 25 * MiB, within=20) >= 25 * MiB
        with _connect(roomy) as late:
            late.sendall(_head("POST", "/v2/models/digits/infer", len(big), headers))
            status, response_headers, answer = _response(late, timeout=5)
            assert status == 503 and response_headers["retry-after"] == "1", answer
        _serves(roomy)
    held = _held_when(roomy, lambda held: held == 0, within=10)
    assert held == 0, "the held body was not let go with its client"
    assert _cuts(roomy, "body_budget") == before + 1
    _serves(roomy)


def _outgoing(s: socket.socket) -> int:
    """Bytes sent on ``s`` that the peer has not acknowledged yet."""
    return struct.unpack("I", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def test_health_answers_while_a_40_MB_json_body_is_decoded(roomy):
    """The health answer comes before the big request's, which is decoded in full and then refused.

    All but the body's last byte is sent and read first; the last byte starts the decode, and the health
    request follows it: on the event loop the decode would hold the health request until the big answer is out.
    """
    rows = 78_125
    row = b"[" + b",".join([b"0.12345"] * 64) + b"]"
    body = (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [%d, 64], "data": [' % (rows + 1)
            + b",".join([row] * rows) + b"]}]}")
    assert len(body) > 40_000_000
    with _connect(roomy) as big, _connect(roomy) as health:
        big.sendall(_head("POST", "/v2/models/digits/infer", len(body)) + body[:-1])
        deadline = time.monotonic() + 20
        while _outgoing(big) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        big.sendall(body[-1:])
        time.sleep(0.02)
        health.sendall(_head("GET", "/v2/health/live"))
        assert _response(health)[0] == 200
        answered, _, _ = select.select([big], [], [], 0)
        assert not answered, "the big request was answered before health: its body was decoded on the event loop"
        status, _, answer = _response(big, timeout=60)
    assert status == 400 and "needs 5000064 elements but 'data' has 5000000" in orjson.loads(answer)["error"]
    _serves(roomy)


def test_large_json_bodies_decode_as_small_ones_do(roomy, digits_package):
    x = np.random.default_rng(3).random((3000, 64), dtype=np.float32)
    want = reference(digits_package, x)
    url = roomy.url + "/v2/models/digits/infer"
    for data in (x.tolist(), x.reshape(-1).tolist()):
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [3000, 64], "datatype": "FP32", "data": data}]})
        assert len(body) > 2 * MiB
        r = httpx.post(url, content=body, timeout=30)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3000, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ragged = x.tolist()
    ragged[-1] = ragged[-1][:-1]
    ragged[-2].append(0.5)
    for data, message in ((ragged, "data is not a list of FP32 values"), (["0.5"] * (3000 * 64), "found strings")):
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [3000, 64], "datatype": "FP32", "data": data}]})
        r = httpx.post(url, content=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [3000, 64], "datatype": "FP32", "data": x.tolist()}]})
    r = httpx.post(url, content=body[:-1000], timeout=30)
    assert r.status_code == 400 and "truncated" in r.json()["error"], r.text
    _serves(roomy)


@pytest.mark.parametrize("model,body,message", [
    ("digits", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested more than 1024 levels deep"),
    ("echo", b'{"inputs": [{"name": "in_BYTES", "shape": [1, 1], "datatype": "BYTES", "data": ' + b"[" * 1000
     + b'"a"' + b"]" * 1000 + b"}]}", "nested more than 64 levels deep"),
], ids=["document", "tensor data"])
def test_deeply_nested_json_is_a_400(server, model, body, message):
    r = httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, timeout=10)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert httpx.post(server.url + "/v2/models/digits/infer", content=GOOD, timeout=10).status_code == 200


@pytest.mark.parametrize("method,path,allow", [("DELETE", "/v2/health/live", "GET, HEAD"),
                                               ("PUT", "/v2/models/digits", "GET, HEAD"),
                                               ("GET", "/v2/repository/index", "POST"),
                                               ("POST", "/metrics", "GET, HEAD"),
                                               ("GET", "/v2/models/digits/infer", "POST")])
def test_405_names_the_allowed_methods(roomy, method, path, allow):
    r = httpx.request(method, roomy.url + path, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == allow, (r.headers, r.text)
    assert "not allowed" in r.json()["error"]


@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                               ("deflate", lambda b: zlib.compress(b, wbits=-15)),
                                               ("gzip, identity", gzip.compress)],
                         ids=["gzip", "deflate", "raw deflate", "gzip, identity"])
def test_compressed_bodies_are_decompressed(roomy, encoding, compress):
    r = httpx.post(roomy.url + "/v2/models/digits/infer", content=compress(GOOD),
                   headers={"content-encoding": encoding}, timeout=10)
    assert r.status_code == 200, r.text
    want = reference(roomy.package, np.full((1, 64), 0.25, np.float32))
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]), want.reshape(-1), rtol=1e-5, atol=1e-6)


def test_a_zip_bomb_is_a_413_and_an_unknown_encoding_a_415(roomy):
    bomb = gzip.compress(b" " * (70 * MiB), compresslevel=9)
    assert len(bomb) < MiB
    r = httpx.post(roomy.url + "/v2/models/digits/infer", content=bomb, headers={"content-encoding": "gzip"},
                   timeout=30)
    assert r.status_code == 413 and "decompresses to more than" in r.json()["error"], r.text
    r = httpx.post(roomy.url + "/v2/models/digits/infer", content=GOOD, headers={"content-encoding": "br"}, timeout=10)
    assert r.status_code == 415 and r.headers["accept-encoding"] == "gzip, deflate", r.text
    assert "'br' is not supported" in r.json()["error"]
    r = httpx.post(roomy.url + "/v2/models/digits/infer", content=gzip.compress(GOOD)[:-8],
                   headers={"content-encoding": "gzip"}, timeout=10)
    assert r.status_code == 400 and "gzip" in r.json()["error"], r.text
    _serves(roomy)


def test_a_trailing_slash_is_served_without_a_redirect(roomy):
    with _connect(roomy) as s:
        s.sendall(b"GET /v2/health/ready/ HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: 0\r\n\r\n")
        status, headers, body = _response(s)
        assert status == 200 and "location" not in headers and orjson.loads(body) == {"ready": True}
        s.sendall(_head("POST", "/v2/models/digits/infer/", len(GOOD), {"Host": "attacker.example"}) + GOOD)
        status, headers, body = _response(s)
        assert status == 200 and "location" not in headers, body
        s.sendall(_head("GET", "/v2/models/digits/", 0, {"Host": "attacker.example"}))
        status, headers, body = _response(s)
        assert status == 200 and orjson.loads(body)["name"] == "digits"
        assert b"attacker" not in body


def test_metrics_export_the_process_memory(roomy):
    text = httpx.get(roomy.url + "/metrics", timeout=10).text
    rss = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("process_resident_memory_bytes ")]
    assert rss and rss[0] > 10 * MiB, text[:500]
    assert "python_info{" in text and "edgerun_connections_open " in text
