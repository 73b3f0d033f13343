"""The ASGI application: access and body limits up front, ``infer`` on a raw fast path, the rest on Starlette."""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson

from edgerun.config import Config
from edgerun.errors import ClientGone, EdgerunError
from edgerun.runtime import Runtime
from edgerun.server.asgi import JSON, Receive, Send, header, send_error, send_json
from edgerun.server.auth import needs
from edgerun.server.errors import HttpError
from edgerun.server.infer import Answer, Cancellable, answer_infer_soon, handle_infer, parse_infer_path
from edgerun.server.routes import build_routes
from edgerun.server.state import ServerState
from edgerun.serving.service import InferenceService

log = logging.getLogger(__name__)

Reply = tuple[int, bytes, list[tuple[bytes, bytes]], bytes]  # status, content type, headers, body


class EdgerunApp:
    """An ASGI app serving KServe v2 for a Runtime's models."""

    def __init__(self, runtime: Runtime, config: Config, service: InferenceService | None = None):
        self.state = ServerState(runtime, config, service)
        self._routes = build_routes(self.state)
        self._access = self.state.service.access
        self._max_body = self.state.max_body

    @property
    def in_flight(self) -> int:
        """HTTP requests being handled right now."""
        return self.state.in_flight

    def close(self) -> None:
        self.state.close()

    def watch_front_door(self, door: Any) -> None:
        """Export the listener's connection counts in /metrics (``HttpServer`` calls this)."""
        self.state.metrics.watch_front_door(door)

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        state = self.state
        state.in_flight += 1
        try:
            if self._access.enabled:
                need = needs(_no_slash(scope)["path"])
                if need is not None:
                    try:
                        state.service.authorize(header(scope, b"authorization"), *need)
                    except EdgerunError as err:
                        await send_error(send, err)
                        return
            target = parse_infer_path(scope["path"])
            if target is None and scope["path"].endswith("/"):
                scope = _no_slash(scope)  # served as the path without it (no redirect naming the Host header)
                target = parse_infer_path(scope["path"])
            if target is not None:
                try:
                    if scope["method"] != "POST":
                        raise HttpError(405, f"method {scope['method']} not allowed on {scope['path']}; use POST",
                                        headers={"allow": "POST"})
                    await handle_infer(state, target[0], target[1], scope, receive, send)
                except ClientGone:
                    pass
                except EdgerunError as err:
                    await send_error(send, err)
                return
            length = _content_length(scope)
            if length is not None and length > self._max_body:
                state.metrics.failure("", "too_large")
                await send_error(send, HttpError(413, f"request body of {length} bytes exceeds the limit of "
                                                      f"{self._max_body} bytes (server.max_body)"))
                return
            await self._routes(scope, receive, send)
        finally:
            state.in_flight -= 1

    def answer_soon(self, scope: dict, body: bytes | bytearray, reply: Callable[[Reply | None], None]
                    ) -> Cancellable | None:
        """Answer an infer request whose whole body has arrived (its JSON part at most ``INLINE_MAX`` bytes, decoded
        on the event loop), without a task: ``reply((status, content type, headers, body))`` on the event loop,
        perhaps before this returns, or ``reply(None)`` when the client left. The listener calls this for a plain
        ``POST .../infer`` instead of the ASGI app; ``cancel()`` on what it returns (None: answered already) says
        the client left."""
        state = self.state
        state.in_flight += 1

        def done(answer: Answer | None, error: EdgerunError | None) -> None:
            state.in_flight -= 1
            if answer is not None:
                reply((200, answer[1], answer[2], answer[0]))
            elif isinstance(error, ClientGone):
                reply(None)
            else:
                reply(_error_reply(error))  # type: ignore[arg-type]

        try:
            if self._access.enabled:
                need = needs(scope["path"])
                if need is not None:
                    state.service.authorize(header(scope, b"authorization"), *need)
            target = parse_infer_path(scope["path"])
            if target is None:
                raise HttpError(404, f"no such endpoint: POST {scope['path']}")
            if len(body) > self._max_body:
                raise HttpError(413, f"request body exceeds the limit of {self._max_body} bytes (server.max_body)")
        except EdgerunError as err:
            done(None, err)
            return None
        return answer_infer_soon(state, target[0], target[1], scope, body, done)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _error_reply(err: EdgerunError) -> Reply:
    return (err.http_status, JSON, [(k.encode(), v.encode()) for k, v in err.headers.items()],
            orjson.dumps({"error": str(err)}))


def _content_length(scope: dict) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _no_slash(scope: dict) -> dict:
    """The scope with its path's trailing slashes taken off."""
    path = scope["path"]
    if len(path) < 2 or path[-1] != "/":
        return scope
    stripped = path.rstrip("/") or "/"
    raw = scope.get("raw_path")
    return {**scope, "path": stripped, "raw_path": raw.rstrip(b"/") or b"/" if raw else raw}


def create_app(runtime: Runtime, config: Config, service: InferenceService | None = None) -> Any:
    """The ASGI app for ``edgerun serve`` (see docs/http-api.md); front ends of one server share ``service``."""
    return EdgerunApp(runtime, config, service)


__all__ = ["EdgerunApp", "create_app", "send_json"]
