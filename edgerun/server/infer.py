"""``POST /v2/models/{m}[/versions/{v}]/infer``: the HTTP glue around the inference service, in raw ASGI."""

from __future__ import annotations

from typing import Callable, Protocol

from edgerun.errors import EdgerunError
from edgerun.runtime import LoadedModel
from edgerun.server import codec
from edgerun.server.asgi import JSON, Receive, Send, header, read_body, send_bytes
from edgerun.server.offload import INLINE_MAX
from edgerun.server.offload import decode_request as decode_off_loop
from edgerun.server.state import ServerState

_HEADER_LENGTH = codec.HEADER_LENGTH.encode()
_OCTETS = b"application/octet-stream"
_NO_HEADERS: list[tuple[bytes, bytes]] = []


class Cancellable(Protocol):
    def cancel(self) -> None: ...


def parse_infer_path(path: str) -> tuple[str, str | None] | None:
    """(model, version) from ``/v2/models/{m}[/versions/{v}]/infer``, or None if the path is not that."""
    parts = path.split("/")
    # ['', 'v2', 'models', m, 'infer'] or ['', 'v2', 'models', m, 'versions', v, 'infer']
    if parts[-1] != "infer":
        return None
    if len(parts) == 5 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3], None
    if len(parts) == 7 and parts[1] == "v2" and parts[2] == "models" and parts[4] == "versions" and parts[3]:
        return parts[3], parts[5]
    return None


async def handle_infer(state: ServerState, name: str, version: str | None, scope: dict, receive: Receive,
                       send: Send) -> None:
    """Read the body, then answer it (``answer_infer``); errors propagate."""
    body = await read_body(scope, receive, state.max_body)
    out, content_type, extra = await answer_infer(state, name, version, scope, body, receive)
    await send_bytes(send, 200, out, content_type, extra)


Answer = tuple[bytes, bytes, list[tuple[bytes, bytes]]]  # body, content type, extra headers


async def answer_infer(state: ServerState, name: str, version: str | None, scope: dict, body: bytes | bytearray,
                       receive: Receive) -> Answer:
    """The answer to an infer request's body: the service decodes, queues (batched), runs and encodes it.

    A body above ``INLINE_MAX`` is decoded in a worker thread, so the event loop keeps answering meanwhile.
    ``receive`` tells when the client leaves (its queued run is then dropped). Errors propagate.
    """
    c = _Codec(state, scope, body)
    out = await state.service.infer(name, version, c.decode if len(body) <= INLINE_MAX else c.decode_large,
                                    c.encode, wait=lambda fut: state.watch.wait(fut, receive))
    return _answer(out)


def answer_infer_soon(state: ServerState, name: str, version: str | None, scope: dict, body: bytes | bytearray,
                      done: Callable[[Answer | None, EdgerunError | None], None]) -> Cancellable:
    """``answer_infer`` without a task, for a body whose JSON part is at most ``INLINE_MAX`` bytes (decoded on the
    event loop): ``done(answer, None)`` or ``done(None, error)`` on the event loop. ``cancel()`` on what it
    returns says the client left."""
    c = _Codec(state, scope, body)

    def answered(out: tuple[bytes, int | None] | None, error: EdgerunError | None) -> None:
        if out is None:
            done(None, error)
        else:
            done(_answer(out), None)

    return state.service.infer_soon(name, version, c.decode, c.encode, answered)


class _Codec:
    """An HTTP request's decode (on the loop, or ``decode_large``: off it) and encode, sharing the request decoded."""

    __slots__ = ("service", "body", "header_length", "request")

    def __init__(self, state: ServerState, scope: dict, body: bytes | bytearray):
        self.service = state.service
        self.body = body
        self.header_length = header(scope, _HEADER_LENGTH)
        self.request: codec.InferRequest | None = None

    def decode(self, model: LoadedModel) -> codec.InferRequest:
        self.request = codec.decode_request(self.body, self.header_length, model.name,
                                            self.service.specs(model)[0])
        return self.request

    async def decode_large(self, model: LoadedModel) -> codec.InferRequest:
        self.request = await decode_off_loop(self.body, self.header_length, model.name,
                                             self.service.specs(model)[0])
        return self.request

    def encode(self, model: LoadedModel, outputs: dict) -> tuple[bytes, int | None]:
        out_types = self.service.specs(model)[1]
        request = self.request
        return codec.encode_response(model.name, model.version, request.id, outputs,  # type: ignore[union-attr]
                                     request.wanted(out_types), out_types)  # type: ignore[union-attr]


def _answer(out: tuple[bytes, int | None]) -> Answer:
    body, header_len = out
    if header_len is None:
        return body, JSON, _NO_HEADERS
    return body, _OCTETS, [(_HEADER_LENGTH, str(header_len).encode())]
