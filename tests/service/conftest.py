"""The test acts as systemd: a real NOTIFY_SOCKET (Unix datagram) and ``edgerun serve`` as a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from edgerun.package import ModelPackage, Variant, file_entry, save_package
from edgerun.tensors import TensorSpec
from edgerun.testing.processes import terminate

CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """What systemd listens on: collects every sd_notify datagram with its arrival time."""

    def __init__(self, abstract: bool = True, directory: Path | None = None,
                 on_message: Callable[[dict[str, str]], Any] | None = None):
        self.on_message = on_message  # called in the reader thread, before the message is recorded
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.name = f"@edgerun-test-{uuid.uuid4().hex[:12]}"
            self.sock.bind(b"\0" + self.name[1:].encode())
        else:
            self.name = str(directory / "notify")
            self.sock.bind(self.name)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if self.on_message is not None:
                self.on_message(fields)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60, after: int = 0,
                 proc: subprocess.Popen | None = None) -> int:
        """Index of the first message from ``after`` on carrying ``key`` (=``value``); fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, (_, m) in enumerate(self.messages[after:], after):
                    if key in m and (value is None or m[key] == value):
                        return i
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.keys()}")
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"edgerun serve exited with {proc.returncode} before {key}; got {self.keys()}")
                self._cond.wait(0.1)

    def keys(self) -> list[str]:
        """Each message as 'KEY[=VALUE]' of its first line (STATUS text included), for order checks."""
        out = []
        for _, m in list(self.messages):
            for k, v in m.items():
                out.append(f"{k}={v}" if k in ("STATUS",) else k)
        return out

    def times(self, key: str) -> list[float]:
        return [t for t, m in list(self.messages) if key in m]

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class Service:
    """``edgerun serve`` started the way systemd starts it: NOTIFY_SOCKET, WATCHDOG_USEC, INVOCATION_ID."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str | None] | None = None,
                 watchdog_usec: int | None = None, abstract: bool = True, port_flag: bool = True,
                 on_notify: Callable[[dict[str, str]], Any] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.notify = NotifySocket(abstract, tmp, on_notify)
        self.log = tmp / f"serve-{self.port}.log"
        full = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "EDGERUN_TEST"))}
        full.update({"NOTIFY_SOCKET": self.notify.name, "INVOCATION_ID": uuid.uuid4().hex,
                     "EDGERUN_LOG_LEVEL": "INFO", "STATE_DIRECTORY": str(tmp / "state")})
        full.pop("EDGERUN_CONFIG", None)
        if watchdog_usec:
            full["WATCHDOG_USEC"] = str(watchdog_usec)
        for k, v in (env or {}).items():  # None removes a variable
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        self._out = open(self.log, "wb")
        self.started = time.monotonic()
        port = ["--port", str(self.port)] if port_flag else []  # without it, the test's config file sets it
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", *port,
                                      "--state-dir", str(tmp / "state"), *args],
                                     env=full, stdout=self._out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> int:
        return self.notify.wait_for("READY", "1", timeout, proc=self.proc)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        terminate(self.proc, timeout)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self.notify.close()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)


@pytest.fixture
def service(tmp_path):
    """Start ``edgerun serve`` under a fake systemd: ``service(args, env=..., watchdog_usec=...)``."""
    started: list[Service] = []

    def start(args: list[str], **kw) -> Service:
        s = Service(tmp_path, args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def make_heavy_package(root: Path) -> ModelPackage:
    """A wide MLP with a dynamic batch: a batch of 128 rows takes tens of milliseconds, so requests overlap."""
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    mlp_onnx(random_mlp_weights([64, 1536, 1536, 10]), root / "model.onnx")
    pkg = ModelPackage(name="heavy", version=1, inputs=[TensorSpec("input", "FP32", (-1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
                       variants=[Variant("onnx-fp32", "onnx", "fp32", (file_entry(root, "model.onnx"),))])
    save_package(pkg, root)
    return ModelPackage.load(root)


@pytest.fixture(scope="session")
def heavy_package(tmp_path_factory):
    return make_heavy_package(tmp_path_factory.mktemp("heavy") / "heavy")


@pytest.fixture(scope="session")
def second_package(tmp_path_factory):
    """A second model (another name) for reload tests."""
    from edgerun.testing.models import make_digits_package

    return make_digits_package(tmp_path_factory.mktemp("second") / "digits-b", name="digits-b", int8=False, seed=1)
