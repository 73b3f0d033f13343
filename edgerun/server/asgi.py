"""Small raw-ASGI helpers: read a bounded body, send JSON and error responses."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import orjson

from edgerun.server.errors import HttpError

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def read_body(scope: dict, receive: Receive, limit: int) -> bytes:
    """The whole request body; 413 as soon as it exceeds ``limit`` (Content-Length is checked first)."""
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes "
                             "(server.max_body)")
    msg = await receive()
    if msg["type"] != "http.request":
        raise ClientGone()
    body = msg.get("body", b"")
    if not msg.get("more_body", False):
        if len(body) > limit:
            raise HttpError(413, f"request body exceeds the limit of {limit} bytes (server.max_body)")
        return body
    parts = [body]
    size = len(body)
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            raise ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body exceeds the limit of {limit} bytes (server.max_body)")
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


async def until_done_or_gone(fut: asyncio.Future, receive: Receive, patience: float = 0.05) -> Any:
    """``fut``'s result; if it waits over ``patience`` s and the client disconnects, cancel ``fut`` and raise.

    A cancelled queued run is skipped by the scheduler, so an abandoned request costs no compute. The
    connection is watched only past ``patience``, keeping the common, short wait free of that cost.
    """
    if fut.done():
        return fut.result()
    gone: list[bool] = []
    watch: list[asyncio.Future] = []

    def on_message(w: asyncio.Future) -> None:
        if not w.cancelled() and w.exception() is None and w.result().get("type") == "http.disconnect":
            if not fut.done():
                gone.append(True)
                fut.cancel()

    def start_watching() -> None:
        if not fut.done():  # after the body, receive() returns only on disconnect
            w = asyncio.ensure_future(receive())
            w.add_done_callback(on_message)
            watch.append(w)

    timer = asyncio.get_running_loop().call_later(patience, start_watching)
    try:
        return await fut
    except asyncio.CancelledError:
        if gone:
            raise ClientGone() from None
        raise
    finally:
        timer.cancel()
        if watch and not watch[0].done():
            watch[0].cancel()


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, doc: Any) -> None:
    await send_bytes(send, status, orjson.dumps(doc))


async def send_error(send: Send, err: HttpError) -> None:
    extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
    await send_bytes(send, err.status, orjson.dumps({"error": err.message}), extra=extra)
