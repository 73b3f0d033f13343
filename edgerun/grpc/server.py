"""The KServe v2 gRPC front end (``inference.GRPCInferenceService``): glue around the inference service.

Every RPC is a coroutine of :class:`Calls` run on the daemon's event loop, where the inference service runs
HTTP requests too (so batching, limits, metrics and statistics are one). Three servers carry the calls to it:

- **loop** (``edgerun.grpc._h2``, built where nghttp2's headers are installed): each connection is an asyncio
  protocol on the loop, whose HTTP/2 nghttp2 speaks; a call crosses no thread and no queue.
- **native** (``edgerun.grpc._native``, built where gRPC's C++ library is installed): gRPC's C++ server reads
  and writes the calls on a thread of its own and queues each request's bytes for the loop, which takes them in
  batches through an eventfd and queues the answers back for that thread to send.
- **grpcio**: grpcio's server runs each call's handler on one of ``server.grpc_workers`` threads, which hands
  the call to the loop and waits for its answer.

The two compiled servers hand Python raw calls (method, metadata, message bytes), which one dispatcher carries
out; Python's share of a call is one parse, its work and one serialization. ``server.grpc_frontend`` chooses
(``auto``: the first built of loop, native, grpcio).

Access control is the HTTP server's: ``authorization: Bearer <token>`` metadata on every call but ServerLive and
ServerReady, each call needing the scope its HTTP twin needs. An EdgerunError ends a call with the error's gRPC
code and message.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterator

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

import edgerun
from edgerun.config import ServerConfig
from edgerun.errors import ConfigError, EdgerunError, InvalidInput, ModelNotFound
from edgerun.grpc import inference_pb2 as pb
from edgerun.grpc.tensors import RawInputs, decode_request, encode_response, model_metadata, read_infer_request
from edgerun.serving.access import ADMIN, INFER, METADATA, SERVER, Grant
from edgerun.serving.limits import SMALL_REQUEST, ConnectionLimits
from edgerun.serving.service import InferenceService
from edgerun.serving.tls import ServerTls, server_tls

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
STREAM = "ModelStreamInfer"
STREAM_INFLIGHT = 64  # requests of one ModelStreamInfer stream served at once
MAX_STREAMS = 256  # calls open at once on one connection
CALL, MESSAGE, END, CANCELLED = 0, 1, 2, 3  # the raw servers' event kinds (edgerun.grpc._native and _h2)
WINDOW = 4 << 20  # the loop server's HTTP/2 receive window, per stream and per connection
FRAME = 1 << 20  # the largest HTTP/2 frame the loop server takes
READ_SIZE = 256 << 10  # the loop server's reads
CUT_REASONS = ("idle", "header_timeout", "body_timeout", "connection_limit")  # why the loop server closed a connection
REFUSED_GRACE = 1.0  # seconds a connection beyond server.max_connections is kept to answer its calls UNAVAILABLE
LINGER = 1.0  # seconds a connection cut for slowness still reads (and drops) what its client sends
ENHANCE_YOUR_CALM = 0xB  # the HTTP/2 error code of a GOAWAY that closes a connection too slow to send its request
# each RPC's request message class, from the protocol's own description
REQUESTS: dict[str, type[Message]] = {
    m.name: getattr(pb, m.input_type.name) for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}


class _Decoded:
    __slots__ = ("inputs", "output_names", "id")

    def __init__(self, inputs: dict, output_names: list[str] | None, id: str):
        self.inputs = inputs
        self.output_names = output_names
        self.id = id


class Calls:
    """The RPCs as coroutines on the event loop: each takes the request message and the call's
    ``authorization`` metadata (None when absent) and returns the response message, or raises an EdgerunError.
    ModelStreamInfer is :meth:`open_stream` once, then :meth:`stream_one` per request."""

    def __init__(self, service: InferenceService, extensions: list[str]):
        self.service = service
        self.runtime = service.runtime
        self._extensions = extensions

    def _allow(self, authorization: str | None, action: str, model: str | None = None) -> None:
        if self.service.access.enabled:
            self.service.authorize(authorization, action, model or None)

    async def ServerLive(self, request: pb.ServerLiveRequest, authorization: str | None) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          authorization: str | None) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.runtime.models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, authorization: str | None) -> pb.ModelReadyResponse:
        self._allow(authorization, METADATA, request.name)
        try:
            self.service.model(request.name, request.version or None)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             authorization: str | None) -> pb.ServerMetadataResponse:
        self._allow(authorization, SERVER)
        return pb.ServerMetadataResponse(name="edgerun", version=edgerun.__version__, extensions=self._extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            authorization: str | None) -> pb.ModelMetadataResponse:
        self._allow(authorization, METADATA, request.name)
        m = self.service.model(request.name, request.version or None)
        return model_metadata(m.name, self.service.versions(m.name), f"{m.backend}_{m.variant.format}",
                              m.inputs, m.outputs)

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          authorization: str | None) -> pb.ModelConfigResponse:
        self._allow(authorization, METADATA, request.name)
        doc = self.service.model_config(self.service.model(request.name, request.version or None))
        return json_format.ParseDict({"config": doc}, pb.ModelConfigResponse(), ignore_unknown_fields=True)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              authorization: str | None) -> pb.ModelStatisticsResponse:
        self._allow(authorization, METADATA, request.name)
        stats = self.service.statistics(request.name or None, request.version or None)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              authorization: str | None) -> pb.RepositoryIndexResponse:
        self._allow(authorization, METADATA)
        rows = self.service.repository.index(request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r.get("version", ""), state=r["state"],
                                                  reason=r["reason"]) for r in rows])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  authorization: str | None) -> pb.RepositoryModelLoadResponse:
        self._allow(authorization, ADMIN, request.model_name)
        if request.parameters:
            raise InvalidInput(f"load parameters {sorted(request.parameters)} are not supported: edgerun loads "
                               "the package as it is in the repository")
        await self.service.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    authorization: str | None) -> pb.RepositoryModelUnloadResponse:
        self._allow(authorization, ADMIN, request.model_name)
        await self.service.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, authorization: str | None) -> pb.ModelInferResponse:
        self._allow(authorization, INFER, request.model_name)
        return await self._infer(request)

    def open_stream(self, authorization: str | None) -> Grant:
        """A ModelStreamInfer stream's grant: its token is read once; each request is checked against it."""
        return self.service.identify(authorization)

    async def stream_one(self, grant: Grant, request: pb.ModelInferRequest, raw: RawInputs = None
                         ) -> pb.ModelStreamInferResponse:
        """One request of a stream: its answer, or its error as the answer's ``error_message``."""
        try:
            self.service.check(grant, INFER, request.model_name)
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, raw))
        except EdgerunError as exc:
            return pb.ModelStreamInferResponse(error_message=str(exc))

    async def _infer(self, request: pb.ModelInferRequest, raw: RawInputs = None) -> pb.ModelInferResponse:
        return await self.service.infer(request.model_name, request.model_version or None,
                                        *self._codec(request, raw))

    def infer_soon(self, request: pb.ModelInferRequest, authorization: str | None,
                   done: Callable[[pb.ModelInferResponse | None, EdgerunError | None], None],
                   raw: RawInputs = None) -> Any:
        """ModelInfer without a task of its own (see InferenceService.infer_soon): ``done(response, error)``.
        The request, whose ``cancel()`` says the client left (None when it was refused at once). ``raw``: the
        request's raw_input_contents when they were taken apart from it (``read_infer_request``)."""
        try:
            self._allow(authorization, INFER, request.model_name)
        except EdgerunError as exc:
            done(None, exc)
            return None
        return self.service.infer_soon(request.model_name, request.model_version or None,
                                       *self._codec(request, raw), done)

    def _codec(self, request: pb.ModelInferRequest, raw: RawInputs
               ) -> tuple[Callable[[Any], _Decoded], Callable[[Any, dict], pb.ModelInferResponse]]:
        service = self.service

        def decode(model: Any) -> _Decoded:
            return _Decoded(*decode_request(request, service.specs(model)[0], raw))

        def encode(model: Any, outputs: dict) -> pb.ModelInferResponse:
            return encode_response(model.name, model.version, request.id, outputs, outputs,
                                   service.specs(model)[1])

        return decode, encode

    def unary(self, name: str) -> Callable[[Any, str | None], Awaitable[Message]]:
        return getattr(self, name)


