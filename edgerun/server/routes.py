"""Every endpoint but ``infer``: health, metadata, readiness, model config, statistics, repository, metrics."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import edgerun
from edgerun.errors import EdgerunError, InvalidInput
from edgerun.server.asgi import read_body
from edgerun.server.codec import json_problem
from edgerun.server.errors import HttpError
from edgerun.server.state import ServerState
from edgerun.serving.service import EXTENSIONS

log = logging.getLogger(__name__)

SMALL_BODY_MAX = 64 << 10  # a repository call's body says {"ready": true} or names parameters: no more


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type="application/json")


def _error(exc: EdgerunError) -> Response:
    return Response(orjson.dumps({"error": str(exc)}), exc.http_status, exc.headers or None,
                    media_type="application/json")


async def _json_body(request: Request, what: str) -> dict[str, Any]:
    """An optional JSON object body ({} when empty), of at most SMALL_BODY_MAX bytes."""
    body = await read_body(request.scope, request.receive, SMALL_BODY_MAX, f"for {what}")
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(json_problem(exc)) from None
    if type(doc) is not dict:
        raise InvalidInput("request body must be a JSON object")
    return doc


def build_routes(state: ServerState) -> Starlette:
    service = state.service
    runtime = state.runtime
    repository = state.repository

    def lookup(request: Request):
        p = request.path_params
        return service.model(p["model"], p.get("version"))

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        if not runtime.models():
            return _json({"ready": False, "error": "no model is loaded"}, 503)
        return _json({"ready": True})

    async def server_metadata(request: Request) -> Response:
        return _json({"name": "edgerun", "version": edgerun.__version__, "extensions": EXTENSIONS})

    async def model_metadata(request: Request) -> Response:
        m = lookup(request)
        policy = service.policy(m)
        return _json({"name": m.name, "versions": [str(v) for v in service.versions(m.name)],
                      "platform": f"{m.backend}_{m.variant.format}",
                      "inputs": [s.to_dict() for s in m.inputs], "outputs": [s.to_dict() for s in m.outputs],
                      "parameters": {"variant": m.variant.id, "precision": m.variant.precision,
                                     "device": str(m.session.device),
                                     "batching": policy.batching, "max_batch_size": policy.max_batch_size,
                                     "max_inflight": policy.max_inflight, "max_queue": policy.max_queue}})

    async def model_ready(request: Request) -> Response:
        m = lookup(request)
        return _json({"name": m.name, "version": str(m.version), "ready": True})

    async def model_config(request: Request) -> Response:
        return _json(service.model_config(lookup(request)))

    async def statistics(request: Request) -> Response:
        p = request.path_params
        return _json({"model_stats": service.statistics(p.get("model"), p.get("version"))})

    async def repository_index(request: Request) -> Response:
        doc = await _json_body(request, "a repository index request")
        ready_only = doc.get("ready", False)
        if type(ready_only) is not bool:
            raise InvalidInput("'ready' must be true or false")
        return _json(repository.index(ready_only))

    async def repository_load(request: Request) -> Response:
        doc = await _json_body(request, "a repository load request")
        params = doc.get("parameters") or {}
        if type(params) is not dict:
            raise InvalidInput("'parameters' must be an object")
        if params:
            raise InvalidInput(f"load parameters {sorted(params)} are not supported: edgerun loads the package as it "
                               "is in the repository")
        await repository.load(request.path_params["model"])
        return Response(status_code=200)

    async def repository_unload(request: Request) -> Response:
        await _json_body(request, "a repository unload request")
        await repository.unload(request.path_params["model"])
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def guarded(endpoint: Any) -> Any:
        """The endpoint, answering an unexpected exception with a logged 500 itself: raised on, it would make
        Starlette close the connection after the answer."""
        async def call(request: Request) -> Response:
            try:
                return await endpoint(request)
            except (EdgerunError, HTTPException):
                raise
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.url.path)
                return _error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}"))
        return call

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, EdgerunError):
            return _error(exc)
        if isinstance(exc, HTTPException):
            if exc.status_code == 404:
                return _error(HttpError(404, f"no such endpoint: {request.method} {request.url.path}"))
            if exc.status_code == 405:
                allow = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
                return _error(HttpError(405, f"method {request.method} not allowed on {request.url.path}; use {allow}",
                                        headers={"allow": allow}))
            return _error(HttpError(exc.status_code, str(exc.detail), headers=exc.headers))
        return _error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [
        Route("/v2/health/live", guarded(live)),
        Route("/v2/health/ready", guarded(ready)),
        Route("/v2", guarded(server_metadata)),
        Route("/v2/models/stats", guarded(statistics)),
        Route("/v2/models/{model}", guarded(model_metadata)),
        Route("/v2/models/{model}/versions/{version}", guarded(model_metadata)),
        Route("/v2/models/{model}/ready", guarded(model_ready)),
        Route("/v2/models/{model}/versions/{version}/ready", guarded(model_ready)),
        Route("/v2/models/{model}/config", guarded(model_config)),
        Route("/v2/models/{model}/versions/{version}/config", guarded(model_config)),
        Route("/v2/models/{model}/stats", guarded(statistics)),
        Route("/v2/models/{model}/versions/{version}/stats", guarded(statistics)),
        Route("/v2/repository/index", guarded(repository_index), methods=["POST"]),
        Route("/v2/repository/models/{model}/load", guarded(repository_load), methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", guarded(repository_unload), methods=["POST"]),
        Route("/metrics", guarded(metrics)),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, EdgerunError: http_error,
                                                       Exception: http_error})
    app.router.redirect_slashes = False  # the app serves a path with a trailing slash as the path without it
    return app
