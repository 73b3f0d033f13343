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
from pathlib import Path
from typing import Any, Iterator

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgerun.config import ServerConfig
from edgerun.errors import ConfigError

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


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a corked transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CorkedTransport(transport, self.loop))  # type: ignore[arg-type]


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
        """Refuse a non-loopback TCP address without a token unless ``allow_insecure`` is set."""
        if self._checked:
            return
        self._checked = True
        c = self.config
        if c.host and not is_loopback(c.host) and not c.token():
            if not getattr(c, "allow_insecure", False):
                raise ConfigError(f"refusing to listen on {c.host} without an API token: set EDGERUN_API_TOKEN or "
                                  "server.token_file (--token-file), or allow it with --allow-insecure",
                                  key="server.host")
            log.warning("listening on %s WITHOUT an API token: anyone who can reach this port can run models",
                        c.host)

    def _sockets(self) -> list[socket.socket]:
        c = self.config
        socks = []
        if c.host:
            sock = bind(c.host, c.port, key="server.port")
            host, port = sock.getsockname()[:2]
            self.addresses.append(f"http://[{host}]:{port}" if sock.family == socket.AF_INET6
                                  else f"http://{host}:{port}")
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
        cfg = uvicorn.Config(self.app, loop="none", http=_HttpProtocol, ws="none", lifespan="on", log_config=None,
                             access_log=False, server_header=False, date_header=False, proxy_headers=False,
                             timeout_graceful_shutdown=self.config.drain_timeout, timeout_keep_alive=30,
                             backlog=1024)
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
