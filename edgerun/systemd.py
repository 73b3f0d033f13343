"""The systemd notify protocol (sd_notify(3)) without libsystemd: readiness, status, watchdog, timeouts.

The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named by ``NOTIFY_SOCKET``; a
hand-written client is the usual practice and avoids a dependency. Every call is a no-op when the
process was not started by systemd (or by something acting like it).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``; ``enabled`` is False (and sends nothing) without one."""

    def __init__(self, address: str | None = None):
        self.address = _socket_address(address)
        self._sock: socket.socket | None = None
        if self.address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:  # pragma: no cover - no AF_UNIX
                log.warning("cannot create the systemd notify socket: %s", exc)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Notifier":
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one message; False when not under systemd or the send failed."""
        if self._sock is None or not lines:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)  # type: ignore[arg-type]
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", lines, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match the reload to this message.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on start-up, reload or stop."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(name: str | None) -> str | bytes | None:
    if not name:
        return None
    if name.startswith("@"):  # abstract namespace: a leading NUL byte instead of '@'
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    log.warning("ignoring NOTIFY_SOCKET=%r: expected an absolute path or an @abstract name", name)
    return None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when the watchdog is off."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process (e.g. a wrapper that exec'd us under a new pid)
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None
