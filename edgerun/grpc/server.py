"""The KServe v2 gRPC front end (``inference.GRPCInferenceService``): glue around the inference service.

grpcio's server reads and writes the calls on its own threads; each call's handler (one of
``server.grpc_workers`` threads) hands the call to the daemon's event loop, where the inference service runs it
as it runs HTTP requests (so batching, limits, metrics and statistics are one), and waits for the answer. On one
core this serves 1.8-2.3 times the calls per second of grpcio's asyncio server at 8-32 calls at once (7% fewer at
one at a time): that server spends more per call moving each event between its poller thread and the loop than
edgerun's own work costs (benchmarks/serve.py).

Access control is the HTTP server's: ``authorization: Bearer <token>`` metadata on every call but ServerLive and
ServerReady, each call needing the scope its HTTP twin needs. An EdgerunError ends a call with the error's gRPC
code and message.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import grpc
from google.protobuf import json_format

import edgerun
from edgerun.config import ServerConfig
from edgerun.errors import ConfigError, EdgerunError, InvalidInput, ModelNotFound
from edgerun.grpc import inference_pb2 as pb
from edgerun.grpc import inference_pb2_grpc
from edgerun.grpc.tensors import decode_request, encode_response, model_metadata
from edgerun.serving.access import ADMIN, INFER, METADATA, SERVER
from edgerun.serving.service import InferenceService
from edgerun.serving.tls import server_tls

log = logging.getLogger(__name__)

OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
STREAM_INFLIGHT = 64  # requests of one ModelStreamInfer stream served at once
R = TypeVar("R")


class _Decoded:
    __slots__ = ("inputs", "output_names", "id")

    def __init__(self, inputs: dict, output_names: list[str] | None, id: str):
        self.inputs = inputs
        self.output_names = output_names
        self.id = id


class _StreamEnd:
    """What the reader of a stream's requests leaves last: how many it read, and how the reading ended."""

    __slots__ = ("count", "error")

    def __init__(self, count: int, error: BaseException | None):
        self.count = count
        self.error = error


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs, each run on a worker thread of grpcio's server and carried out on the event loop ``loop``."""

    def __init__(self, service: InferenceService, extensions: list[str], loop: asyncio.AbstractEventLoop):
        self.service = service
        self.runtime = service.runtime
        self._extensions = extensions
        self._loop = loop

    # --- the calls --------------------------------------------------------------------------

    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return self._call(context, lambda: pb.ServerReadyResponse(ready=bool(self.runtime.models())), None)

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            try:
                self.service.model(request.name, request.version or None)
            except ModelNotFound:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)
        return self._call(context, ready, METADATA, request.name)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return self._call(context, lambda: pb.ServerMetadataResponse(
            name="edgerun", version=edgerun.__version__, extensions=self._extensions), SERVER)

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        def metadata() -> pb.ModelMetadataResponse:
            m = self.service.model(request.name, request.version or None)
            return model_metadata(m.name, self.service.versions(m.name), f"{m.backend}_{m.variant.format}",
                                  m.inputs, m.outputs)
        return self._call(context, metadata, METADATA, request.name)

    def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        def config() -> pb.ModelConfigResponse:
            doc = self.service.model_config(self.service.model(request.name, request.version or None))
            return json_format.ParseDict({"config": doc}, pb.ModelConfigResponse(), ignore_unknown_fields=True)
        return self._call(context, config, METADATA, request.name)

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        def statistics() -> pb.ModelStatisticsResponse:
            stats = self.service.statistics(request.name or None, request.version or None)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse(),
                                         ignore_unknown_fields=True)
        return self._call(context, statistics, METADATA, request.name or None)

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        def index() -> pb.RepositoryIndexResponse:
            rows = self.service.repository.index(request.ready)
            return pb.RepositoryIndexResponse(models=[
                pb.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r.get("version", ""), state=r["state"],
                                                      reason=r["reason"]) for r in rows])
        return self._call(context, index, METADATA)

    def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                            context: Any) -> pb.RepositoryModelLoadResponse:
        async def load() -> pb.RepositoryModelLoadResponse:
            if request.parameters:
                raise InvalidInput(f"load parameters {sorted(request.parameters)} are not supported: edgerun loads "
                                   "the package as it is in the repository")
            await self.service.repository.load(request.model_name)
            return pb.RepositoryModelLoadResponse()
        return self._call(context, load, ADMIN, request.model_name)

    def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                              context: Any) -> pb.RepositoryModelUnloadResponse:
        async def unload() -> pb.RepositoryModelUnloadResponse:
            await self.service.repository.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()
        return self._call(context, unload, ADMIN, request.model_name)

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._call(context, lambda: self._infer(request), INFER, request.model_name)

    def ModelStreamInfer(self, requests: Iterator[pb.ModelInferRequest],
                         context: Any) -> Iterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run side by side (up to STREAM_INFLIGHT); each answer, or its error, is sent
        as it is ready, so answers may come back in another order than the requests (match them by ``id``).
        The token is read once per stream; each request needs the scope to run its model."""
        authorization = _authorization(context)
        grant = self._call(context, lambda: self.service.identify(authorization), None)
        answers: queue.SimpleQueue[Future | _StreamEnd] = queue.SimpleQueue()
        slots = threading.BoundedSemaphore(STREAM_INFLIGHT)

        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                self.service.check(grant, INFER, request.model_name)
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except EdgerunError as exc:
                return pb.ModelStreamInferResponse(error_message=str(exc))

        def answered(fut: Future) -> None:
            slots.release()
            answers.put(fut)

        def read() -> None:
            count, error = 0, None
            try:
                for request in requests:
                    slots.acquire()
                    count += 1
                    asyncio.run_coroutine_threadsafe(one(request), self._loop).add_done_callback(answered)
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

    # --- glue -------------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        service = self.service

        def decode(model: Any) -> _Decoded:
            return _Decoded(*decode_request(request, service.specs(model)[0]))

        def encode(model: Any, outputs: dict) -> pb.ModelInferResponse:
            return encode_response(model.name, model.version, request.id, outputs, outputs,
                                   service.specs(model)[1])

        return await service.infer(request.model_name, request.model_version or None, decode, encode)

    def _call(self, context: Any, fn: Callable[[], R | Awaitable[R]], action: str | None,
              model: str | None = None) -> R:
        """``fn()`` (awaited when it returns an awaitable) on the event loop, once the call's token allows
        ``action`` on ``model`` (None: every model; no action: no check); an EdgerunError aborts the call."""
        service = self.service
        check = action is not None and service.access.enabled
        authorization = _authorization(context) if check else None

        async def on_loop() -> R:
            if check:
                service.authorize(authorization, action, model or None)  # type: ignore[arg-type]
            result = fn()
            return await result if inspect.isawaitable(result) else result  # type: ignore[return-value]

        call = on_loop()
        try:
            future = asyncio.run_coroutine_threadsafe(call, self._loop)
        except RuntimeError:  # the event loop is closed: the server is stopping
            call.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping; retry")
            raise
        try:
            return future.result()
        except EdgerunError as exc:
            context.abort(_code(exc), str(exc))
            raise  # abort raises; this is for type checkers


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


def _code(exc: EdgerunError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


class GrpcServer:
    """Serve ``GRPCInferenceService`` on ``server.host:server.grpc_port`` until ``stop()``; over TLS when
    ``server.tls_cert_file`` is set, requiring client certificates when ``server.tls_client_ca_file`` is. Start it
    from the event loop its calls are to run on."""

    def __init__(self, service: InferenceService, config: ServerConfig, extensions: list[str]):
        self.config = config
        self.address: str | None = None
        self._service, self._extensions = service, extensions
        self._tls = server_tls(config)
        self._workers = ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="edgerun-grpc")
        limit = config.max_body + (1 << 20)  # the body limit, plus room for the message's own fields
        self._server = grpc.server(self._workers, options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 256),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])

    async def start(self) -> str:
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._service, self._extensions, asyncio.get_running_loop()), self._server)
        host = self.config.host
        target = f"[{host}]:{self.config.grpc_port}" if ":" in host else f"{host}:{self.config.grpc_port}"
        try:
            if self._tls is None:
                port = self._server.add_insecure_port(target)
            else:
                key, cert, ca = self._tls.pem()
                credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                          require_client_auth=ca is not None)
                port = self._server.add_secure_port(target, credentials)
        except RuntimeError as exc:
            port, reason = 0, str(exc)
        else:
            reason = "the address is in use or not available"
        if port == 0:
            self._workers.shutdown(wait=False)
            raise ConfigError(f"cannot listen for gRPC on {target}: {reason}", key="server.grpc_port")
        self._server.start()
        self.address = f"{'grpc' if self._tls is None else 'grpcs'}://{target.rsplit(':', 1)[0]}:{port}"
        log.info("serving KServe v2 gRPC on %s", self.address)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let those in flight finish (up to ``grace`` seconds), then close. The event loop
        goes on meanwhile: the calls in flight run on it."""
        await asyncio.to_thread(self._server.stop(grace).wait)
        self._workers.shutdown(wait=False, cancel_futures=True)
        log.info("gRPC server stopped")
