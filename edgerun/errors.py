"""Errors meant for the user; the CLI turns them into messages and exit codes."""

from __future__ import annotations


class EdgerunError(Exception):
    """Base of every error edgerun reports to a user."""

    exit_code = 1


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


class IntegrityError(PackageError):
    """A file's size or sha256 does not match what its package or manifest records."""


class BackendUnavailable(EdgerunError):
    """No usable backend for a format, or the requested backend is not installed."""

    exit_code = 69  # EX_UNAVAILABLE


class ModelLoadError(EdgerunError):
    """A backend failed to load a model file."""

    exit_code = 65


class VariantRejected(ModelLoadError):
    """A variant loaded here but failed the package's validation sample: this CPU's kernels disagree with fp32."""


class NoVariantFits(EdgerunError):
    """No variant of a package can run here within the memory budget."""

    exit_code = 69


class ModelNotFound(EdgerunError):
    """The named model or version is not loaded."""

    exit_code = 66  # EX_NOINPUT


class ModelNotReady(EdgerunError):
    """The model exists but cannot serve right now."""


class InvalidInput(EdgerunError):
    """An inference request's inputs do not match the model (name, dtype, shape)."""

    exit_code = 65


class ManifestError(EdgerunError):
    """A release manifest is malformed, unsigned, tampered with or not acceptable."""
