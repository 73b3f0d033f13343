"""Every endpoint but ``infer``: health, server and model metadata, readiness, repository index, metrics."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import edgerun
from edgerun.errors import EdgerunError
from edgerun.server.asgi import read_body
from edgerun.server.codec import json_problem
from edgerun.server.errors import HttpError, from_edgerun
from edgerun.server.state import ServerState

EXTENSIONS = ["binary_tensor_data", "model_repository", "metrics"]
INDEX_BODY_MAX = 64 << 10  # {"ready": true} is all a repository index request says


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status, headers, media_type="application/json")


def build_routes(state: ServerState) -> Starlette:
    runtime = state.runtime

    def lookup(request: Request):
        p = request.path_params
        try:
            return state.model(p["model"], p.get("version"))
        except EdgerunError as exc:
            raise HttpError(404, str(exc)) from None

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
        versions = [str(x.version) for x in runtime.models() if x.name == m.name]
        policy = state.policy(m)
        return _json({"name": m.name, "versions": versions, "platform": f"{m.backend}_{m.variant.format}",
                      "inputs": [s.to_dict() for s in m.inputs], "outputs": [s.to_dict() for s in m.outputs],
                      "parameters": {"variant": m.variant.id, "precision": m.variant.precision,
                                     "device": str(m.session.device),
                                     "batching": policy.batching, "max_batch_size": policy.max_batch_size,
                                     "max_inflight": policy.max_inflight, "max_queue": policy.max_queue}})

    async def model_ready(request: Request) -> Response:
        m = lookup(request)
        return _json({"name": m.name, "version": str(m.version), "ready": True})

    async def repository_index(request: Request) -> Response:
        body = await read_body(request.scope, request.receive, INDEX_BODY_MAX, "for a repository index request")
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return _error(400, json_problem(exc))
            if type(doc) is not dict:
                return _error(400, "request body must be a JSON object")
        # {"ready": true} filters nothing: every listed model is loaded, hence READY
        return _json([{"name": m.name, "version": str(m.version), "state": "READY", "reason": "",
                       "variant": m.variant.id, "backend": m.backend} for m in runtime.models()])

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HttpError):
            return _error(exc.status, exc.message, exc.headers)
        if isinstance(exc, HTTPException):
            if exc.status_code == 404:
                return _error(404, f"no such endpoint: {request.method} {request.url.path}")
            if exc.status_code == 405:
                allow = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
                return _error(405, f"method {request.method} not allowed on {request.url.path}; use {allow}",
                              {"allow": allow})
            return _error(exc.status_code, str(exc.detail), exc.headers)
        if isinstance(exc, EdgerunError):
            err = from_edgerun(exc)
            return _error(err.status, err.message)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, HttpError: http_error,
                                                       EdgerunError: http_error, Exception: http_error})
    app.router.redirect_slashes = False  # the app serves a path with a trailing slash as the path without it
    return app
