"""Logging set-up for the CLI and the daemon: journald-friendly under systemd, plain on a terminal."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities, as sd-daemon(3) prefixes: journald reads "<N>" at the start of a line.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message`` with no timestamp (journald adds its own)."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


class _SecretsMaskedHandler(logging.StreamHandler):
    """A stream handler that writes every registered secret (API token, MQTT password) as ``***``.

    Masking the formatted text covers the message, its arguments and any traceback alike.
    """

    secrets: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def hide(*secrets: str | None) -> None:
    """Never log these values (4+ characters; shorter ones would mask ordinary words)."""
    _SecretsMaskedHandler.secrets.update(s for s in secrets if s and len(s) >= 4)


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def configure(level: str | int = "INFO") -> None:
    """Send edgerun's logs to stderr at ``level``."""
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {level!r}; expected DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelNamesMapping()[name]
    handler = _SecretsMaskedHandler(sys.stderr)
    if under_systemd():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