def _code(exc: EdgerunError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


def _target(config: ServerConfig) -> str:
    host = config.host
    return f"[{host}]:{config.grpc_port}" if ":" in host else f"{host}:{config.grpc_port}"


# --- the native server ----------------------------------------------------------------------------------


class _RawStream:
    """A ModelStreamInfer call on a server that hands Python raw calls: requests run side by side, each answer
    is written as it is ready (so answers may come in another order than the requests: match them by ``id``),
    and the call ends once the client has sent its last request and every one is answered."""

    __slots__ = ("grant", "pending", "ended")

    def __init__(self, grant: Grant):
        self.grant = grant
        self.pending = 0
        self.ended = False


class _Dispatch:
    """The calls of the servers that hand Python raw calls (native and loop), carried out on the event loop.

    Each server gives :meth:`handle` its events, ``(kind, call, method, authorization, payload)`` tuples, and
    the sink they came from, which takes the answers: ``finish(call, code, message, payload)`` (a call's last
    word) and ``write(call, payload)`` (one message of a stream). A compressed payload comes as
    ``(grpc-encoding, bytes)``. With ``hold_streams`` the sink also has ``hold()`` and ``release()``: a stream
    with STREAM_INFLIGHT requests in flight holds its sink's reading until one is answered.
    """

    def __init__(self, calls: Calls, loop: asyncio.AbstractEventLoop, max_message: int, *, hold_streams: bool):
        self._calls = calls
        self._loop = loop
        self._max_message = max_message
        self._hold = hold_streams
        self._streams: dict[tuple[Any, int], _RawStream] = {}
        self._waiting: dict[tuple[Any, int], Any] = {}  # ModelInfer calls queued for a run: their requests
        self._tasks: set[asyncio.Task] = set()
        self._handlers = {f"/{SERVICE}/{name}": (calls.unary(name), cls)
                          for name, cls in REQUESTS.items() if name != STREAM}
        self._infer_method = f"/{SERVICE}/ModelInfer"

    def handle(self, sink: Any, events: list[tuple[int, int, str | None, str | None, Any]]) -> None:
        infer = self._infer_method
        for kind, call, method, authorization, payload in events:
            if payload.__class__ is tuple:
                payload = self._inflate(sink, call, payload)
                if payload is None:
                    continue
            if kind == CALL:
                if method == infer:
                    self._infer(sink, call, authorization, payload)
                elif payload is None:
                    self._open_stream(sink, call, authorization)
                else:
                    self._spawn(self._unary(sink, call, method, authorization, payload))
            elif kind == MESSAGE:
                stream = self._streams.get((sink, call))
                if stream is not None:
                    stream.pending += 1
                    if self._hold and stream.pending == STREAM_INFLIGHT:
                        sink.hold()
                    self._spawn(self._stream_one(sink, call, stream, payload))
            elif kind == END:
                stream = self._streams.get((sink, call))
                if stream is not None:
                    stream.ended = True
                    if not stream.pending:
                        self._end_stream(sink, call)
            elif kind == CANCELLED:
                run = self._waiting.pop((sink, call), None)
                if run is not None:
                    run.cancel()  # not run if it has not started
                else:
                    self._forget(sink, call)

    def gone(self, sink: Any) -> None:
        """The sink's connection is closed: its streams are forgotten (their answers would go nowhere), and its
        ModelInfer calls still queued are not run."""
        for key in [key for key in self._streams if key[0] is sink]:
            self._forget(*key)
        for key in [key for key in self._waiting if key[0] is sink]:
            self._waiting.pop(key).cancel()

    def _forget(self, sink: Any, call: int) -> None:
        stream = self._streams.pop((sink, call), None)
        if stream is not None and self._hold and stream.pending >= STREAM_INFLIGHT:
            sink.release()

    def _inflate(self, sink: Any, call: int, payload: tuple[str, bytes]) -> bytes | None:
        """A compressed message, inflated; None when it was refused (the call is finished)."""
        encoding, data = payload
        wbits = {"gzip": 31, "deflate": 15}.get(encoding)
        if wbits is None:
            sink.finish(call, grpc.StatusCode.UNIMPLEMENTED.value[0], f"grpc-encoding {encoding!r} is not "
                        "supported: send messages as identity, gzip or deflate", None)
            return None
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, self._max_message + 1)
        except zlib.error as exc:
            sink.finish(call, grpc.StatusCode.INTERNAL.value[0], f"cannot inflate the {encoding} message: {exc}",
                        None)
            return None
        if len(out) > self._max_message:
            sink.finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "the request message inflates to more "
                        f"than this server's limit of {self._max_message} bytes (server.max_body)", None)
            return None
        return out

    def _infer(self, sink: Any, call: int, authorization: str | None, payload: bytes) -> None:
        """ModelInfer, the call that comes by the thousand: run through the service with no task of its own."""
        try:
            request, raw = read_infer_request(payload)
        except DecodeError:
            sink.finish(call, grpc.StatusCode.INVALID_ARGUMENT.value[0], undecodable(pb.ModelInferRequest), None)
            return

        key = (sink, call)
        waiting = self._waiting

        def done(response: pb.ModelInferResponse | None, error: EdgerunError | None) -> None:
            waiting.pop(key, None)
            if error is not None:
                sink.finish(call, _code(error).value[0], str(error), None)
            else:
                sink.finish(call, 0, None, response.SerializeToString())  # type: ignore[union-attr]

        run = self._calls.infer_soon(request, authorization, done, raw)
        if run is not None and run.queued is not None:  # (a run on the loop has answered already)
            waiting[key] = run

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unary(self, sink: Any, call: int, method: str, authorization: str | None, payload: bytes) -> None:
        handler, request_class = self._handlers[method]
        try:
            request = request_class.FromString(payload)
        except DecodeError:
            sink.finish(call, grpc.StatusCode.INVALID_ARGUMENT.value[0], undecodable(request_class), None)
            return
        try:
            response = await handler(request, authorization)
        except EdgerunError as exc:
            sink.finish(call, _code(exc).value[0], str(exc), None)
        except Exception:
            log.exception("gRPC %s failed", method.rsplit("/", 1)[-1])
            sink.finish(call, grpc.StatusCode.INTERNAL.value[0], "internal error (see the server's log)", None)
        else:
            sink.finish(call, 0, None, response.SerializeToString())

    def _open_stream(self, sink: Any, call: int, authorization: str | None) -> None:
        try:
            grant = self._calls.open_stream(authorization)
        except EdgerunError as exc:
            sink.finish(call, _code(exc).value[0], str(exc), None)
            return
        self._streams[(sink, call)] = _RawStream(grant)

    async def _stream_one(self, sink: Any, call: int, stream: _RawStream, payload: bytes) -> None:
        try:
            request, raw = read_infer_request(payload)
        except DecodeError:
            answer = pb.ModelStreamInferResponse(error_message=undecodable(pb.ModelInferRequest))
        else:
            answer = await self._calls.stream_one(stream.grant, request, raw)
        if self._streams.get((sink, call)) is not stream:  # cancelled meanwhile
            return
        sink.write(call, answer.SerializeToString())
        stream.pending -= 1
        if self._hold and stream.pending == STREAM_INFLIGHT - 1:
            sink.release()
        if stream.ended and not stream.pending:
            self._end_stream(sink, call)

    def _end_stream(self, sink: Any, call: int) -> None:
        if self._streams.pop((sink, call), None) is not None:
            sink.finish(call, 0, None, None)


