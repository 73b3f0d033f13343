"""The dashboard's HTTP app: the page, a fleet snapshot, a live stream of changes, and rollout controls.

With a token every ``/api`` route needs ``Authorization: Bearer TOKEN`` (the page asks for it once and
keeps it in the tab's sessionStorage). Without one the app answers only to loopback ``Host`` names, so a
web page elsewhere cannot reach it through DNS rebinding; POSTs need the ``X-Edgerun-Dashboard`` header
and a same-origin ``Origin``, so a cross-site form cannot pause or abort a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import orjson
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message as AsgiMessage, Receive, Scope, Send

from edgerun.errors import EdgerunError
from edgerun.hub.dashboard.feed import FleetFeed
from edgerun.hub.dashboard.rows import rollout_row
from edgerun.hub.registry import Registry, RegistryError, RolloutRecord
from edgerun.hub.watch import FleetWatch

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
PRELOAD = '<link rel="preload" href="/api/fleet" as="fetch" crossorigin="anonymous">'
ACTIONS = ("pause", "resume", "abort")
ACTION_HEADER = "x-edgerun-dashboard"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PING_SECONDS = 15
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class JSON(Response):
    """A JSON response written by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


@dataclass(frozen=True)
class Asset:
    """One static file, read once: its bytes, gzipped bytes, type and ETag."""

    body: bytes
    gzipped: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, media_type: str) -> "Asset":
        return cls(body, gzip.compress(body, 6), media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')

    def response(self, request: Request) -> Response:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(self.gzipped, media_type=self.media_type, headers={**headers, "Content-Encoding": "gzip"})
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_assets(preload: bool) -> dict[str, Asset]:
    """The page and its script and stylesheet; with ``preload`` the page starts fetching the snapshot at once."""
    out = {}
    for path in STATIC.iterdir():
        if path.suffix in STATIC_TYPES:
            body = path.read_bytes()
            if path.name == "index.html":
                body = body.replace(b"<!--preload-->", PRELOAD.encode() if preload else b"")
            out[path.name] = Asset.of(body, STATIC_TYPES[path.suffix])
    return out


def _error(status: int, message: str, **headers: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _host_name(host: str) -> str:
    """``Host`` without its port: ``[::1]:8080`` -> ``::1``, ``localhost:8080`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """Bearer token on /api, loopback Host names without a token, same-origin POSTs, security headers."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_hosts: Iterable[str] | None):
        self.app = app
        self.token = token.encode() if token else None
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._refuse(scope, headers)
        if problem is not None:
            await problem(scope, receive, send)
            return

        async def send_with_headers(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> Response | None:
        path = scope["path"]
        if self.allowed is not None and _host_name(headers.get("host", "")) not in self.allowed:
            return _error(421, "this dashboard answers to its own address only (Host header not allowed)")
        if not path.startswith("/api/"):
            return None
        if self.token is not None and not self._authorized(headers.get("authorization", "")):
            return _error(401, "a bearer token is needed: Authorization: Bearer TOKEN",
                          **{"WWW-Authenticate": 'Bearer realm="edgerun-hub"'})
        if scope["method"] == "POST":
            if headers.get(ACTION_HEADER) != "1":
                return _error(403, f"POST needs the {ACTION_HEADER}: 1 header (sent by the dashboard page)")
            origin = headers.get("origin")
            if origin and origin not in (f"http://{headers.get('host', '')}", f"https://{headers.get('host', '')}"):
                return _error(403, "cross-origin request refused")
        return None

    def _authorized(self, value: str) -> bool:
        scheme, _, given = value.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token or b"")


def make_app(registry: Registry, watch: FleetWatch, fleet: str, token: str | None = None, *,
             allowed_hosts: Iterable[str] | None = None) -> Starlette:
    """The dashboard of ``fleet``; without ``token`` it answers to ``allowed_hosts`` (loopback names) only."""
    feed = FleetFeed(registry, watch, fleet)
    assets = load_assets(preload=token is None)  # with a token the snapshot needs the header: no preload
    if allowed_hosts is None and token is None:
        allowed_hosts = LOOPBACK_HOSTS

    async def page(request: Request) -> Response:
        return assets["index.html"].response(request)

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        return asset.response(request) if asset is not None else _error(404, "no such file")

    async def healthz(request: Request) -> Response:
        """For a load balancer: answers without a token, and says nothing about the fleet."""
        return JSON({"ok": True})

    async def health(request: Request) -> Response:
        return JSON({"ok": True, "fleet": fleet, "devices": len(feed.rows), "streams": feed.streams,
                     "broker_connected": watch.conn.connected.is_set(),
                     "registry_error": feed.hub.get("registry_error")})

    async def snapshot(request: Request) -> Response:
        gz = "gzip" in request.headers.get("accept-encoding", "")
        headers = {"Cache-Control": "no-store", "Vary": "Accept-Encoding"}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return Response(feed.snapshot(gz), media_type="application/json", headers=headers)

    async def rollout_detail(request: Request) -> Response:
        rid = request.path_params["rid"]
        try:
            detail = await asyncio.to_thread(_rollout_detail, registry, fleet, rid)
        except RegistryError as exc:
            return _error(503, str(exc))
        if detail is None:
            return _error(404, f"no rollout {rid} in fleet {fleet!r}")
        return JSON(detail)

    async def rollout_action(request: Request) -> Response:
        rid, action = request.path_params["rid"], request.path_params["action"]
        if action not in ACTIONS:
            return _error(404, f"unknown action {action!r}: expected pause, resume or abort")
        try:
            row = await asyncio.to_thread(_request, registry, fleet, rid, action)
        except RegistryError as exc:
            return _error(503, str(exc))
        except EdgerunError as exc:
            return _error(409, str(exc))
        if row is None:
            return _error(404, f"no rollout {rid} in fleet {fleet!r}")
        log.info("dashboard: %s of rollout %d asked (now %s)", action, rid, row["state"])
        feed.poll_soon()
        return JSON(row)

    async def stream(request: Request) -> Response:
        sub = feed.subscribe()

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                yield feed.hello().sse()
                while True:
                    msg = await sub.queue.get()
                    if msg is None:
                        return
                    yield msg.sse()
            finally:
                feed.unsubscribe(sub)

        return EventSourceResponse(events(), ping=PING_SECONDS, headers={"Cache-Control": "no-store"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feed.start()
        try:
            yield
        finally:
            await feed.stop()

    routes = [
        Route("/", page),
        Route("/healthz", healthz),
        Route("/api/health", health),
        Route("/api/fleet", snapshot),
        Route("/api/stream", stream),
        Route("/api/rollouts/{rid:int}", rollout_detail),
        Route("/api/rollouts/{rid:int}/{action}", rollout_action, methods=["POST"]),
        Route("/static/{name}", static),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_hosts)
    app.state.feed = feed
    return app


def _find(registry: Registry, fleet: str, rid: int) -> RolloutRecord | None:
    """The rollout ``rid`` of ``fleet``, None when there is none."""
    r = registry.find_rollout(rid)
    return r if r is not None and r.fleet == fleet else None


def _rollout_detail(registry: Registry, fleet: str, rid: int) -> dict[str, Any] | None:
    r = _find(registry, fleet, rid)
    if r is None:
        return None
    devices = registry.rollout_devices(rid)
    return {"rollout": rollout_row(r, devices), "devices": [d.to_dict() for d in devices],
            "log": [{"ts": ts, "message": m} for ts, m in registry.rollout_log(rid)]}


def _request(registry: Registry, fleet: str, rid: int, action: str) -> dict[str, Any] | None:
    """Ask the rollout's runner to pause, resume or abort; the rollout as it is then."""
    from edgerun.hub.rollout import request

    if _find(registry, fleet, rid) is None:
        return None
    r = request(registry, rid, action)
    return rollout_row(r, registry.rollout_devices(rid))
