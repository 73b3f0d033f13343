"""The KServe v2 gRPC front end (``inference.GRPCInferenceService``): glue around the inference service.

It runs on the daemon's event loop (grpc.aio) and shares the HTTP server's inference service (so batching,
limits, metrics and statistics are one) and its access control: ``authorization: Bearer <token>`` metadata on
every call but ServerLive and ServerReady, each call needing the scope its HTTP twin needs. An EdgerunError ends
a call with the error's gRPC code and message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

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


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService, extensions: list[str]):
        self.service = service
        self.runtime = service.runtime
        self._extensions = extensions

    # --- the calls --------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.runtime.models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            try:
                self.service.model(request.name, request.version or None)
            except ModelNotFound:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)
        return await self._call(context, ready, METADATA, request.name)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return await self._call(context, lambda: pb.ServerMetadataResponse(
            name="edgerun", version=edgerun.__version__, extensions=self._extensions), SERVER)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        def metadata() -> pb.ModelMetadataResponse:
            m = self.service.model(request.name, request.version or None)
            return model_metadata(m.name, self.service.versions(m.name), f"{m.backend}_{m.variant.format}",
                                  m.inputs, m.outputs)
        return await self._call(context, metadata, METADATA, request.name)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        def config() -> pb.ModelConfigResponse:
            doc = self.service.model_config(self.service.model(request.name, request.version or None))
            return json_format.ParseDict({"config": doc}, pb.ModelConfigResponse(), ignore_unknown_fields=True)
        return await self._call(context, config, METADATA, request.name)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: Any) -> pb.ModelStatisticsResponse:
        def statistics() -> pb.ModelStatisticsResponse:
            stats = self.service.statistics(request.name or None, request.version or None)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse(),
                                         ignore_unknown_fields=True)
        return await self._call(context, statistics, METADATA, request.name or None)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Any) -> pb.RepositoryIndexResponse:
        def index() -> pb.RepositoryIndexResponse:
            rows = self.service.repository.index(request.ready)
            return pb.RepositoryIndexResponse(models=[
                pb.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r.get("version", ""), state=r["state"],
                                                      reason=r["reason"]) for r in rows])
        return await self._call(context, index, METADATA)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        async def load() -> pb.RepositoryModelLoadResponse:
            if request.parameters:
                raise InvalidInput(f"load parameters {sorted(request.parameters)} are not supported: edgerun loads "
                                   "the package as it is in the repository")
            await self.service.repository.load(request.model_name)
            return pb.RepositoryModelLoadResponse()
        return await self._call_async(context, load, ADMIN, request.model_name)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        async def unload() -> pb.RepositoryModelUnloadResponse:
            await self.service.repository.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()
        return await self._call_async(context, unload, ADMIN, request.model_name)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._call_async(context, lambda: self._infer(request), INFER, request.model_name)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run side by side (up to STREAM_INFLIGHT); each answer, or its error, is sent
        as it is ready, so answers may come back in another order than the requests (match them by ``id``).
        The token is read once per stream; each request needs the scope to run its model."""
        grant = await self._call(context, lambda: self.service.identify(_authorization(context)), None)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_INFLIGHT)

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                self.service.check(grant, INFER, request.model_name)
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(request)))
            except EdgerunError as exc:
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=str(exc)))
            finally:
                slots.release()

        async def read() -> None:
            tasks = set()
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.ensure_future(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(tasks)
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a broken request stream ends the call with its error
        finally:
            reader.cancel()

    # --- glue -------------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        service = self.service

        def decode(model: Any) -> _Decoded:
            return _Decoded(*decode_request(request, service.specs(model)[0]))

        def encode(model: Any, outputs: dict) -> pb.ModelInferResponse:
            return encode_response(model.name, model.version, request.id, outputs, outputs,
                                   service.specs(model)[1])

        return await service.infer(request.model_name, request.model_version or None, decode, encode)

    def _authorize(self, context: Any, action: str | None, model: str | None) -> None:
        if action is not None and self.service.access.enabled:
            self.service.authorize(_authorization(context), action, model or None)

    async def _call(self, context: Any, fn: Callable[[], R], action: str | None, model: str | None = None) -> R:
        """``fn()`` once the call's token allows ``action`` on ``model`` (None: every model; no action: no check)."""
        try:
            self._authorize(context, action, model)
            return fn()
        except EdgerunError as exc:
            await context.abort(_code(exc), str(exc))
            raise  # abort raises; this is for type checkers

    async def _call_async(self, context: Any, fn: Callable[[], Awaitable[R]], action: str,
                          model: str | None = None) -> R:
        try:
            self._authorize(context, action, model)
            return await fn()
        except EdgerunError as exc:
            await context.abort(_code(exc), str(exc))
            raise


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


def _code(exc: EdgerunError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


class GrpcServer:
    """Serve ``GRPCInferenceService`` on ``server.host:server.grpc_port`` until ``stop()``; over TLS when
    ``server.tls_cert_file`` is set, requiring client certificates when ``server.tls_client_ca_file`` is."""

    def __init__(self, service: InferenceService, config: ServerConfig, extensions: list[str]):
        self.config = config
        self.address: str | None = None
        self._tls = server_tls(config)
        limit = config.max_body + (1 << 20)  # the body limit, plus room for the message's own fields
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 256),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(service, extensions), self._server)

    async def start(self) -> str:
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
            raise ConfigError(f"cannot listen for gRPC on {target}: {exc}", key="server.grpc_port") from None
        if port == 0:
            raise ConfigError(f"cannot listen for gRPC on {target}: the address is in use or not available",
                              key="server.grpc_port")
        await self._server.start()
        self.address = f"{'grpc' if self._tls is None else 'grpcs'}://{target.rsplit(':', 1)[0]}:{port}"
        log.info("serving KServe v2 gRPC on %s", self.address)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let those in flight finish (up to ``grace`` seconds), then close."""
        await self._server.stop(grace)
        log.info("gRPC server stopped")