# --- the native server ----------------------------------------------------------------------------------


class NativeServer:
    """The calls read and written by gRPC's C++ server (``edgerun.grpc._native``), answered on the loop."""

    name = "native"

    def __init__(self, calls: Calls, config: ServerConfig, tls: ServerTls | None):
        from edgerun.grpc import _native

        self._native = _native
        self._calls = calls
        self._config, self._tls = config, tls
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatch: _Dispatch | None = None

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        max_message = _max_message(self._config)
        self._dispatch = _Dispatch(self._calls, self._loop, max_message, hold_streams=False)
        key = cert = ca = None
        if self._tls is not None:
            key, cert, ca = self._tls.pem()
        try:
            self._server = self._native.Server(
                _target(self._config), [f"/{SERVICE}/{name}" for name in REQUESTS], [f"/{SERVICE}/{STREAM}"],
                max_message, MAX_STREAMS, STREAM_INFLIGHT, key, cert, ca, _idle_ms(self._config))
        except OSError:
            return 0
        self._loop.add_reader(self._server.fileno(), self._take)
        return self._server.port

    async def stop(self, grace: float | None) -> None:
        await asyncio.to_thread(self._server.stop, 0.0 if grace is None else grace)
        self._take()

    def _take(self) -> None:
        events = self._server.take_events()
        if events is None:  # stopped and drained
            self._loop.remove_reader(self._server.fileno())  # type: ignore[union-attr]
            return
        self._dispatch.handle(self._server, events)  # type: ignore[union-attr]


