"""Helpers of the rollout tests: a fleet's registry and signing key, releases of digits, the real command line."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from edgerun.contract import Topics
from edgerun.hub.publish import build_manifest, encode
from edgerun.hub.registry import Registry
from edgerun.hub.rollout import Plan, RolloutRunner, start_rollout
from edgerun.hub.watch import FleetWatch
from edgerun.manifest import load_private_key, sign
from edgerun.mqtt import Broker, Connection
from edgerun.package import ModelPackage
from edgerun.testing.fleet import SimFleet
from edgerun.testing.mosquitto import Mosquitto

CLI = "import sys; from edgerun.cli import main; sys.exit(main())"


class Setup:
    """A fleet name, its registry, a signing key and helpers to release versions of digits."""

    def __init__(self, broker: Mosquitto, keys: Path, tmp_path: Path, package: ModelPackage, fleet: str, db: str):
        self.broker, self.keydir, self.tmp = broker, keys, tmp_path
        self.package = package
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.db = db
        self.registry = Registry(self.db)
        self.key = load_private_key(keys / "hub-t.key")
        self.devices = 0  # the size of the simulated fleet (``sim``)

    def manifest(self, version: int, edit: Callable[[dict], Any] | None = None) -> dict:
        m = build_manifest(self.package)
        m["version"] = version
        m["package"]["version"] = version
        if edit is not None:
            edit(m)
        return sign(m, self.key, "hub-t")

    def publish(self, version: int) -> dict:
        """The whole fleet at once (the state before a rollout)."""
        signed = self.manifest(version)
        self.registry.record_release(self.fleet, signed, source="publish")
        with Connection(Broker(port=self.broker.port), persistent=False) as c:
            c.wait([c.publish(self.topics.release("digits"), encode(signed), retain=True)])
        return signed

    def upload(self, version: int, edit: Callable[[dict], Any] | None = None) -> None:
        self.registry.record_release(self.fleet, self.manifest(version, edit), source="upload")

    def sim(self, *, n: int, **kw: Any) -> SimFleet:
        """A simulated fleet of ``n`` devices on this broker; the watches of ``watch`` wait until the registry knows
        all of it."""
        self.devices = n
        return SimFleet(self.broker.port, self.fleet, self.keydir, n=n, **kw)

    def watch(self, registry: Registry | None = None) -> FleetWatch:
        """A started watch whose registry knows every device of the simulated fleet: a watch settles on a pause
        in the retained messages, and on a loaded host a pause can come before the last device is in."""
        registry = registry or self.registry
        w = FleetWatch(Broker(port=self.broker.port), self.topics, registry, name="test").start()
        try:
            wait_for(lambda: len(registry.device_names(self.fleet)) >= self.devices, what="every device known")
        except BaseException:
            w.stop()
            raise
        return w

    def known(self) -> None:
        """The registry knows every simulated device, as the registry of a hub that has watched its fleet before
        (a command started now settles once all of them are in, instead of on a pause in the retained messages)."""
        self.watch().stop()

    @contextlib.contextmanager
    def running(self, runner: RolloutRunner) -> Iterator[threading.Thread]:
        """``runner.run`` on a thread for the block, stopped and joined after it, whatever the block raised."""
        thread = threading.Thread(target=runner.run, name="rollout-runner", daemon=True)
        thread.start()
        try:
            yield thread
        finally:
            runner.stop()
            thread.join(30)

    def start(self, watch: FleetWatch, version: int, *, selector=(), runner: str = "test:1", **plan) -> int:
        """Record a rollout (``start_rollout``); its id."""
        return start_rollout(self.registry, watch, self.key, "hub-t", "digits", version, selector=list(selector),
                             plan=Plan.parse(**plan), runner=runner).rollout.id

    def rollout(self, version: int, *, selector=(), **plan) -> tuple[Any, list]:
        progress: list = []
        with self.watch() as w:
            rid = self.start(w, version, selector=selector, **plan)
            runner = RolloutRunner(self.registry, w, rid, runner="test:1", tick=0.1, on_progress=progress.append)
            final = runner.run()
        return final, progress

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``edgerun hub ARGS`` as a user runs it, on this fleet, broker and registry."""
        return subprocess.run([sys.executable, "-c", CLI, "hub", *args, *self.common], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    @property
    def common(self) -> list[str]:
        return ["--fleet", self.fleet, "--host", "127.0.0.1", "--port", str(self.broker.port)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "EDGERUN_HUB_DB": self.db, "EDGERUN_HUB_KEY": str(self.keydir / "hub-t.key"),
                "COLUMNS": "200"}


def wait_for(pred: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def all_on(fleet: SimFleet, version: int) -> bool:
    return all(d.active.get("digits") == version for d in fleet.devices.values())
