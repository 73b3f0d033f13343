"""``POST /v2/models/{m}[/versions/{v}]/infer``: the HTTP glue around the inference service, in raw ASGI."""

from __future__ import annotations

from edgerun.runtime import LoadedModel
from edgerun.server import codec
from edgerun.server.asgi import JSON, Receive, Send, header, read_body, send_bytes
from edgerun.server.offload import INLINE_MAX
from edgerun.server.offload import decode_request as decode_off_loop
from edgerun.server.state import ServerState

_HEADER_LENGTH = codec.HEADER_LENGTH.encode()
_OCTETS = b"application/octet-stream"
_NO_HEADERS: list[tuple[bytes, bytes]] = []


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


async def answer_infer(state: ServerState, name: str, version: str | None, scope: dict, body: bytes | bytearray,
                       receive: Receive) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """The answer to an infer request's body: the service decodes, queues (batched), runs and encodes it.

    A body above ``INLINE_MAX`` is decoded in a worker thread, so the event loop keeps answering meanwhile.
    ``receive`` tells when the client leaves (its queued run is then dropped). Errors propagate.
    """
    service = state.service
    header_length = header(scope, _HEADER_LENGTH)
    request: codec.InferRequest | None = None

    def decode(model: LoadedModel) -> codec.InferRequest:
        nonlocal request
        request = codec.decode_request(body, header_length, model.name, service.specs(model)[0])
        return request

    async def decode_large(model: LoadedModel) -> codec.InferRequest:
        nonlocal request
        request = await decode_off_loop(body, header_length, model.name, service.specs(model)[0])
        return request

    def encode(model: LoadedModel, outputs: dict) -> tuple[bytes, int | None]:
        out_types = service.specs(model)[1]
        return codec.encode_response(model.name, model.version, request.id, outputs,  # type: ignore[union-attr]
                                     request.wanted(out_types), out_types)  # type: ignore[union-attr]

    out, header_len = await service.infer(name, version, decode if len(body) <= INLINE_MAX else decode_large,
                                          encode, wait=lambda fut: state.watch.wait(fut, receive))
    if header_len is None:
        return out, JSON, _NO_HEADERS
    return out, _OCTETS, [(_HEADER_LENGTH, str(header_len).encode())]
