"""A fleet for the dashboard's tests and benchmark: Mosquitto, simulated devices in their own process, releases.

The simulated devices run as ``python -m edgerun.testing.fleet``: a thousand sockets in the test process
would push the watcher's and the publisher's descriptors past what paho's ``select()`` loop can watch.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import httpx

from edgerun.contract import FAILED, FINAL, IN_PROGRESS, Event, State, Status, Topics
from edgerun.hub.keys import generate
from edgerun.hub.publish import build_manifest, encode
from edgerun.hub.registry import Registry
from edgerun.hub.watch import FleetWatch
from edgerun.manifest import load_private_key, sign
from edgerun.mqtt import Broker, Connection
from edgerun.testing.models import tiny_package
from edgerun.testing.mosquitto import Mosquitto
from edgerun.testing.processes import terminate

MODEL = "detector"
XSS = "<img src=x onerror=alert(1)>"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition", every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def final_on(status: Status | None, version: int) -> bool:
    u = status.updates.get(MODEL) if status is not None else None
    return u is not None and u.version == version and u.state in FINAL


def truth(statuses: dict[str, Status], states: dict[str, State]) -> dict[str, Any]:
    """What the fleet says of itself: devices, online, updating, failed, per profile and per version."""
    names = set(statuses) | set(states)
    online = sum(1 for n in names if states.get(n) is not None and states[n].online)
    updating = failed = 0
    for s in statuses.values():
        latest = list(s.updates.values()) or ([s.update] if s.update else [])
        if any(u.state in IN_PROGRESS for u in latest):
            updating += 1
        elif any(u.state in FAILED for u in latest):
            failed += 1
    return {"known": len(names), "online": online, "offline": len(names) - online, "updating": updating,
            "failed": failed, "profiles": dict(Counter(s.profile for s in statuses.values())),
            "versions": dict(Counter(f"{m.name} v{m.version}" for s in statuses.values() for m in s.models))}


class Fleet:
    """A broker, ``devices`` simulated devices, a registry and a watcher on it, and a publisher."""

    def __init__(self, workdir: Path, name: str, devices: int = 1000, *, fail_rate: float = 0.05,
                 watch_name: str = "dashboard"):
        self.workdir = Path(workdir)
        self.name = name
        self.devices = devices
        self.fail_rate = fail_rate
        self.watch_name = watch_name
        self.topics = Topics(name)
        self.broker = Mosquitto(self.workdir / "broker")
        self.keydir = self.workdir / "keys"
        self.db_url = f"sqlite:///{self.workdir / 'hub.db'}"
        self.sim: subprocess.Popen | None = None
        self.registry: Registry | None = None
        self.watch: FleetWatch | None = None
        self.conn: Connection | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, before_watch: Callable[[Registry], None] | None = None) -> "Fleet":
        """Broker, keys, registry (``before_watch`` may seed it), watcher, publisher, then the devices."""
        self.broker.start()
        generate(self.keydir, "hub-test")
        self.key = load_private_key(self.keydir / "hub-test.key")
        self.registry = Registry(self.db_url)
        if before_watch is not None:
            before_watch(self.registry)
        self.mqtt = Broker(port=self.broker.port)
        self.watch = FleetWatch(self.mqtt, self.topics, self.registry, name=self.watch_name).start(quiet=0.2)
        self.conn = Connection(self.mqtt, persistent=False).__enter__()
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "edgerun.testing.fleet", "--port", str(self.broker.port), "--fleet", self.name,
             "--trusted-keys", str(self.keydir), "--devices", str(self.devices), "--fail-rate", str(self.fail_rate),
             "--step-delay", "0.02", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.sim.stdout], [], [], 120)
        line = self.sim.stdout.readline() if ready else ""
        if not line.startswith("{"):
            self.sim.kill()
            raise RuntimeError(f"the simulated fleet did not start: {line!r} {self.sim.stderr.read()[-2000:]}")
        self.sim_ready = json.loads(line)
        w = self.watch
        wait_for(lambda: len(w.statuses) >= self.devices and sum(s.online for s in w.states.values()) >= self.devices,
                 60, f"{self.devices} devices online in the watcher")
        return self

    def stop(self) -> None:
        terminate(self.sim)
        if self.conn is not None:
            self.conn.__exit__(None, None, None)
        if self.watch is not None:
            self.watch.stop()
        if self.registry is not None:
            self.registry.close()
        self.broker.stop()

    def __enter__(self) -> "Fleet":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- acting on the fleet ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.conn is not None
        self.conn.wait([self.conn.publish(topic, payload, retain=retain)])

    def release(self, version: int, timeout: float = 60.0) -> float:
        """Publish ``MODEL`` v``version`` fleet-wide; wait until every device's status is final on it."""
        pkg = tiny_package(self.workdir / f"pkg-{version}", version, MODEL)
        t0 = time.monotonic()
        self.publish(self.topics.release(MODEL), encode(sign(build_manifest(pkg), self.key, "hub-test")), retain=True)
        w = self.watch
        wait_for(lambda: sum(final_on(s, version) for s in list(w.statuses.values())) >= self.devices, timeout,
                 f"every device final on v{version}")
        w.flush()
        return time.monotonic() - t0

    def set_offline(self, device: str) -> None:
        """What the broker publishes when the device's connection dies: its last will, retained."""
        session = self.watch.states[device].session if device in self.watch.states else 1
        self.publish(self.topics.state(device), State(False, session).to_payload(), retain=True)

    def set_online(self, device: str) -> None:
        session = self.watch.states[device].session if device in self.watch.states else 1
        self.publish(self.topics.state(device), State(True, session).to_payload(), retain=True)

    def event(self, device: str, event: Event) -> None:
        self.publish(self.topics.events(device), event.to_payload())

    def truth(self) -> dict[str, Any]:
        """Counts from the retained state and status on the broker, read by a fresh subscriber."""
        assert self.conn is not None
        got = self.conn.collect([f"{self.topics.prefix}/devices/+/state", f"{self.topics.prefix}/devices/+/status"],
                                quiet=0.5, timeout=20)
        states, statuses = {}, {}
        for topic, payload in got.items():
            ref = self.topics.parse(topic)
            if ref is None or not payload:
                continue
            if ref.kind == "state" and (st := State.from_payload(payload)):
                states[ref.device] = st
            elif ref.kind == "status" and (s := Status.from_payload(payload, ref.device)):
                statuses[ref.device] = s
        return truth(statuses, states)


class StreamRecorder:
    """Reads ``/api/stream`` in a thread; keeps (monotonic time, event, rows in it) of every message."""

    def __init__(self, base_url: str, token: str | None = None):
        self.url = base_url.rstrip("/") + "/api/stream"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.messages: list[tuple[float, str, int]] = []
        self.opened = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-recorder", daemon=True)

    def _run(self) -> None:
        event = ""
        try:
            with httpx.Client(timeout=httpx.Timeout(5.0, read=60.0)) as client, \
                    client.stream("GET", self.url, headers=self.headers) as res:
                self.opened.set()
                for line in res.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        self.messages.append((time.monotonic(), event, len(data) if isinstance(data, list) else 1))
        except Exception:  # the server ended the stream
            pass

    def start(self) -> "StreamRecorder":
        self._thread.start()
        assert self.opened.wait(10), "the stream did not open"
        return self

    def stop(self) -> None:
        """Stop recording; the reading thread ends with the stream (at the next message, or when the server stops)."""
        self._stop.set()

    def of(self, event: str, since: float = 0.0) -> list[tuple[float, str, int]]:
        return [m for m in self.messages if m[1] == event and m[0] >= since]
