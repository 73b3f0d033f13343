"""HTTP errors and the mapping from edgerun's errors to status codes."""

from __future__ import annotations

from edgerun.errors import EdgerunError, InvalidInput, ModelNotFound, ModelNotReady


class HttpError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, reason: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or REASONS.get(status, "error")
        self.headers = headers or {}


REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           413: "too_large", 500: "internal", 503: "unavailable"}


def bad_request(message: str) -> HttpError:
    return HttpError(400, message)


def from_edgerun(exc: EdgerunError) -> HttpError:
    """InvalidInput -> 400, ModelNotFound -> 404, ModelNotReady -> 503, anything else -> 500."""
    if isinstance(exc, InvalidInput):
        return HttpError(400, str(exc))
    if isinstance(exc, ModelNotFound):
        return HttpError(404, str(exc))
    if isinstance(exc, ModelNotReady):
        return HttpError(503, str(exc), "not_ready")
    return HttpError(500, str(exc))
