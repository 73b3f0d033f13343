"""The device agent: MQTT topics in, updates applied in a worker thread, state/status/events out."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from edgerun import manifest as manifest_mod
from edgerun.agent.transfer import Chunks
from edgerun.agent.updater import UpdatePolicy, Updater
from edgerun.config import Config
from edgerun.contract import (FAILED, BackendInfo, Event, ModelInfo, Status, Topics, UpdateInfo, current_update,
                              valid_name)
from edgerun.devicekey import DeviceKey
from edgerun.errors import ConfigError, DeviceKeyError, EdgerunError
from edgerun.mqtt import Broker, Connection, background_priority
from edgerun.plugins import call_each
from edgerun.store import JournalEntry, Store

if TYPE_CHECKING:
    from edgerun.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS_MIN_INTERVAL = 0.5  # seconds between progress-only status messages
SETTLE_SECONDS = 1.0  # after (re)subscribing, wait for every retained release before acting on any
OUTBOX_LIMIT = 1000  # events kept while offline


class Agent:
    """Receives releases for this device over MQTT and applies them to the runtime, one at a time."""

    def __init__(self, runtime: "Runtime", config: Config):
        self.runtime = runtime
        self.config = config
        self.tuner: Any = None  # edgerun.autotune.AutoTuner: tunes each version an update activates (the daemon's)
        cfg = config.mqtt
        for key, value in (("fleet", cfg.fleet), ("device_id", cfg.device_id)):
            if not valid_name(value):
                raise ConfigError(f"expected letters, digits, '.', '_' or '-' (one MQTT topic level), got {value!r}",
                                  file=config.source, key=f"mqtt.{key}")
        self.device = cfg.device_id
        self.topics = Topics(cfg.fleet)
        self.store = Store(config.state_dir)
        self.conn = Connection(Broker.from_config(cfg), client_id=f"edgerun-{cfg.fleet}-{self.device}",
                               presence_topic=self.topics.state(self.device), next_session=self.store.next_session,
                               on_message=self._on_message, on_connected=self._on_connected, background=True)
        self.chunks = Chunks(self.conn)
        policy = UpdatePolicy(trusted=manifest_mod.load_trusted_keys(cfg.trusted_keys), clock_skew=cfg.clock_skew,
                              unload_first=cfg.unload_first, ca_file=cfg.ca_file, stall_timeout=cfg.stall_timeout)
        self.updater = Updater(runtime, self.store, self.chunks, self.topics, policy, self)
        self.recipient = self._device_key()
        self._lock = threading.Condition()
        self._fleet: dict[str, bytes] = {}
        self._device: dict[str, bytes] = {}
        self._pending: dict[str, bytes] = {}
        self._current: dict[str, str] = {}  # model -> digest being processed
        self._resume: list[tuple[str, JournalEntry]] = []
        self._updates: dict[str, UpdateInfo] = {}
        self._last_update: str | None = None
        self._outbox: list[tuple[str, bytes]] = []
        self._stop = threading.Event()
        self._status_dirty = threading.Event()
        self._last_status = 0.0
        self._settle_until = 0.0
        self._loader: ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        for j in self.store.journals():
            self._remember(j)

    def _device_key(self) -> str | None:
        """The device's age key, made on first start: encrypted releases are encrypted to it (docs/protection.md)."""
        if self.runtime.device_key.implicit:
            self.runtime.device_key = DeviceKey.from_config(self.config)
        key = self.runtime.device_key
        try:
            recipient = str(key.ensure().recipient)
        except DeviceKeyError as exc:
            log.error("%s; encrypted releases are rejected until it is fixed", exc)
            return None
        log.info("device key %s: %s (enrol it on the hub: edgerun hub keys add %s %s)", key.path, recipient,
                 self.device, recipient)
        return recipient

    # --- lifecycle --------------------------------------------------------------------------

    def restore(self) -> None:
        """Serve the store's active versions; roll back swaps a crash interrupted (before serving starts)."""
        self._resume = self.updater.restore()

    def start(self) -> None:
        """Connect in the background and start applying releases; returns at once."""
        # loading runs at normal priority (a backend's inference threads are created then and inherit it);
        # the thread must exist before the lower-priority worker would create it
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="edgerun-load")
        self._loader.submit(lambda: None).result()
        for target, name in ((self._work, "edgerun-updates"), (self._status_loop, "edgerun-status")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.conn.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self.conn.connected.is_set():
            self._publish_status()
        self.conn.stop()  # a download in progress sees _stop within 0.25 s and stays journalled to resume
        if self._loader is not None:
            self._loader.shutdown(wait=False)

    @property
    def connected(self) -> bool:
        return self.conn.connected.is_set()

    def known_models(self) -> list[str]:
        """The models this device serves or keeps: their release topics are subscribed one by one too."""
        return sorted({m.name for m in self.runtime.models()} | set(self.store.models()) | set(self._fleet)
                      | set(self._device))

    # --- MQTT in ----------------------------------------------------------------------------

    def _on_connected(self) -> None:
        # the fleet's and the device's retained releases arrive one after the other: a device override
        # must not be missed because the fleet release was acted on first
        self._settle_until = time.monotonic() + SETTLE_SECONDS
        t = self.topics
        # a broker may keep retained messages from wildcard subscriptions (RabbitMQ does): the exact
        # release topics of the models this device knows bring them in any case
        exact = [topic for m in self.known_models() for topic in (t.release(m), t.release(m, self.device))]
        self.conn.subscribe([t.releases_filter(), t.releases_filter(self.device), *exact])
        self.chunks.resubscribe()
        with self._lock:
            outbox, self._outbox = self._outbox, []
        for topic, payload in outbox:
            self.conn.publish(topic, payload, qos=1)
        self._status_dirty.set()
        self._last_status = 0.0

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        ref = self.topics.parse(topic)
        if ref is None:
            return
        if ref.kind == "blob":
            self.chunks.on_chunk(ref.sha256, ref.index, payload)
        elif ref.kind == "device_release" and ref.device == self.device:
            with self._lock:
                if payload:
                    self._device[ref.model] = payload
                else:
                    self._device.pop(ref.model, None)
            self._submit(ref.model)
        elif ref.kind == "release":
            with self._lock:
                self._fleet[ref.model] = payload
            self._submit(ref.model)

    def _submit(self, model: str) -> None:
        """Queue the effective release of ``model`` (the device's own overrides the fleet's)."""
        with self._lock:
            payload = self._device.get(model) or self._fleet.get(model)
            if payload is None:
                return
            if payload and self._current.get(model) == manifest_mod.payload_digest(payload):
                self._pending.pop(model, None)
                return
            self._pending[model] = payload
            self._lock.notify_all()

    # --- the worker -------------------------------------------------------------------------

    def _work(self) -> None:
        background_priority()
        for model, j in self._resume:
            if self._stop.is_set():
                return
            self._resume_update(model, j)
        while not self._stop.is_set():
            with self._lock:
                while (not self._pending or time.monotonic() < self._settle_until) and not self._stop.is_set():
                    self._lock.wait(max(0.05, min(1.0, self._settle_until - time.monotonic())))
                if self._stop.is_set():
                    return
                model = next(iter(self._pending))
                payload = self._pending.pop(model)
                self._current[model] = manifest_mod.payload_digest(payload) if payload else ""
            self._run(model, lambda: self.updater.process(model, payload, self._cancelled(model)))

    def _resume_update(self, model: str, j: JournalEntry) -> None:
        try:
            m = self.updater.parse(json.dumps(j.manifest).encode(), model)
        except EdgerunError as exc:
            self.updater.transition(j, "failed", f"cannot resume after restart: {exc}")
            return
        with self._lock:
            self._current[model] = m.digest
        log.info("resuming the update of %s to v%d (was %s)", model, m.version, j.state)
        self._run(model, lambda: self.updater.update(m, self._cancelled(model), resume_from=j.state))

    def _run(self, model: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("update of %s failed unexpectedly", model)
        finally:
            with self._lock:
                self._current.pop(model, None)

    def _cancelled(self, model: str) -> Callable[[], str]:
        """Why the update of ``model`` should stop now: "stopping", "superseded", or "" to go on."""
        return lambda: "stopping" if self._stop.is_set() else "superseded" if model in self._pending else ""

    # --- MQTT out (the updater's host) --------------------------------------------------------

    def report(self, entry: JournalEntry) -> None:
        """Publish one transition (already journaled): an event, the hook, and the status."""
        self._remember(entry)
        level = logging.WARNING if entry.state in FAILED else logging.INFO
        log.log(level, "update %s v%d: %s %s", entry.model, entry.version, entry.state, entry.detail)
        payload = Event(entry.model, entry.version, entry.state, entry.detail, entry.ts).to_payload()
        topic = self.topics.events(self.device)
        with self._lock:
            if self.connected:
                self.conn.publish(topic, payload, qos=1)
            elif len(self._outbox) < OUTBOX_LIMIT:
                self._outbox.append((topic, payload))
        call_each(self.runtime.pm, "on_update_event", model=entry.model, version=entry.version, state=entry.state,
                  detail=entry.detail)  # a listener that raises is logged by name and skipped
        self._last_status = 0.0
        self._status_dirty.set()

    def progress(self, entry: JournalEntry, fraction: float) -> None:
        u = self._updates.get(entry.model)
        if u is not None:
            self._updates[entry.model] = replace(u, progress=round(min(1.0, fraction), 4))
            self._status_dirty.set()

    def status_changed(self) -> None:
        """Publish a new status soon (a model swapped to its tuned pick, say)."""
        self._status_dirty.set()

    def in_loader(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a model load and warm-up) in the normal-priority loader thread and wait for it."""
        if self._loader is None:
            return fn()
        return self._loader.submit(fn).result()

    def _remember(self, entry: JournalEntry) -> None:
        self._updates[entry.model] = UpdateInfo.transition(entry.model, entry.version, entry.state, entry.detail,
                                                           entry.progress, entry.ts)
        self._last_update = entry.model

    def _status_loop(self) -> None:
        background_priority()
        while not self._stop.is_set():
            self._status_dirty.wait(1.0)
            if self._stop.is_set():
                return
            if not self._status_dirty.is_set() or not self.connected:
                continue
            wait = STATUS_MIN_INTERVAL - (time.monotonic() - self._last_status)
            if wait > 0 and self._last_status:
                self._stop.wait(wait)
            self._status_dirty.clear()
            self._publish_status()

    def status(self) -> Status:
        rt = self.runtime
        try:
            profile = rt.profile.name
        except Exception as exc:
            profile = f"unknown ({exc})"
        backends = tuple(BackendInfo(b.name, a.available, a.version, None if a.available else str(a))
                         for b, a in rt.backend_status())
        models = []
        for m in rt.models():
            d = m.describe()
            models.append(ModelInfo(d["name"], d["version"], d.get("variant") or "", d.get("backend") or "",
                                    d.get("sha256") or "", d.get("memory_bytes")))
        updates = dict(self._updates)
        return Status(device=self.device, fleet=self.config.mqtt.fleet, session=self.conn.session, profile=profile,
                      tags=dict(self.config.mqtt.tags), backends=backends, models=tuple(models),
                      update=current_update(updates, self._last_update),
                      updates=updates, memory=_memory(rt), recipient=self.recipient,
                      tuning=tuple(rt.tuned.values()))

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        try:
            payload = self.status().to_payload()
        except Exception:
            log.exception("building the status failed")
            return
        self.conn.publish(self.topics.status(self.device), payload, qos=1, retain=True)


def _memory(rt: "Runtime") -> dict[str, int]:
    """The process's resident memory, what the host has available, and the models' budget."""
    import psutil

    out = {"rss_bytes": psutil.Process().memory_info().rss, "available_bytes": psutil.virtual_memory().available}
    try:
        out["budget_bytes"] = rt.memory_budget()
    except Exception:
        pass
    return out
