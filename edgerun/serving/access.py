"""Who may do what: bearer tokens and their scopes, checked the same way by every front end.

``Access.identify`` turns a request's token into a ``Grant`` (or raises ``Unauthenticated``: 401,
UNAUTHENTICATED); ``Access.check`` asks whether that grant allows an action on a model (or raises
``Forbidden``: 403, PERMISSION_DENIED). With no token configured at all, everything is open.
The scopes and what each endpoint needs are in docs/protection.md#scoped-access.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgerun.errors import Forbidden, Unauthenticated
from edgerun.serving.tokens import digest, read_tokens

if TYPE_CHECKING:
    from edgerun.config import ServerConfig

log = logging.getLogger(__name__)

# actions: what a request does; the model it names (None: every model) comes with it
SERVER = "server"  # server metadata: any valid token
METADATA = "metadata"  # a model's metadata, readiness, config, statistics (None: of every model, the index)
INFER = "infer"
METRICS = "metrics"
ADMIN = "admin"  # the model repository's load and unload
REFUSALS = ("missing_token", "unknown_token", "scope")  # edgerun_auth_refusals_total{reason}
API_TOKEN = "api-token"  # the grant of server.token_file / EDGERUN_API_TOKEN


class MissingToken(Unauthenticated):
    """No ``authorization: Bearer <token>`` on a request that needs one."""

    refusal = "missing_token"


class UnknownToken(Unauthenticated):
    """A token the server does not know: mistyped, or revoked."""

    refusal = "unknown_token"


class OutOfScope(Forbidden):
    """A known token without the scope the request needs."""

    refusal = "scope"


@dataclass(frozen=True)
class Grant:
    """What one token may do: its name (for messages) and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, action: str, model: str | None = None) -> bool:
        s = self.scopes
        if ADMIN in s or action == SERVER:
            return True
        if action == METRICS:
            return METRICS in s
        if action == INFER:
            return "infer:*" in s or (model is not None and f"infer:{model}" in s)
        if action == METADATA:
            return ("metadata:*" in s or "infer:*" in s
                    or (model is not None and (f"metadata:{model}" in s or f"infer:{model}" in s)))
        return False


OPEN = Grant("anyone", frozenset({ADMIN}))  # a server without tokens


def bearer(value: str | bytes | None) -> str:
    """The token of an ``authorization: Bearer <token>`` value (header or gRPC metadata)."""
    if value is None:
        raise MissingToken("missing bearer token: send 'authorization: Bearer <token>' (an HTTP header, or gRPC "
                           "metadata)")
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise MissingToken(f"authorization is not 'Bearer <token>' (scheme {scheme[:20]!r}): no bearer token")
    return token


class Access:
    """The server's tokens: the API token (admin) and the tokens file's, by SHA-256; re-read on ``reload()``."""

    def __init__(self, token: str | None = None, tokens_file: Path | None = None):
        self.tokens_file = tokens_file
        self.enabled = bool(token) or tokens_file is not None
        self._token_digest = digest(token) if token else None
        self._grants = self._read()

    @classmethod
    def from_config(cls, server: ServerConfig) -> Access:
        """Read and check the API token and ``server.tokens_file`` (a ConfigError: exit 78)."""
        return cls(server.token(), server.tokens_file)

    def _read(self) -> dict[str, Grant]:
        grants: dict[str, Grant] = {}
        if self.tokens_file is not None:
            for e in read_tokens(self.tokens_file):
                grants[e.sha256] = Grant(e.name, frozenset(e.scopes))
        if self._token_digest is not None:
            grants[self._token_digest] = Grant(API_TOKEN, frozenset({ADMIN}))
        return grants

    def names(self) -> list[str]:
        return sorted(g.name for g in self._grants.values())

    def reload(self) -> None:
        """Re-read the tokens file (SIGHUP): a revoked token is refused from now on; a broken file changes nothing."""
        if self.tokens_file is None:
            return
        before = set(self.names())
        grants = self._read()
        self._grants = grants
        after = {g.name for g in grants.values()}
        log.info("tokens: %d from %s%s%s", len(grants), self.tokens_file,
                 f"; added {', '.join(sorted(after - before))}" if after - before else "",
                 f"; removed {', '.join(sorted(before - after))}" if before - after else "")

    def identify(self, token: str | None) -> Grant:
        """The grant of a token; ``Unauthenticated`` when it is missing or unknown."""
        if not self.enabled:
            return OPEN
        if token is None:
            raise MissingToken("missing bearer token: send 'authorization: Bearer <token>'")
        grant = self._grants.get(digest(token))
        if grant is None:
            raise UnknownToken("wrong bearer token: not one this server knows (mistyped, or revoked)")
        return grant

    def check(self, grant: Grant, action: str, model: str | None = None) -> None:
        """``Forbidden``, naming the token, the action, the model and the token's scopes, unless ``grant`` allows it."""
        if grant.allows(action, model):
            return
        what, needs = _describe(action, model)
        raise OutOfScope(f"token {grant.name!r} may not {what}: that needs the scope {needs}; its scopes are "
                         f"{', '.join(sorted(grant.scopes))}")


def _describe(action: str, model: str | None) -> tuple[str, str]:
    """(what the request does, the scopes that allow it) for a 403's message."""
    m = repr(model[:64] + ("..." if len(model) > 64 else "")) if model is not None else None
    if action == INFER:
        return (f"run model {m}", f"infer:{model[:64]} (or infer:*)") if model else ("run a model", "infer:*")
    if action == METADATA:
        if model is None:
            return "read every model (all statistics, the repository index)", "metadata:* (or infer:*)"
        return f"read model {m}", f"metadata:{model[:64]} or infer:{model[:64]} (or metadata:*)"
    if action == METRICS:
        return "read /metrics", "metrics"
    return "control the model repository (load, unload)", "admin"