# --- the loop server ------------------------------------------------------------------------------------


class _Door(ConnectionLimits):
    """The loop server's limits on its connections, from the HTTP front door's settings, and what they cut.

    A connection with no call open for ``idle_timeout`` gets a GOAWAY and is closed; one whose request headers
    take longer than ``header_timeout``, or whose request messages bring fewer than ``body_min_rate`` ×
    ``body_timeout`` bytes in a ``body_timeout`` window, is closed (a GOAWAY ENHANCE_YOUR_CALM); one beyond
    ``max_connections`` answers its calls UNAVAILABLE and is closed. A sweep every ``period`` seconds looks at
    each connection, so a limit takes effect up to ``period`` late.
    """

    def __init__(self, config: ServerConfig, h2: Any):
        super().__init__(config, CUT_REASONS)
        self.period = min(config.idle_timeout, config.header_timeout, config.body_timeout) / 2
        self._h2 = h2
        # server.max_body_total holds the HTTP server's bodies and these together; small ones always get in
        h2.share_held(self.total, SMALL_REQUEST)

    @property
    def held(self) -> int:
        """Bytes of the request messages being received, across connections: gRPC's part of what
        ``server.max_body_total`` bounds."""
        return self._h2.held()


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/2 connection of the loop server: what is read goes through its nghttp2 session, the calls it
    yields to the dispatcher, and what the session has to say is written at once."""

    def __init__(self, server: LoopServer):
        self._server = server
        self._session: Any = None
        self._transport: asyncio.Transport | None = None
        self._held = 0
        self._closing = False  # a GOAWAY is sent: close once the calls open are answered
        self._refused = False  # beyond server.max_connections: its calls are answered UNAVAILABLE
        self._lingering = False  # cut: what arrives is dropped until the client closes or LINGER is over
        self._received = 0  # bytes read
        self._busy = 0  # reads that brought calls or messages (the sweep compares it with what it saw last)
        # the sweep's view: when it last saw the connection busy, and since when headers or messages are arriving
        self._seen_busy, self._quiet_since = -1, 0.0
        self._heads_since: float | None = None
        self._bodies_since: float | None = None
        self._bodies_mark = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        door = server.door
        self._transport = transport  # type: ignore[assignment]
        self._session = server.h2.Session(server.unary, server.streaming, server.max_message, MAX_STREAMS,
                                          WINDOW, FRAME, door.max_held)
        self._quiet_since = server.loop.time()
        server.connections.add(self)
        if door.open >= door.max_connections:
            self._refused = True
            door.cut["connection_limit"] += 1
            server.loop.call_later(REFUSED_GRACE, self.abort)
        else:
            door.open += 1
        if server.stopping:
            self.goaway()
        else:
            self._send(self._session.send())

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._server.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._lingering:
            return
        self._received += nbytes
        try:
            events, out = self._session.receive(self._server.buffer, nbytes)
        except self._server.h2.H2Error as exc:
            log.debug("gRPC connection dropped: %s", exc.args[0])
            if len(exc.args) > 1:
                self._send(exc.args[1])
            self._transport.close()  # type: ignore[union-attr]
            return
        if out is not None:
            self._transport.write(out)  # type: ignore[union-attr]
        if events is not None:
            self._busy += 1
            if self._refused:
                self._refuse(events)
            else:
                self._server.dispatch.handle(self, events)
        elif self._session.done():
            self._transport.close()  # type: ignore[union-attr]

    def _refuse(self, events: list[tuple[int, int, str | None, str | None, Any]]) -> None:
        limit = self._server.door.max_connections
        for kind, call, *_ in events:
            if kind == CALL:
                self.finish(call, grpc.StatusCode.UNAVAILABLE.value[0], f"the server has its maximum of {limit} "
                            "gRPC connections open (server.max_connections); retry later", None)
        self.goaway()

    def sweep(self, now: float) -> None:
        """The loop server's periodic look (see _Door): close the connection if it is idle or too slow."""
        if self._transport is None or self._closing:
            return
        door = self._server.door
        open_, heads, bodies = self._session.streams()
        if open_ or self._busy != self._seen_busy:
            self._seen_busy, self._quiet_since = self._busy, now
        elif now - self._quiet_since >= door.idle_timeout:
            self._cut("idle")
            return
        if not heads:
            self._heads_since = None
        elif self._heads_since is None:
            self._heads_since = now
        elif now - self._heads_since >= door.header_timeout:
            self._cut("header_timeout", f"request headers took longer than {door.header_timeout:g} s "
                                        "(server.header_timeout)")
            return
        if not bodies:
            self._bodies_since = None
        elif self._bodies_since is None:
            self._bodies_since, self._bodies_mark = now, self._received
        elif now - self._bodies_since >= door.body_timeout:
            if self._received - self._bodies_mark < door.body_window:
                self._cut("body_timeout", f"request messages arrived slower than {door.body_window} bytes in "
                                          f"{door.body_timeout:g} s (server.body_min_rate, server.body_timeout)")
                return
            self._bodies_since, self._bodies_mark = now, self._received

    def _cut(self, reason: str, slow: str | None = None) -> None:
        """Close the connection: an idle one with a GOAWAY, a slow one with GOAWAY ENHANCE_YOUR_CALM at once."""
        self._server.door.cut[reason] += 1
        log.debug("cut a gRPC connection: %s", reason)
        if slow is None:
            self.goaway()
            return
        self._closing = True
        transport: asyncio.Transport = self._transport  # type: ignore[assignment]
        transport.write(self._session.goaway(ENHANCE_YOUR_CALM, slow) or b"")
        # closed with the client's bytes unread, the socket would answer them with a reset, and a client still
        # sending would lose the GOAWAY that says why: end the writing side, drop what comes, close after LINGER
        # (or at the client's own close, see eof_received)
        self._lingering = True
        transport.write_eof()
        self._server.loop.call_later(LINGER, transport.close)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        server = self._server
        server.connections.discard(self)
        if not self._refused:
            server.door.open -= 1
        server.dispatch.gone(self)

    def _send(self, out: bytes | None) -> None:
        """Write what the session gave (callers hold an open transport); after a GOAWAY, close once it is done."""
        transport: asyncio.Transport = self._transport  # type: ignore[assignment]
        if out is not None:
            transport.write(out)
        if self._closing and self._session.done():
            transport.close()

    def finish(self, call: int, code: int, message: str | None, payload: bytes | None) -> None:
        if self._transport is not None:
            self._send(self._session.answer(call, code, message, payload))

    def write(self, call: int, payload: bytes) -> None:
        if self._transport is not None:
            self._send(self._session.write(call, payload))

    def goaway(self) -> None:
        """Take no new call; close once those open are answered."""
        if self._transport is not None:
            self._closing = True
            self._send(self._session.goaway())

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def hold(self) -> None:
        self._held += 1
        if self._held == 1 and self._transport is not None:
            self._transport.pause_reading()

    def release(self) -> None:
        self._held -= 1
        if self._held == 0 and self._transport is not None:
            self._transport.resume_reading()


