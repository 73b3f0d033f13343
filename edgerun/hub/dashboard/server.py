"""Serving the dashboard: the token, which addresses may be bound, uvicorn with a clean stop.

Open streams would hold uvicorn's graceful shutdown forever, so the server ends them first; signals are
handled here (SIGINT, SIGTERM), not by uvicorn, so the caller gets to stop its watcher afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from edgerun.errors import ConfigError
from edgerun.server.http import bind, is_loopback

__all__ = ["bind", "check_bind", "read_token", "serve", "url_of"]

log = logging.getLogger(__name__)

TOKEN_ENV = "EDGERUN_HUB_TOKEN"


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: ``token_file`` when given, else ``EDGERUN_HUB_TOKEN``; None when neither is set."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
            mode = Path(token_file).stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read the dashboard token file: {exc}") from None
        if not token:
            raise ConfigError(f"the dashboard token file {token_file} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the dashboard token file %s can be read by other users (chmod 600 it)", token_file)
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def check_bind(host: str, token: str | None) -> None:
    """Refuse an address beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"refusing to serve the dashboard on {host} without a token: put one in a file given with "
                          f"--token-file, or in {TOKEN_ENV} (or keep the default --host 127.0.0.1)")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class DashboardServer(uvicorn.Server):
    """uvicorn for the dashboard app: no signal handling of its own, streams ended before connections."""

    def __init__(self, app: Starlette):
        super().__init__(uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", access_log=False,
                                        server_header=False,
                                        proxy_headers=False, ws="none", loop="asyncio",
                                        timeout_graceful_shutdown=3, timeout_keep_alive=30))
        self.app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.feed.close_streams()
        await super().shutdown(sockets)


def serve(app: Starlette, sock: socket.socket, *, on_started: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; returns once every connection is closed."""
    server = DashboardServer(app)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and on_started is not None:
            on_started()
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()


class ServerThread:
    """The dashboard served from a thread (tests, benchmarks): ``with ServerThread(app) as s: s.url``."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = DashboardServer(app)
        self._thread = threading.Thread(target=self._run, name="edgerun-dashboard", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc

    def start(self, timeout: float = 10.0) -> "ServerThread":
        self._thread.start()
        for _ in range(int(timeout / 0.01)):
            if self.server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self.server.started:
            raise RuntimeError(f"the dashboard did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()
        if self._thread.is_alive():
            raise RuntimeError("the dashboard did not stop")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
