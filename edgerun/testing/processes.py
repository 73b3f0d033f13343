"""Stopping a process the tests started: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


def terminate(proc: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    """Ask ``proc`` to stop (SIGTERM), kill it if it has not within ``timeout`` s; its exit code (None: none)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