class LoopServer:
    """The calls read and written on the event loop itself (``edgerun.grpc._h2``, nghttp2): each connection is
    an asyncio protocol whose HTTP/2 nghttp2 handles, so a call crosses no thread and no queue."""

    name = "loop"

    def __init__(self, calls: Calls, config: ServerConfig, tls: ServerTls | None):
        from edgerun.grpc import _h2

        self.h2 = _h2
        self._calls = calls
        self._config, self._tls = config, tls
        self.unary = [f"/{SERVICE}/{name}" for name in REQUESTS if name != STREAM]
        self.streaming = [f"/{SERVICE}/{STREAM}"]
        self.max_message = _max_message(config)
        self.buffer = bytearray(READ_SIZE)  # every connection reads into it: the session copies out at once
        self.connections: set[_Connection] = set()
        self.door = _Door(config, _h2)
        self.stopping = False
        self.dispatch: _Dispatch | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        self.dispatch = _Dispatch(self._calls, loop, self.max_message, hold_streams=True)
        context = self._tls.context(alpn=["h2"]) if self._tls is not None else None
        try:
            self._listener = await loop.create_server(lambda: _Connection(self), self._config.host,
                                                      self._config.grpc_port, ssl=context, reuse_address=True,
                                                      backlog=1024)
        except OSError:
            return 0
        self._calls.service.metrics.watch_front_door(self.door, "grpc")
        self._sweeper = loop.call_later(self.door.period, self._sweep)
        return self._listener.sockets[0].getsockname()[1]

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            connection.sweep(now)
        self._sweeper = self.loop.call_later(self.door.period, self._sweep)

    async def stop(self, grace: float | None) -> None:
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._listener.close()  # type: ignore[union-attr]
        for connection in list(self.connections):
            connection.goaway()
        deadline = asyncio.get_running_loop().time() + (grace if grace is not None else 0.0)
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        await asyncio.sleep(0)


