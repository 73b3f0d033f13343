"""``edgerun.Client`` over gRPC (``grpc://host:port``, ``grpcs://`` over TLS): the same calls as over HTTP, on the
generated stubs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import grpc
import numpy as np

from edgerun.errors import EdgerunError, Forbidden, InvalidInput, ModelNotFound, ModelNotReady, Unauthenticated
from edgerun.grpc import inference_pb2 as pb
from edgerun.grpc import inference_pb2_grpc
from edgerun.grpc.tensors import decode_response, encode_request

# the error a status stands for: each class carries its own gRPC code, so this reads them off
_BY_CODE = {cls.grpc_code: cls for cls in (InvalidInput, ModelNotFound, ModelNotReady, Unauthenticated, Forbidden)}


class GrpcError(EdgerunError):
    """The server ended a call with a status that has no more specific edgerun error."""


class GrpcTransport:
    def __init__(self, target: str, *, token: str | None, timeout: float, tls: tuple[Any, Any, Any] | None = None):
        """``tls``: (CA file or None for the system's, client certificate file, its key file), for grpcs://."""
        options = [("grpc.max_receive_message_length", -1)]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            ca, cert, key = (Path(p).read_bytes() if p else None for p in tls)
            credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            cls = _BY_CODE.get(code.name) if code is not None else None
            if cls is not None:
                raise cls(exc.details()) from None
            raise GrpcError(f"gRPC {code.name if code else 'error'}: {exc.details()}") from None

    def live(self) -> bool:
        try:
            return self._call("ServerLive", pb.ServerLiveRequest()).live
        except EdgerunError:
            return False

    def ready(self) -> bool:
        try:
            return self._call("ServerReady", pb.ServerReadyRequest()).ready
        except EdgerunError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        r = self._call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}

    def models(self) -> list[dict[str, Any]]:
        r = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in r.models]

    def metadata(self, model: str, version: int | None) -> dict[str, Any]:
        r = self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=_version(version)))

        def tensors(ts: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {"name": r.name, "versions": list(r.versions), "platform": r.platform,
                "inputs": tensors(r.inputs), "outputs": tensors(r.outputs)}

    def model_ready(self, model: str, version: int | None) -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=model, version=_version(version))).ready

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None,
              outputs: Iterable[str] | None) -> dict[str, np.ndarray]:
        return decode_response(self._call("ModelInfer", encode_request(model, version, inputs, outputs)))


def _version(version: int | None) -> str:
    return str(version) if version is not None else ""
