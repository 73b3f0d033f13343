"""TLS for the front ends' listeners: the server's certificate and key, and the CA its clients' certificates need.

Checked once at start (each file read, the key matching the certificate, the CA parsed), so a mistake stops
``edgerun serve`` with exit 78 naming the key, and then handed to uvicorn (HTTP) and grpc (gRPC) alike.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerun.errors import ConfigError

if TYPE_CHECKING:
    from edgerun.config import ServerConfig


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None  # set: every client must present a certificate this CA signed (mutual TLS)

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's ssl settings."""
        return {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file),
                "ssl_ca_certs": str(self.client_ca_file) if self.client_ca_file else None,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if self.client_ca_file else ssl.CERT_NONE}

    def context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A server SSLContext with this certificate (TLS 1.2 or newer), requiring client certificates the CA
        signed when one is set; ``alpn``: the protocols it offers (gRPC over TLS needs "h2")."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def pem(self) -> tuple[bytes, bytes, bytes | None]:
        """(key, certificate chain, client CA) as PEM bytes, for grpc.ssl_server_credentials."""
        ca = _read(self.client_ca_file, "server.tls_client_ca_file") if self.client_ca_file else None
        return _read(self.key_file, "server.tls_key_file"), _read(self.cert_file, "server.tls_cert_file"), ca


def server_tls(server: ServerConfig) -> ServerTls | None:
    """The listeners' TLS settings, checked; None when TLS is off (no ``tls_cert_file``)."""
    if server.tls_cert_file is None:
        for key in ("tls_key_file", "tls_client_ca_file"):
            if getattr(server, key) is not None:
                raise ConfigError("needs server.tls_cert_file (and tls_key_file): TLS is off without a certificate",
                                  key=f"server.{key}")
        return None
    if server.tls_key_file is None:
        raise ConfigError("a certificate needs its private key: set server.tls_key_file", key="server.tls_cert_file")
    tls = ServerTls(server.tls_cert_file, server.tls_key_file, server.tls_client_ca_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for path, key in ((tls.cert_file, "server.tls_cert_file"), (tls.key_file, "server.tls_key_file")):
        _read(path, key)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot use {tls.cert_file} with the key {tls.key_file}: {exc} (expected PEM files, the "
                          "key matching the certificate, not encrypted)", key="server.tls_cert_file") from None
    if tls.client_ca_file is not None:
        _read(tls.client_ca_file, "server.tls_client_ca_file")
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"not a PEM CA certificate, {tls.client_ca_file}: {exc}",
                              key="server.tls_client_ca_file") from None
    return tls


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"expected a readable file, cannot read {path}: {exc.strerror}", key=key) from None