def _max_message(config: ServerConfig) -> int:
    return config.max_body + (1 << 20)


def _idle_ms(config: ServerConfig) -> int:
    """server.idle_timeout for gRPC's own servers (native, grpcio): a connection with no call open that long
    gets a GOAWAY."""
    return max(1, round(config.idle_timeout * 1000))


# --- grpcio's server ------------------------------------------------------------------------------------


class _StreamEnd:
    """What the reader of a stream's requests leaves last: how many it read, and how the reading ended."""

    __slots__ = ("count", "error")

    def __init__(self, count: int, error: BaseException | None):
        self.count = count
        self.error = error


class GrpcioServer:
    """The calls read and written by grpcio's server; each call's handler, on one of ``server.grpc_workers``
    threads, carries it out on the event loop and waits for the answer."""

    name = "grpcio"

    def __init__(self, calls: Calls, config: ServerConfig, tls: ServerTls | None):
        self._calls = calls
        self._config, self._tls = config, tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers = ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="edgerun-grpc")
        self._server = grpc.server(self._workers, options=[
            ("grpc.max_receive_message_length", _max_message(config)),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", MAX_STREAMS),
            ("grpc.max_connection_idle_ms", _idle_ms(config)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(self._unary(calls.unary(name)),
                                                      request_deserializer=_parser(cls),
                                                      response_serializer=_serialize)
            for name, cls in REQUESTS.items() if name != STREAM}
        handlers[STREAM] = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=_serialize)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        target = _target(self._config)
        try:
            if self._tls is None:
                port = self._server.add_insecure_port(target)
            else:
                key, cert, ca = self._tls.pem()
                credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                          require_client_auth=ca is not None)
                port = self._server.add_secure_port(target, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            self._workers.shutdown(wait=False)
            return 0
        self._server.start()
        return port

    async def stop(self, grace: float | None) -> None:
        await asyncio.to_thread(self._server.stop(grace).wait)
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _on_loop(self, context: Any, call: Awaitable[Any]) -> Any:
        """``call`` run on the event loop, from a worker thread; an EdgerunError aborts the gRPC call."""
        try:
            future = asyncio.run_coroutine_threadsafe(call, self._loop)  # type: ignore[arg-type]
        except RuntimeError:  # the event loop is closed: the server is stopping
            call.close()  # type: ignore[attr-defined]
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping; retry")
            raise
        try:
            return future.result()
        except EdgerunError as exc:
            context.abort(_code(exc), str(exc))
            raise  # abort raises; this is for type checkers

    def _unary(self, handler: Callable[[Any, str | None], Awaitable[Message]]) -> Callable[[Any, Any], Message]:
        def on_worker(request: Any, context: Any) -> Message:
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return self._on_loop(context, handler(request, _authorization(context)))
        return on_worker

    def _stream(self, requests: Iterator[pb.ModelInferRequest],
                context: Any) -> Iterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run side by side (up to STREAM_INFLIGHT); each answer, or its error, is sent
        as it is ready, so answers may come back in another order than the requests (match them by ``id``)."""
        calls, loop = self._calls, self._loop

        async def open_stream() -> Grant:
            return calls.open_stream(_authorization(context))

        grant = self._on_loop(context, open_stream())
        answers: queue.SimpleQueue[Future | _StreamEnd] = queue.SimpleQueue()
        slots = threading.BoundedSemaphore(STREAM_INFLIGHT)

        def answered(fut: Future) -> None:
            slots.release()
            answers.put(fut)

        def read() -> None:
            count, error = 0, None
            try:
                for request in requests:
                    slots.acquire()
                    count += 1
                    asyncio.run_coroutine_threadsafe(calls.stream_one(grant, request),
                                                     loop).add_done_callback(answered)  # type: ignore[arg-type]
            except BaseException as exc:  # the client broke the stream off
                error = exc
            answers.put(_StreamEnd(count, error))

        threading.Thread(target=read, name="edgerun-grpc-stream", daemon=True).start()
        end: _StreamEnd | None = None
        sent = 0
        while end is None or sent < end.count:
            item = answers.get()
            if isinstance(item, _StreamEnd):
                end = item
                continue
            yield item.result()
            sent += 1
        if end.error is not None:  # a broken request stream ends the call with its error
            raise end.error


class _Undecodable:
    """A request that is not the message its RPC takes (refused with INVALID_ARGUMENT, as the native server does;
    grpcio itself would answer INTERNAL)."""

    __slots__ = ("message",)

    def __init__(self, cls: type[Message]):
        self.message = undecodable(cls)


def undecodable(cls: type[Message]) -> str:
    return f"the request is not a valid {cls.DESCRIPTOR.name} message"


def _parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return _Undecodable(cls)
    return parse


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


def native_available(module: str = "_native") -> str | None:
    """None when the compiled server ``module`` (``_native``: gRPC's C++ server; ``_h2``: the loop server's
    nghttp2 sessions) is built and loads, else why not."""
    try:
        importlib.import_module(f"edgerun.grpc.{module}")
    except ImportError as exc:
        return str(exc)
    return None


# each compiled server: its module, and what to install for it (Debian's package)
COMPILED = {"loop": ("_h2", "nghttp2 (Debian: libnghttp2-dev)"),
            "native": ("_native", "gRPC's C++ library (Debian: libgrpc++-dev)")}


def choose_frontend(frontend: str) -> str:
    """The gRPC server ``server.grpc_frontend`` names: "auto" is the first built of loop, native and grpcio."""
    if frontend in COMPILED:
        module, needs = COMPILED[frontend]
        missing = native_available(module)
        if missing:
            raise ConfigError(f"the {frontend} gRPC server is not built ({missing}): install {needs} and reinstall "
                              "edgerun, or set it to \"auto\"", key="server.grpc_frontend")
        return frontend
    if frontend == "auto":
        for name, (module, needs) in COMPILED.items():
            missing = native_available(module)
            if missing is None:
                return name
            log.info("the %s gRPC server is not built (%s; it needs %s)", name, missing, needs)
    return "grpcio"


class GrpcServer:
    """Serve ``GRPCInferenceService`` on ``server.host:server.grpc_port`` until ``stop()``, with the server
    ``server.grpc_frontend`` names; over TLS when ``server.tls_cert_file`` is set, requiring client certificates
    when ``server.tls_client_ca_file`` is. Start it from the event loop its calls are to run on."""

    def __init__(self, service: InferenceService, config: ServerConfig, extensions: list[str]):
        self.config = config
        self.address: str | None = None
        calls = Calls(service, extensions)
        tls = server_tls(config)
        kind = {"loop": LoopServer, "native": NativeServer, "grpcio": GrpcioServer}[
            choose_frontend(config.grpc_frontend)]
        self._server: LoopServer | NativeServer | GrpcioServer = kind(calls, config, tls)
        self._tls = tls

    @property
    def frontend(self) -> str:
        return self._server.name

    async def start(self) -> str:
        target = _target(self.config)
        port = await self._server.start()
        if port == 0:
            raise ConfigError(f"cannot listen for gRPC on {target}: the address is in use or not available",
                              key="server.grpc_port")
        self.address = f"{'grpc' if self._tls is None else 'grpcs'}://{target.rsplit(':', 1)[0]}:{port}"
        log.info("serving KServe v2 gRPC on %s (%s server)", self.address, self.frontend)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let those in flight finish (up to ``grace`` seconds), then close. The event loop
        goes on meanwhile: the calls in flight run on it."""
        await self._server.stop(grace)
        log.info("gRPC server stopped")
