"""HTTP-only errors: what the protocol itself refuses (method, body size, framing) before edgerun's errors apply."""

from __future__ import annotations

from edgerun.errors import EdgerunError, InvalidInput

REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
           408: "timeout", 413: "too_large", 415: "unsupported_media_type", 500: "internal", 503: "unavailable"}


class HttpError(EdgerunError):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, reason: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.http_status = status
        self.message = message
        self.reason = reason or REASONS.get(status, "error")
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return self.http_status


def bad_request(message: str) -> InvalidInput:
    """A malformed request (the same error whichever front end decoded it)."""
    return InvalidInput(message)
