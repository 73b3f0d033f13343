"""Small raw-ASGI helpers: read a bounded (and maybe compressed) body, send JSON and error responses."""

from __future__ import annotations

import asyncio
import zlib
from functools import partial
from typing import Any, Awaitable, Callable

import orjson

from edgerun.errors import ClientGone, EdgerunError
from edgerun.server import offload
from edgerun.server.errors import HttpError

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
JSON = b"application/json"


def header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def read_body(scope: dict, receive: Receive, limit: int, key: str = "server.max_body"
                    ) -> bytes | bytearray:
    """The whole request body, decompressed; 413 as soon as it exceeds ``limit`` (Content-Length is checked first).

    gzip and deflate bodies (``Content-Encoding``) are decompressed in a worker thread, and their decompressed size
    counts against ``limit``; any other encoding is a 415.
    """
    length = encoding = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"content-encoding":
            encoding = value
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes ({key})")
    msg = await receive()
    if msg["type"] != "http.request":
        raise ClientGone()
    body = msg.get("body", b"")
    if msg.get("more_body", False):
        buf = bytearray(body)  # grown in place: no second copy of a large body at the end, on the event loop
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise ClientGone()
            chunk = msg.get("body", b"")
            if len(buf) + len(chunk) > limit:
                raise HttpError(413, f"request body exceeds the limit of {limit} bytes ({key})")
            buf += chunk
            if not msg.get("more_body", False):
                break
        body = buf
    elif len(body) > limit:
        raise HttpError(413, f"request body exceeds the limit of {limit} bytes ({key})")
    if encoding is not None:
        codings = _codings(encoding)
        if codings:
            body = await offload.run(_decompress, body, codings, limit, key)
    return body


ENCODINGS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def _codings(header: bytes) -> list[bytes]:
    """The encodings applied to a body, first to last (``identity`` left out); 415 for one not supported."""
    codings = []
    for token in header.split(b","):
        coding = token.strip().lower()
        if coding in ENCODINGS:
            codings.append(coding)
        elif coding not in (b"identity", b""):
            raise HttpError(415, f"Content-Encoding {coding.decode(errors='replace')!r} is not supported; send the "
                                 "body uncompressed, or compressed with gzip or deflate", "unsupported_encoding",
                            {"accept-encoding": "gzip, deflate"})
    return codings


def _decompress(body: bytes | bytearray, codings: list[bytes], limit: int, key: str) -> bytes:
    """Undo ``codings`` (last applied first); 413 once the result exceeds ``limit`` (a zip bomb stops there)."""
    for coding in reversed(codings):
        body = _inflate(body, coding, limit, key)
    return body


def _inflate(data: bytes | bytearray, coding: bytes, limit: int, key: str) -> bytes:
    name = coding.decode()
    out = []
    size = 0
    while True:
        d = zlib.decompressobj(ENCODINGS[coding])
        try:
            chunk = d.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            if coding == b"deflate" and not out:  # some clients send raw deflate, without the zlib wrapper
                d = zlib.decompressobj(-zlib.MAX_WBITS)
                try:
                    chunk = d.decompress(data, limit + 1 - size)
                except zlib.error:
                    raise HttpError(400, f"request body is not valid {name} data ({exc})") from None
            else:
                raise HttpError(400, f"request body is not valid {name} data ({exc})") from None
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body decompresses to more than the limit of {limit} bytes ({key})")
        out.append(chunk)
        if not d.eof:
            raise HttpError(400, f"request body is truncated {name} data")
        data = d.unused_data  # gzip allows several members one after the other
        if not data:
            return out[0] if len(out) == 1 else b"".join(out)


class DisconnectWatch:
    """Await results, cancelling those whose client disconnects while they wait; one timer for all of them.

    A cancelled queued run is skipped by the scheduler, so an abandoned request costs no compute. A request
    is watched once it has waited through one tick of ``patience`` seconds (so between one and two ticks):
    the common, short wait costs a few dict operations and no timer of its own.
    """

    def __init__(self, patience: float = 0.05):
        self.patience = patience
        self._new: dict[asyncio.Future, Receive] = {}  # registered since the last tick
        self._old: dict[asyncio.Future, Receive] = {}  # waited through one tick: watched at the next
        self._watchers: dict[asyncio.Future, asyncio.Future] = {}  # receive() calls that return on disconnect
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, fut: asyncio.Future, receive: Receive) -> Any:
        """``fut``'s result; ClientGone if the client disconnected first (``fut`` is then cancelled)."""
        if fut.done():
            return fut.result()
        self._new[fut] = receive
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.patience, self._tick)
        try:
            return await fut
        except asyncio.CancelledError:
            if _disconnected(self._watchers.get(fut)):
                raise ClientGone() from None
            raise
        finally:
            self._new.pop(fut, None)
            self._old.pop(fut, None)
            watcher = self._watchers.pop(fut, None)
            if watcher is not None and not watcher.done():
                watcher.cancel()

    def _tick(self) -> None:
        self._timer = None
        for fut, receive in self._old.items():
            if not fut.done():  # after the body, receive() returns only on disconnect
                watcher = asyncio.ensure_future(receive())
                watcher.add_done_callback(partial(self._on_message, fut))
                self._watchers[fut] = watcher
        self._old, self._new = self._new, {}
        if self._old:
            self._timer = asyncio.get_running_loop().call_later(self.patience, self._tick)

    @staticmethod
    def _on_message(fut: asyncio.Future, watcher: asyncio.Future) -> None:
        if _disconnected(watcher) and not fut.done():
            fut.cancel()


def _disconnected(watcher: asyncio.Future | None) -> bool:
    """Whether a finished receive() said the client went away."""
    return (watcher is not None and watcher.done() and not watcher.cancelled() and watcher.exception() is None
            and watcher.result().get("type") == "http.disconnect")


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, doc: Any) -> None:
    await send_bytes(send, status, orjson.dumps(doc))


async def send_error(send: Send, err: EdgerunError) -> None:
    """``{"error": message}`` with the error's HTTP status and headers."""
    extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
    await send_bytes(send, err.http_status, orjson.dumps({"error": str(err)}), extra=extra)
