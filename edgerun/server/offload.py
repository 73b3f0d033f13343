"""Work on request bodies too long for the event loop, on a small thread pool: large JSON, decompression."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from edgerun.server import codec, largejson
from edgerun.tensors import TensorSpec

INLINE_MAX = 256 << 10  # JSON up to this many bytes is decoded on the event loop (a millisecond or two)
_pool: ThreadPoolExecutor | None = None


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgerun-body")
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


async def decode_request(body: bytes | bytearray, header_length: bytes | None, model_name: str,
                         specs: Mapping[str, TensorSpec]) -> codec.InferRequest:
    """``codec.decode_request`` for a large body: a large JSON part is decoded in pieces, in a worker thread."""
    if _json_length(body, header_length) <= INLINE_MAX:
        return codec.decode_request(body, header_length, model_name, specs)
    return await run(largejson.decode_request, body, header_length, model_name, specs)


def _json_length(body: bytes | bytearray, header_length: bytes | None) -> int:
    if header_length is None:
        return len(body)
    try:
        return int(header_length)
    except ValueError:
        return 0  # decode_request says what is wrong with it
