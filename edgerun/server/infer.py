"""``POST /v2/models/{m}[/versions/{v}]/infer``: the hot path, in raw ASGI."""

from __future__ import annotations

import logging
from time import perf_counter

from edgerun.errors import EdgerunError
from edgerun.runtime import _Retired
from edgerun.server import codec
from edgerun.server.asgi import ClientGone, Receive, Send, header, read_body, send_bytes
from edgerun.server.errors import HttpError, bad_request, from_edgerun
from edgerun.server.offload import INLINE_MAX
from edgerun.server.offload import decode_request as decode_off_loop
from edgerun.server.state import ServerState

log = logging.getLogger(__name__)

_HEADER_LENGTH = codec.HEADER_LENGTH.encode()


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
    """Decode, queue (batched), run, encode; errors become ``{"error": ...}`` with their status."""
    metrics = state.metrics
    label = ""
    try:
        body = await read_body(scope, receive, state.max_body)
        t0 = perf_counter()
        for _ in range(3):
            model = state.model(name, version)
            label = model.name
            specs, out_types = state.specs(model)
            req = (codec.decode_request(body, header(scope, _HEADER_LENGTH), model.name, specs)
                   if len(body) <= INLINE_MAX else
                   await decode_off_loop(body, header(scope, _HEADER_LENGTH), model.name, specs))
            checked = model.check_inputs(req.inputs)
            try:
                result = await state.watch.wait(state.scheduler(model).submit(checked), receive)
                break
            except _Retired:
                continue  # swapped out between lookup and run: look the model up again
        else:
            raise HttpError(503, f"model {name!r} is being replaced; retry", "not_ready")
        if req.outputs is None:
            wanted = [(o, req.binary_default) for o in out_types]
        else:
            wanted = req.outputs
            for o, _ in wanted:
                if o not in out_types:
                    raise bad_request(f"model {model.name!r} has no output {o!r}; its outputs are {sorted(out_types)}")
        out, header_len = codec.encode_response(model.name, model.version, req.id, result, wanted, out_types)
        metrics.success(label, perf_counter() - t0)
    except HttpError as err:
        metrics.failure(label, err.reason)
        raise
    except EdgerunError as exc:
        err = from_edgerun(exc)
        metrics.failure(label, err.reason)
        raise err from None
    except ClientGone:
        metrics.failure(label, "client_gone")  # its queued run, if any, is dropped
        raise
    except Exception as exc:
        log.exception("inference on %s failed", name)
        metrics.failure(label, "internal")
        raise HttpError(500, f"inference failed: {type(exc).__name__}: {exc}") from None
    if header_len is None:
        await send_bytes(send, 200, out)
    else:
        await send_bytes(send, 200, out, b"application/octet-stream",
                         [(_HEADER_LENGTH, str(header_len).encode())])
