"""The HTTP listener: uvicorn (uvloop + httptools) on TCP and/or a Unix socket, with a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import stat
from array import array
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httptools
import numpy as np
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from edgerun.config import ServerConfig
from edgerun.errors import ConfigError
from edgerun.server.offload import INLINE_MAX
from edgerun.serving.limits import HELD, SMALL_REQUEST, ConnectionLimits
from edgerun.serving.tls import ServerTls, server_tls

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False



def bind(host: str, port: int, key: str | None = None) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: any free port).

    The protocol is named: asyncio sets TCP_NODELAY only on connections accepted from an IPPROTO_TCP
    socket, and without it every response after a connection's first waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}", key=key) from None
    sock.set_inheritable(True)
    return sock

class _CorkedTransport:
    """A transport whose writes in one event-loop iteration leave in one send.

    uvicorn writes a response's status line and headers, then its body: two system calls, and two TCP
    segments, for every answer. Joining them is the largest single saving on small inference requests
    (measured by ``benchmarks/serve.py``). Data is flushed at the end of the loop iteration that wrote it,
    and always before the transport closes.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def write_whole(self, data: bytes) -> None:
        """Write a whole response: sent at once, unless something written in this iteration waits to go first."""
        if self._pending:
            self._pending.append(data)
        elif not self._transport.is_closing():
            self._transport.write(data)

    def _flush(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


CUT_REASONS = ("idle", "header_timeout", "body_timeout", "connection_limit", "body_budget")


class FrontDoor(ConnectionLimits):
    """What a server's connections share: their limits, the request-body bytes they hold, and what was cut.

    ``held`` counts this server's bodies (its /metrics gauge); ``server.max_body_total`` bounds them together
    with every other listener's request bytes (``total``: the gRPC messages being received too).
    """

    def __init__(self, config: ServerConfig, held: array = HELD):
        super().__init__(config, CUT_REASONS, held)
        self.max_body = config.max_body
        self.headroom = config.max_body_total - config.max_body  # while the total is below, any allowed body fits
        self.held = 0  # request-body bytes received for requests not answered yet

    def add(self, n: int) -> None:
        self.held += n
        self.total[0] += n

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        """(status, message) for a request whose declared body does not fit beside those held, else None."""
        for name, value in headers:
            if name == b"content-length":
                if not value.isdigit():
                    return None  # the app answers that
                size = int(value)
                break
        else:
            return None  # chunked: counted as it arrives
        if size <= SMALL_REQUEST:
            return None
        if size > self.max_held:
            return 413, (f"request body of {size} bytes exceeds the {self.max_held} bytes of requests the server "
                         "holds at once (server.max_body_total)")
        held = self.total[0]
        if held + size > self.max_held:
            return 503, (f"the server holds {held} bytes of requests (HTTP and gRPC) and takes at most "
                         f"{self.max_held} (server.max_body_total): no room for {size} more now; retry later")
        return None


_DONE, _HEAD, _BODY = range(3)  # the request being read: none (or all of it), its head, its body
_INFER_PREFIX, _INFER_SUFFIX = b"/v2/models/", b"/infer"


class _InferCycle:
    """One ``POST .../infer`` answered without the ASGI machinery or a task: its whole body is gathered in one
    buffer and handed to the app's ``answer_soon`` once it has arrived, and the answer is written to the transport
    in one piece. When the client leaves first, the request is cancelled (a queued run is dropped).

    It stands where uvicorn keeps a request's ``RequestResponseCycle`` and has the attributes the protocol
    reads there (``body``, ``more_body``, ``response_started``, ``response_complete``, ``disconnected``,
    ``keep_alive``, ``scope``); ``message_event.set()``, which the protocol calls when body arrives, the body
    ends or the client leaves, is ``self.set()``.
    """

    __slots__ = ("protocol", "scope", "keep_alive", "body", "filled", "more_body", "response_started",
                 "response_complete", "disconnected", "started", "run")

    def __init__(self, protocol: "_HttpProtocol", scope: dict, keep_alive: bool, size: int):
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.body: bytearray | memoryview
        if size > SMALL_REQUEST:  # read into its place (see _BodyReader); `filled` counts the bytes in
            self.body = memoryview(np.empty(size, np.uint8))  # not zeroed first: every byte is read into it
            self.filled = 0
        else:  # in one read or a few: appended
            self.body = bytearray()
            self.filled = -1
        self.more_body = True
        self.response_started = self.response_complete = self.disconnected = self.started = False
        self.run: Any = None  # the request in the inference service, once the body is whole

    @property
    def message_event(self) -> "_InferCycle":
        return self

    def set(self) -> None:
        if self.disconnected:
            if self.run is not None:
                self.run.cancel()  # a queued run is dropped: an abandoned request costs no compute
        elif not self.more_body and not self.started:
            self.started = True
            try:
                run = self.protocol.answer_soon(self.scope, self.body, self.reply)
                if not self.response_complete:  # (answered at once: keep no reference back to this cycle)
                    self.run = run
            except Exception:
                log.exception("inference on %s failed", self.scope.get("path"))
                self.keep_alive = False
                self.reply(None)

    def reply(self, answer: tuple[int, bytes, list[tuple[bytes, bytes]], bytes] | None) -> None:
        """Write the answer (None: none; the connection is closed unless the client left) in one piece."""
        self.run = None
        protocol = self.protocol
        if answer is None or self.disconnected:
            self.response_complete = True
            if not self.disconnected:
                protocol.transport.close()
            return
        status, content_type, extra, body = answer
        parts = [STATUS_LINE[status], b"content-type: ", content_type, b"\r\ncontent-length: ",
                 str(len(body)).encode(), b"\r\n"]
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        transport = protocol.transport
        transport.write_whole(b"".join(parts))
        self.response_started = self.response_complete = True
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a corked transport, holding the front door's limits.

    Timers are armed only when a request is not read whole at once: a small request read in one piece costs
    a few attribute reads. The idle timer is not cancelled and armed again per request (uvicorn's way, a timer
    handle made and dropped for every request): it stays armed while the connection is used, and when it fires
    on a connection that was busy meanwhile it is armed again for the rest of the idle time. A connection is cut
    (and counted by reason) when it waits for a request longer than ``idle_timeout``, takes longer than
    ``header_timeout`` to send a request's head, or sends a body slower than ``body_min_rate`` over a
    ``body_timeout`` window; beyond ``max_connections`` a new one gets a 503.
    """

    door: FrontDoor  # set on a subclass per server

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._phase = _DONE
        self._done_scope: dict | None = None  # the scope of the last request read whole
        self._timer: asyncio.TimerHandle | None = None
        self._window = 0  # body bytes since the body timer was last armed
        self._held = 0  # body bytes of this connection's requests not answered yet
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the connection last became idle
        self._size = 0  # the body size of the request whose head was just read, when it is a plain infer
        self.answer_soon = getattr(self.app, "answer_soon", None)  # the app's infer path without ASGI

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        door = self.door
        door.open += 1
        if door.open > door.max_connections:
            self._cut("connection_limit", 503, f"the server has its maximum of {door.max_connections} connections "
                                               "open (server.max_connections); retry later")
            return
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if self._done_scope is self.scope:
            phase = _DONE
        elif cycle is not None and cycle.scope is self.scope:
            phase = _BODY
        else:
            phase = _HEAD
        before = self._phase
        if phase != before:
            self._phase = phase
            self._arm(phase)
        elif phase == _DONE and self.timeout_keep_alive_task is None and (cycle is None or cycle.response_complete):
            self._arm(phase)  # bytes between requests (or the rest of a body answered early): idle again
        if phase == _BODY or before == _BODY:
            self._count(len(data), phase)
            if phase == _BODY and type(cycle) is _InferCycle and cycle.filled >= 0 and not self.transport.is_closing():
                self.transport.set_protocol(_BodyReader(self, cycle))  # the rest of the body goes into its place

    def on_headers_complete(self) -> None:
        door = self.door
        if door.total[0] > door.headroom:
            refusal = door.refusal(self.headers)
            if refusal is not None:
                door.cut["body_budget"] += 1
                app, self.app = self.app, _refusal_app(*refusal)
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
                return
        if self.answer_soon is not None and self._plain_infer():
            self._start_infer()
            return
        super().on_headers_complete()

    def _plain_infer(self) -> bool:
        """Whether this request is a plain ``POST /v2/models/.../infer`` that ``_InferCycle`` can answer: nothing
        in its path to decode, no answer under way on the connection, no 100-continue, a body declared and not
        encoded, within server.max_body, whose JSON part is small enough to decode on the event loop (all of it up
        to INLINE_MAX bytes, or the header of a binary-tensor body). Any other request goes through the app."""
        url = self.url
        if not (url.startswith(_INFER_PREFIX) and url.endswith(_INFER_SUFFIX)) or b"%" in url or b"?" in url:
            return False
        if self.parser.get_method() != b"POST" or self.expect_100_continue or self.parser.should_upgrade():
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False  # a pipelined request waits its turn in uvicorn's queue
        length = json_length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"inference-header-content-length":
                json_length = value
            elif name == b"content-encoding" or name == b"transfer-encoding":
                return False
        if length is None or not length.isdigit():
            return False
        size = int(length)
        self._size = size
        if size <= SMALL_REQUEST:
            return True
        if size > self.door.max_body:
            return False  # the app answers 413
        if json_length is not None:
            return json_length.isdigit() and int(json_length) <= INLINE_MAX
        return size <= INLINE_MAX  # a larger JSON body is decoded off the event loop, by the app

    def _start_infer(self) -> None:
        scope = self.scope
        version = self.parser.get_http_version()
        scope["method"] = "POST"
        scope["path"] = self.url.decode("ascii")
        scope["raw_path"] = self.url
        scope["query_string"] = b""
        if version != "1.1":
            scope["http_version"] = version
        self.cycle = _InferCycle(self, scope, version != "1.0" and self.parser.should_keep_alive(),  # type: ignore
                                 self._size)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is _InferCycle:  # read whole, without the app's flow control: it takes it whole anyway
            if not cycle.disconnected:
                if cycle.filled < 0:
                    cycle.body += body
                else:
                    end = cycle.filled + len(body)
                    cycle.body[cycle.filled:end] = body
                    cycle.filled = end
            return
        super().on_body(body)

    def body_read(self, n: int) -> None:
        """``n`` more bytes of a large infer body were read into place by ``_BodyReader``."""
        cycle: _InferCycle = self.cycle  # type: ignore[assignment]
        self._count(n, _BODY)
        if cycle.filled < len(cycle.body) or self.transport.is_closing():
            return
        self.transport.set_protocol(self)
        # the parser still waits for the body it did not see: the next request starts on a new one
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn sets its own (httptools >= 0.6.3)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.on_message_complete()
        self._phase = _DONE
        self._arm(_DONE)

    def on_message_complete(self) -> None:
        self._done_scope = self.scope
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._held:
            self._release()
        if self.pipeline or self.transport.is_closing():
            super().on_response_complete()  # starts the next pipelined request
            return
        self.server_state.total_requests += 1
        self.timeout_keep_alive_task = None
        self.flow.resume_reading()
        self._idle()

    def _unset_keepalive_if_required(self) -> None:
        self.timeout_keep_alive_task = None  # busy: the idle timer looks again when it fires (see _idle_due)

    def _idle(self) -> None:
        """The connection waits for its next request from now: it is cut after idle_timeout unless one comes."""
        self._idle_since = self.loop.time()
        timer = self._idle_timer
        if timer is None:
            timer = self._idle_timer = self.loop.call_later(self.door.idle_timeout, self._idle_due)
        self.timeout_keep_alive_task = timer

    def _idle_due(self) -> None:
        self._idle_timer = None
        if self.timeout_keep_alive_task is None or self.transport.is_closing():
            return  # busy now: armed again when it is idle
        left = self._idle_since + self.door.idle_timeout - self.loop.time()
        if left > 0:  # it was used since the timer was armed
            self._idle_timer = self.timeout_keep_alive_task = self.loop.call_later(left, self._idle_due)
            return
        self.timeout_keep_alive_handler()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self._cut("idle")

    def _arm(self, phase: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        door = self.door
        if phase == _HEAD:
            self._timer = self.loop.call_later(door.header_timeout, self._head_late)
        elif phase == _BODY:
            self._window = 0
            self._timer = self.loop.call_later(door.body_timeout, self._body_slow)
        elif self.timeout_keep_alive_task is None and (self.cycle is None or self.cycle.response_complete):
            self._idle()

    def _head_late(self) -> None:
        self._timer = None
        door = self.door
        if self.flow.read_paused:  # the server stopped reading (a pipelined request waits): not the client's doing
            self._timer = self.loop.call_later(door.header_timeout, self._head_late)
            return
        self._cut("header_timeout", 408, f"the request head did not arrive within {door.header_timeout:g} s "
                                         "(server.header_timeout)")

    def _body_slow(self) -> None:
        self._timer = None
        door = self.door
        if self._window < door.body_window and not self.flow.read_paused:
            self._cut("body_timeout", 408, f"the request body arrived slower than {door.body_min_rate} bytes/s over "
                                           f"{door.body_timeout:g} s (server.body_min_rate, server.body_timeout)")
            return
        self._window = 0
        self._timer = self.loop.call_later(door.body_timeout, self._body_slow)

    def _count(self, n: int, phase: int) -> None:
        self._window += n
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return  # the rest of a body answered early is read and dropped
        door = self.door
        self._held += n
        door.add(n)
        if phase == _BODY and door.total[0] > door.max_held and self._held > SMALL_REQUEST:
            if self._held > door.max_held:
                self._cut("body_budget", 413, f"request body exceeds the {door.max_held} bytes of requests the "
                                              "server holds at once (server.max_body_total)")
            else:
                self._cut("body_budget", 503, f"the server holds the most request bytes it takes at once "
                                              f"({door.max_held}, server.max_body_total); retry later")

    def _release(self) -> None:
        if self._held:
            self.door.add(-self._held)
            self._held = 0

    def _cut(self, reason: str, status: int | None = None, message: str = "") -> None:
        """Close the connection, first answering ``status`` if no answer is under way; count it by ``reason``."""
        transport = self.transport
        if transport.is_closing():
            return
        self.door.cut[reason] += 1
        log.debug("cut a connection from %s: %s", self.client, reason)
        self._release()  # at once: the connection's other bytes in this loop iteration are not read
        cycle = self.cycle
        if status is not None and (cycle is None or cycle.response_complete or not cycle.response_started):
            transport.write(_response(status, message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app sees the client gone; nothing it sends goes out
            cycle.message_event.set()
        transport.close()


class _BodyReader(asyncio.BufferedProtocol):
    """Stands in for a connection's protocol while the rest of a large infer body is read: the event loop reads
    it from the socket straight into the request's buffer, where the tensors are then taken from in place (a
    body otherwise goes through a bytes object per read, another per parser callback, and a growing buffer:
    three copies, and a Python call chain per read). Once the body is whole, the protocol is itself again.
    """

    __slots__ = ("protocol", "cycle", "view")

    def __init__(self, protocol: _HttpProtocol, cycle: _InferCycle):
        self.protocol = protocol
        self.cycle = cycle
        self.view = memoryview(cycle.body)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.cycle.filled:]  # never more than the body: what follows it is the next request's

    def buffer_updated(self, nbytes: int) -> None:
        self.cycle.filled += nbytes
        self.protocol.body_read(nbytes)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


def _response(status: int, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    retry = b"retry-after: 1\r\n" if status == 503 else b""
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
                     str(len(body)).encode(), b"\r\nconnection: close\r\n", retry, b"\r\n", body])


def _refusal_app(status: int, message: str) -> Callable[..., Awaitable[None]]:
    """An ASGI app answering ``status`` and closing the connection, for a request not let in."""
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 503:
        headers.append((b"retry-after", b"1"))

    async def refuse(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
                     ) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, owner: "HttpServer"):
        super().__init__(config)
        self._owner = owner

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the daemon: HttpServer installs SIGINT/SIGTERM -> request_stop() only if asked.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._owner.started.set()


class HttpServer:
    """Serve an ASGI app until ``request_stop()``; requests in flight finish (up to ``drain_timeout``)."""

    def __init__(self, app: Any, config: ServerConfig, *, handle_signals: bool = True):
        self.app = app
        self.config = config
        self.handle_signals = handle_signals
        self.started = asyncio.Event()
        self.addresses: list[str] = []
        self._server: _Uvicorn | None = None
        self._stop_requested = False
        self._checked = False
        self._tls: ServerTls | None = None
        self.front_door = FrontDoor(config)
        watch = getattr(app, "watch_front_door", None)
        if watch is not None:
            watch(self.front_door)  # its counts in the app's /metrics

    @property
    def in_flight(self) -> int:
        """HTTP requests being handled right now."""
        return int(getattr(self.app, "in_flight", 0))

    def request_stop(self) -> None:
        """Stop accepting connections, let requests in flight finish, then return from ``serve()``."""
        self._stop_requested = True
        if self._server is not None:
            self._server.should_exit = True

    def check_security(self) -> None:
        """Refuse a non-loopback TCP address without tokens or client certificates unless ``allow_insecure`` is set.

        Also checks the TLS files (ConfigError naming the key).
        """
        if self._checked:
            return
        self._checked = True
        c = self.config
        self._tls = server_tls(c)
        if c.host and not is_loopback(c.host) and not c.has_tokens() and not c.mutual_tls():
            if not c.allow_insecure:
                raise ConfigError(f"refusing to listen on {c.host} without an API token: set EDGERUN_API_TOKEN, "
                                  "server.token_file (--token-file) or server.tokens_file, or require client "
                                  "certificates (server.tls_client_ca_file), or allow it with --allow-insecure",
                                  key="server.host")
            log.warning("listening on %s WITHOUT an API token or client certificates: anyone who can reach this "
                        "port can run models", c.host)

    def _sockets(self) -> list[socket.socket]:
        c = self.config
        socks = []
        if c.host:
            sock = bind(c.host, c.port, key="server.port")
            host, port = sock.getsockname()[:2]
            scheme = "http" if self._tls is None else "https"
            self.addresses.append(f"{scheme}://[{host}]:{port}" if sock.family == socket.AF_INET6
                                  else f"{scheme}://{host}:{port}")
            socks.append(sock)
        if c.uds:
            path = Path(c.uds)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()  # a stale socket from a previous run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot listen on {path}: {exc.strerror}", key="server.uds") from None
            os.chmod(path, 0o660)
            self.addresses.append(f"unix:{path}")
            socks.append(sock)
        if not socks:
            raise ConfigError("nothing to listen on: give server.host/port or server.uds", key="server.host")
        return socks

    async def serve(self) -> None:
        self.check_security()
        socks = self._sockets()
        # edgerun never reads the client address, so X-Forwarded-* headers are not trusted nor parsed
        protocol = type("HttpProtocol", (_HttpProtocol,), {"door": self.front_door})
        cfg = uvicorn.Config(self.app, loop="none", http=protocol, ws="none", lifespan="on", log_config=None,
                             access_log=False, server_header=False, date_header=False, proxy_headers=False,
                             timeout_graceful_shutdown=self.config.drain_timeout,
                             timeout_keep_alive=self.config.idle_timeout, backlog=1024,
                             **(self._tls.uvicorn_options() if self._tls is not None else {}))
        self._server = _Uvicorn(cfg, self)
        if self._stop_requested:
            self._server.should_exit = True
        loop = asyncio.get_running_loop()
        installed = []
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.request_stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        log.info("serving KServe v2 on %s", ", ".join(self.addresses))
        try:
            await self._server.serve(sockets=socks)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for s in socks:
                s.close()
            if self.config.uds:
                with contextlib.suppress(OSError):
                    Path(self.config.uds).unlink()
            log.info("HTTP server stopped")
