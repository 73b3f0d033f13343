"""Errors meant for the user; the CLI turns them into exit codes, the front ends into HTTP statuses and gRPC codes.

Each class carries what every surface needs: ``exit_code`` (sysexits) for the CLI, ``http_status`` for HTTP,
``grpc_code`` (a ``grpc.StatusCode`` name, so core needs no grpcio) for gRPC, and ``reason`` for the
``edgerun_request_failures`` metric.
"""

from __future__ import annotations


class EdgerunError(Exception):
    """Base of every error edgerun reports to a user."""

    exit_code = 1
    http_status = 500
    grpc_code = "INTERNAL"
    reason = "internal"
    headers: dict[str, str] = {}  # extra HTTP response headers (Retry-After, WWW-Authenticate)


class ConfigError(EdgerunError):
    """A configuration or profile file is invalid: names the file, the key and what was expected."""

    exit_code = 78  # EX_CONFIG

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"key '{key}'" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.key = key


class PackageError(EdgerunError):
    """A model package is malformed, incomplete or does not match its model."""

    exit_code = 65  # EX_DATAERR
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "bad_package"


class IntegrityError(PackageError):
    """A file's size or sha256 does not match what its package or manifest records."""


class DecryptError(IntegrityError):
    """An encrypted model file does not open here: not age, not for this device's key, altered or truncated."""


class DeviceKeyError(EdgerunError):
    """The device's own key cannot be used: missing, unreadable, malformed or readable by others."""

    exit_code = 77  # EX_NOPERM
    http_status = 500
    grpc_code = "FAILED_PRECONDITION"
    reason = "device_key"


class BackendUnavailable(EdgerunError):
    """No usable backend for a format, or the requested backend is not installed."""

    exit_code = 69  # EX_UNAVAILABLE
    http_status = 400
    grpc_code = "FAILED_PRECONDITION"
    reason = "unavailable_backend"


class ModelLoadError(EdgerunError):
    """A backend failed to load a model file."""

    exit_code = 65
    http_status = 400
    grpc_code = "FAILED_PRECONDITION"
    reason = "load_failed"


class VariantRejected(ModelLoadError):
    """A variant loaded here but failed the package's validation sample: this CPU's kernels disagree with fp32."""


class NoVariantFits(EdgerunError):
    """No variant of a package can run here within the memory budget."""

    exit_code = 69
    http_status = 400
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "no_fit"


class TuningFailed(EdgerunError):
    """Tuning measured no candidate of a package here: every one crashed, hung, overshot memory or was wrong."""

    exit_code = 69


class ModelNotFound(EdgerunError):
    """The named model or version is not loaded."""

    exit_code = 66  # EX_NOINPUT
    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "not_found"


class ModelNotReady(EdgerunError):
    """The model exists but cannot serve right now."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "not_ready"


class Retired(ModelNotReady):
    """The model version was swapped out or unloaded between look-up and run; look the model up again."""


class Busy(ModelNotReady):
    """A model's queue is full; the client should retry later."""

    reason = "queue_full"
    headers = {"retry-after": "1"}


class ClientGone(EdgerunError):
    """The client went away (disconnected, or cancelled its call) before its answer was ready."""

    http_status = 499
    grpc_code = "CANCELLED"
    reason = "client_gone"


class InvalidInput(EdgerunError):
    """An inference request's inputs do not match the model (name, dtype, shape), or the request is malformed."""

    exit_code = 65
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "bad_request"


class Unauthenticated(EdgerunError):
    """No credentials, or wrong ones."""

    exit_code = 77  # EX_NOPERM
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    reason = "unauthorized"
    headers = {"www-authenticate": "Bearer"}


class Forbidden(EdgerunError):
    """Valid credentials that do not allow this action, or an action this server is not configured to allow."""

    exit_code = 77
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    reason = "forbidden"


class ManifestError(EdgerunError):
    """A release manifest is malformed, unsigned, tampered with or not acceptable."""
