"""Helpers of the MQTT update tests: packages, a hub that can publish broken releases, a watcher, a device process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgerun.contract import Topics
from edgerun.hub.publish import build_manifest, encode, publish_blobs
from edgerun.manifest import load_private_key, sign
from edgerun.mqtt import Broker, Connection
from edgerun.package import ModelPackage, Sample, Variant, file_entry, save_package
from edgerun.tensors import TensorSpec
from edgerun.testing.mosquitto import Mosquitto, free_port
from edgerun.testing.processes import terminate

MODEL = "digits"


# --- packages --------------------------------------------------------------------------------

def make_package(root: Path, version: int, *, seed: int | None = None, hidden: int = 32,
                 name: str = MODEL) -> ModelPackage:
    """A real ONNX MLP (random weights, unique per seed) with a warm-up sample and its expected output."""
    import onnxruntime as ort

    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    seed = version if seed is None else seed
    root.mkdir(parents=True, exist_ok=True)
    path = mlp_onnx(random_mlp_weights([64, hidden, 10], seed=seed), root / "model.onnx")
    x = np.random.default_rng(seed).random((2, 64), dtype=np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    pkg = ModelPackage(name=name, version=version, inputs=[TensorSpec("input", "FP32", (-1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
                       variants=[Variant("onnx-fp32", "onnx", "fp32", (file_entry(root, "model.onnx"),),
                                         accuracy=0.9)],
                       samples=[Sample({"input": x}, {"probabilities": y})])
    save_package(pkg, root)
    return ModelPackage.load(root)


def with_version(pkg: ModelPackage, version: int, root: Path) -> ModelPackage:
    """The same files under another version number."""
    import shutil

    shutil.copytree(pkg.root, root, dirs_exist_ok=True)
    save_package(replace(pkg, version=version, raw={}), root)
    return ModelPackage.load(root)


# --- hub ---------------------------------------------------------------------------------------

class Hub:
    """Publishes releases (good or deliberately broken) to one fleet on the test broker."""

    def __init__(self, broker: Mosquitto, fleet: str, keydir: Path, db: str | None = None):
        self.broker = broker
        self.db = db or f"sqlite:///{keydir.parent / f'hub-{fleet}.db'}"
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.keydir = keydir
        self.key = load_private_key(keydir / "hub-test.key")
        self.key_id = "hub-test"

    def client(self) -> Connection:
        return Connection(Broker(port=self.broker.port), persistent=False)

    def release(self, pkg: ModelPackage, *, device: str | None = None, chunks: bool = True,
                edit: Callable[[dict], Any] | None = None, after_sign: Callable[[dict], Any] | None = None,
                key=None, key_id: str | None = None, url_base: str | None = None, mqtt: bool = True,
                chunk_size: int = 64 << 10) -> dict:
        unsigned = build_manifest(pkg, chunk_size=chunk_size, url_base=url_base, mqtt=mqtt)
        with self.client() as c:
            if chunks and mqtt:
                publish_blobs(c, self.topics, pkg, unsigned)
            if edit:
                edit(unsigned)
            signed = sign(unsigned, key or self.key, key_id or self.key_id)
            if after_sign:
                after_sign(signed)
            c.wait([c.publish(self.topics.release(pkg.name, device), encode(signed), retain=True)])
        return signed

    def raw(self, topic_suffix: str, payload: bytes) -> None:
        with self.client() as c:
            c.wait([c.publish(f"{self.topics.prefix}/{topic_suffix}", payload, retain=True)])

    def chunk(self, sha: str, index: int, payload: bytes) -> None:
        with self.client() as c:
            c.wait([c.publish(self.topics.blob(sha, index), payload, retain=True)])

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run the real `edgerun hub ...` command line."""
        return subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
                               "hub", *args, "--host", "127.0.0.1", "--port", str(self.broker.port)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "COLUMNS": "200", "EDGERUN_HUB_DB": self.db})


# --- watching the device over MQTT -------------------------------------------------------------

