"""A real Mosquitto broker for tests and benchmarks: free port, config in a temp dir, persistence on.

>>> with Mosquitto(tmp_path) as broker:            # doctest: +SKIP
...     broker.port; broker.stop(); broker.start()  # retained messages survive the restart
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One broker process; ``stop()`` (SIGTERM, saves retained messages) and ``start()`` keep port and data."""

    def __init__(self, workdir: Path, port: int | None = None, *, extra_config: str = "",
                 password_file: Path | None = None):
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto not found (apt install mosquitto)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        (self.workdir / "data").mkdir(exist_ok=True)
        self.config_path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + ("allow_anonymous true\n" if password_file is None
               else f"allow_anonymous false\npassword_file {password_file}\n")
            + ("user root\n" if os.geteuid() == 0 else "")  # root would drop to `mosquitto`: no access to tmp
            + "persistence true\n"
            f"persistence_location {self.workdir / 'data'}/\n"
            "autosave_interval 1\n"
            "message_size_limit 0\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 100000\n"
            "max_queued_bytes 0\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"log_dest file {self.log_path}\n"
            + extra_config)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err} "
                                   f"(log: {self.log_path})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: mosquitto saves its persistence database (retained messages, sessions) and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
