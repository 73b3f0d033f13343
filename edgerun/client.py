"""``edgerun.Client``: a small KServe v2 client for a running ``edgerun serve``, over HTTP or gRPC."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Iterable, Mapping

import httpx
import numpy as np

from edgerun.errors import EdgerunError, Forbidden, InvalidInput, ModelNotFound, ModelNotReady, Unauthenticated

# the error a status stands for: each class carries its own status, so this reads them off
_BY_STATUS = {cls.http_status: cls for cls in (InvalidInput, ModelNotFound, ModelNotReady, Unauthenticated, Forbidden)}


class ServerError(EdgerunError):
    """The server answered with an error status that has no more specific edgerun error."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """Talk to an edgerun (or any KServe v2) server: ``http(s)://host:port`` (binary tensors) or
    ``grpc(s)://host:port``.

    Over TLS (``https://``, ``grpcs://``), ``ca`` is the CA file that signed the server's certificate (default:
    the system's), and ``cert`` and ``key`` the client's certificate and key for a server that requires one.

    >>> c = Client("http://127.0.0.1:8000", token=None)              # doctest: +SKIP
    >>> c.infer("digits", {"input": x})["probabilities"]               # doctest: +SKIP
    >>> Client("grpc://127.0.0.1:8001").infer("digits", {"input": x})  # doctest: +SKIP
    >>> Client("https://dev.lan:8000", ca="ca.pem", cert="me.pem", key="me.key")  # doctest: +SKIP
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 30.0,
                 uds: str | None = None, ca: str | Path | None = None, cert: str | Path | None = None,
                 key: str | Path | None = None):
        scheme = url.partition("://")[0]
        if (ca or cert or key) and scheme not in ("https", "grpcs"):
            raise ValueError(f"ca, cert and key are TLS settings: use https:// or grpcs://, not {scheme}://")
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key: give both cert and key")
        if scheme in ("grpc", "grpcs"):
            if uds:
                raise ValueError("uds is for HTTP; a gRPC client takes grpc://host:port")
            from edgerun.grpc.client import GrpcTransport  # needs grpcio: pip install 'edgerun[grpc]'

            tls = (ca, cert, key) if scheme == "grpcs" else None
            self._t: Any = GrpcTransport(url.partition("://")[2].rstrip("/"), token=token, timeout=timeout, tls=tls)
        else:
            verify = _ssl_context(ca, cert, key) if scheme == "https" else True
            self._t = _HttpTransport(url, token=token, timeout=timeout, uds=uds, verify=verify)

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def live(self) -> bool:
        """Whether the server process answers at all."""
        return self._t.live()

    def ready(self) -> bool:
        """Whether the server is up and serving at least one model."""
        return self._t.ready()

    def server_metadata(self) -> dict[str, Any]:
        return self._t.server_metadata()

    def models(self) -> list[dict[str, Any]]:
        """Every served model version: name, version, state (and over HTTP variant and backend)."""
        return self._t.models()

    def metadata(self, model: str, version: int | None = None) -> dict[str, Any]:
        return self._t.metadata(model, version)

    def model_ready(self, model: str, version: int | None = None) -> bool:
        return self._t.model_ready(model, version)

    def infer(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None, binary: bool = True,
              outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Run ``{input name: array}`` on the server; returns ``{output name: array}``.

        ``binary`` chooses binary tensors over JSON on HTTP; gRPC always sends raw tensors.
        """
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        wanted = list(outputs) if outputs is not None else None
        if isinstance(self._t, _HttpTransport):
            return self._t.infer(model, arrays, version, wanted, binary=binary)
        return self._t.infer(model, arrays, version, wanted)


def _ssl_context(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class _HttpTransport:
    def __init__(self, url: str, *, token: str | None, timeout: float, uds: str | None,
                 verify: ssl.SSLContext | bool = True):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(uds=uds, verify=verify) if uds else None
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport,
                                  verify=verify)

    def close(self) -> None:
        self._http.close()

    def live(self) -> bool:
        try:
            return self._http.get("/v2/health/live").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        try:
            return self._http.get("/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        return self._get("/v2")

    def models(self) -> list[dict[str, Any]]:
        return self._check(self._http.post("/v2/repository/index", content=b'{"ready": true}')).json()

    def metadata(self, model: str, version: int | None) -> dict[str, Any]:
        return self._get(_model_path(model, version))

    def model_ready(self, model: str, version: int | None) -> bool:
        return self._http.get(_model_path(model, version) + "/ready").status_code == 200

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None, outputs: list[str] | None,
              *, binary: bool) -> dict[str, np.ndarray]:
        from edgerun.server.codec import HEADER_LENGTH, decode_response, encode_request

        body, header_len = encode_request(inputs, binary=binary, outputs=outputs)
        headers = {"content-type": "application/octet-stream" if header_len is not None else "application/json"}
        if header_len is not None:
            headers[HEADER_LENGTH] = str(header_len)
        r = self._check(self._http.post(_model_path(model, version) + "/infer", content=body, headers=headers))
        length = r.headers.get(HEADER_LENGTH)
        _, out = decode_response(r.content, int(length) if length is not None else None)
        return out

    def _get(self, path: str) -> Any:
        return self._check(self._http.get(path)).json()

    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.status_code < 400:
            return r
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        cls = _BY_STATUS.get(r.status_code)
        if cls is not None:
            raise cls(message)
        raise ServerError(r.status_code, message)


def _model_path(model: str, version: int | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")