class Watcher:
    """Collects a fleet's device events and retained state/status, as the hub sees them."""

    def __init__(self, broker: Mosquitto, fleet: str, username: str | None = None, password: str | None = None):
        self.events: list[dict] = []
        self.state: dict[str, dict] = {}
        self.status: dict[str, dict] = {}
        self.history: list[tuple[float, dict]] = []  # (time received, status) of every status message
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"edgerun/v1/{fleet}/devices/#", qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        parts = msg.topic.split("/")
        try:
            data = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        with self._cond:
            if parts[-1] == "events":
                self.events.append(data)
            elif parts[-1] == "state":
                self.state[parts[-2]] = data
            elif parts[-1] == "status":
                self.status[parts[-2]] = data
                self.history.append((time.monotonic(), data))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = pred()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; events: "
                                         f"{[(e['version'], e['state'], e['detail'][:60]) for e in self.events[-12:]]}")
                self._cond.wait(min(left, 0.2))

    def event(self, version: int, states: tuple[str, ...], since: int = 0, timeout: float = 30) -> dict:
        return self.wait_for(lambda: next((e for e in self.events[since:] if e["version"] == version
                                           and e["state"] in states), None), timeout, f"v{version} {states}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- the device process ------------------------------------------------------------------------

class Device:
    """`edgerun serve --config FILE` as a real process: kill -9 is real, HTTP is real."""

    def __init__(self, workdir: Path, broker: Mosquitto, fleet: str, keydir: Path, name: str = "dev1",
                 memory_budget: str | None = None):
        self.workdir = workdir
        self.name = name
        self.state_dir = workdir / "state"
        self.port = free_port()
        self.config = workdir / "edgerun.toml"
        self.log = workdir / "device.log"
        workdir.mkdir(parents=True, exist_ok=True)
        budget = f'memory_budget = "{memory_budget}"\n' if memory_budget else ""
        self.config.write_text(
            f'state_dir = "{self.state_dir}"\nlog_level = "INFO"\nthreads = 1\n{budget}'
            f'[server]\nport = {self.port}\n'
            f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nfleet = "{fleet}"\n'
            f'device_id = "{name}"\nkeepalive = 2\ntrusted_keys = "{keydir}"\n')
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> "Device":
        full_env = {**os.environ, "EDGERUN_LOG_LEVEL": "INFO", **(env or {})}
        for k in ("EDGERUN_TESTHOOKS_PAUSE_AT", "EDGERUN_MQTT_PASSWORD"):
            if k not in (env or {}):
                full_env.pop(k, None)
        log = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgerun.cli import main; "
                                      "sys.exit(main())", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=full_env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"device exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.http.get("/v2/health/ready").status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"device not listening after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def versions(self, model: str = MODEL) -> list[int]:
        r = self.http.get(f"/v2/models/{model}")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        return sorted(int(v) for v in r.json()["versions"])

    def wait_version(self, version: int, model: str = MODEL, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        got: list[int] = []
        while time.monotonic() < deadline:
            try:
                got = self.versions(model)
                if got == [version]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"device serves {got}, expected [{version}]; log:\n{self.log.read_text()[-3000:]}")

    def infer(self, model: str = MODEL) -> httpx.Response:
        x = np.linspace(0, 1, 64, dtype=np.float32).tolist()
        return self.http.post(f"/v2/models/{model}/infer",
                              json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]})

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc, 15)




# --- a broker that speaks only MQTT 3.1.1 -------------------------------------------------------

def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise OSError("connection closed")
        buf += got
    return buf


def _read_packet(s: socket.socket) -> tuple[bytes, bytes]:
    """One MQTT control packet: (all its bytes, its body after the fixed header)."""
    head = _recv_exact(s, 1)
    length, shift = 0, 0
    while True:
        b = _recv_exact(s, 1)
        head += b
        length += (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = _recv_exact(s, length)
    return head + body, body


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Mqtt311Gate:
    """In front of the real Mosquitto: answers an MQTT 5 CONNECT as a 3.1.1-only broker must (MQTT 3.1.1
    §3.1.2.2: CONNACK return code 1, then disconnect) and passes every other connection through.

    With ``refuse_v5=False`` and ``drop_first=N`` it is a load balancer in front of a restarting broker
    instead: the first N connections are accepted and closed before any CONNACK, later ones pass through."""

    def __init__(self, upstream_port: int, *, refuse_v5: bool = True, drop_first: int = 0):
        self.upstream_port = upstream_port
        self.refuse_v5 = refuse_v5
        self.drop_first = drop_first
        self.levels: list[int] = []  # the protocol level of every CONNECT seen (5 = MQTT 5, 4 = 3.1.1)
        self.passed: list[int] = []  # the protocol level of every connection passed to the broker
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            packet, body = _read_packet(conn)
            self.levels.append(body[6])  # after the protocol name b"\x00\x04MQTT"
            if len(self.levels) <= self.drop_first:
                conn.close()
                return
            if body[6] != 4 and self.refuse_v5:
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                return
            self.passed.append(body[6])
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._socks.append(up)
            up.sendall(packet)
        except OSError:
            conn.close()
            return
        threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()
        _pipe(conn, up)

    def close(self) -> None:
        self._server.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
