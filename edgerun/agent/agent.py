"""The device agent: MQTT topics in, updates applied in a worker thread, state/status/events out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from edgerun import manifest as manifest_mod
from edgerun.agent.mqtt import Connection
from edgerun.agent.transfer import ChunkTransfer
from edgerun.agent.updater import Updater
from edgerun.config import Config
from edgerun.errors import ConfigError, EdgerunError
from edgerun.plugins import call_each
from edgerun.store import IN_PROGRESS, JournalEntry, Store, read_json

if TYPE_CHECKING:
    from edgerun.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

TOPIC_ROOT = "edgerun/v1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # fleet, device and model names: one safe topic level
STATUS_MIN_INTERVAL = 0.5  # seconds between progress-only status messages
SETTLE_SECONDS = 1.0  # after (re)subscribing, wait for every retained release before acting on any
BACKGROUND_NICE = 10  # downloads, hashing and status yield the CPU to inference (Linux: per thread)


def payload_digest(payload: bytes) -> str:
    """The digest a Manifest gets for this payload (canonical JSON including the signature)."""
    try:
        return manifest_mod.digest(json.loads(payload))
    except Exception:
        return hashlib.sha256(payload).hexdigest()


def background_priority() -> None:
    """Lower the calling thread's CPU priority so loading and hashing never slow requests down."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


class Agent:
    """Receives releases for this device over MQTT and applies them to the runtime, one at a time."""

    def __init__(self, runtime: "Runtime", config: Config):
        self.runtime = runtime
        self.config = config
        cfg = config.mqtt
        for key, value in (("fleet", cfg.fleet), ("device_id", cfg.device_id)):
            if not _NAME.match(value):
                raise ConfigError(f"expected letters, digits, '.', '_' or '-' (one MQTT topic level), got {value!r}",
                                  file=config.source, key=f"mqtt.{key}")
        self.device = cfg.device_id
        self.prefix = f"{TOPIC_ROOT}/{cfg.fleet}"
        self.blob_prefix = f"{self.prefix}/blobs"
        self.device_prefix = f"{self.prefix}/devices/{self.device}"
        self.store = Store(config.state_dir)
        self.trusted = manifest_mod.load_trusted_keys(cfg.trusted_keys)
        self.done_digests: dict[str, float] = read_json(self.store.journal_dir / "done.digests") or {}
        self.updater = Updater(self)
        self.conn = Connection(cfg, client_id=f"edgerun-{cfg.fleet}-{self.device}",
                               state_topic=f"{self.device_prefix}/state", next_session=self.store.next_session,
                               on_message=self._on_message, on_connected=self._on_connected)
        self._lock = threading.Condition()
        self._fleet: dict[str, bytes] = {}
        self._device: dict[str, bytes] = {}
        self._pending: dict[str, bytes] = {}
        self._current: dict[str, str] = {}  # model -> digest being processed
        self._resume: list[tuple[str, JournalEntry]] = []
        self._transfers: dict[str, ChunkTransfer] = {}
        self._updates: dict[str, dict[str, Any]] = {}
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

    def in_loader(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a model load and warm-up) in the normal-priority loader thread and wait for it."""
        if self._loader is None:
            return fn()
        return self._loader.submit(fn).result()

    @property
    def connected(self) -> bool:
        return self.conn.connected.is_set()

    def active_version(self, model: str) -> int | None:
        try:
            return self.runtime.model(model).version
        except EdgerunError:
            ptr = self.store.pointer(model)
            return ptr.version if ptr else None

    # --- MQTT in ----------------------------------------------------------------------------

    def _on_connected(self) -> None:
        # the fleet's and the device's retained releases arrive one after the other: a device override
        # must not be missed because the fleet release was acted on first
        self._settle_until = time.monotonic() + SETTLE_SECONDS
        self.conn.subscribe([f"{self.prefix}/releases/+", f"{self.device_prefix}/releases/+"])
        for t in list(self._transfers.values()):
            self.conn.subscribe(t.missing_topics())
        with self._lock:
            outbox, self._outbox = self._outbox, []
        for topic, payload in outbox:
            self.conn.publish(topic, payload, qos=1)
        self._status_dirty.set()
        self._last_status = 0.0

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(self.blob_prefix + "/"):
            sha, _, index = topic[len(self.blob_prefix) + 1:].partition("/")
            t = self._transfers.get(sha)
            if t is not None and index.isdigit():
                t.on_chunk(int(index), payload)
            return
        if topic.startswith(self.device_prefix + "/releases/"):
            model = topic[len(self.device_prefix) + len("/releases/"):]
            with self._lock:
                if payload:
                    self._device[model] = payload
                else:
                    self._device.pop(model, None)
            self._submit(model)
        elif topic.startswith(self.prefix + "/releases/"):
            model = topic[len(self.prefix) + len("/releases/"):]
            with self._lock:
                self._fleet[model] = payload
            self._submit(model)

    def _submit(self, model: str) -> None:
        """Queue the effective release of ``model`` (the device's own overrides the fleet's)."""
        if not _NAME.match(model):
            log.warning("ignoring a release on a topic with an invalid model name %r", model)
            return
        with self._lock:
            payload = self._device.get(model) or self._fleet.get(model)
            if payload is None:
                return
            if payload and self._current.get(model) == payload_digest(payload):
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
                self._current[model] = payload_digest(payload) if payload else ""
            self._run(model, lambda: self.updater.process(model, payload, self._cancelled(model)))

    def _resume_update(self, model: str, j: JournalEntry) -> None:
        raw = json.dumps(j.manifest).encode()
        try:
            m = manifest_mod.parse(raw, self.trusted, topic_model=model, clock_skew=self.config.mqtt.clock_skew)
        except EdgerunError as exc:
            self.updater.transition(j, "failed", f"cannot resume after restart: {exc}")
            return
        with self._lock:
            self._current[model] = m.digest
        log.info("resuming the update of %s to v%d (was %s)", model, m.version, j.state)
        self._run(model, lambda: self.updater.update(m, self._cancelled(model), resume_from=j.state))

    def _run(self, model: str, fn) -> None:
        try:
            fn()
        except Exception:
            log.exception("update of %s failed unexpectedly", model)
        finally:
            with self._lock:
                self._current.pop(model, None)

    def _cancelled(self, model: str):
        return lambda: self._stop.is_set() or model in self._pending

    # --- transfers --------------------------------------------------------------------------

    def add_transfer(self, t: ChunkTransfer) -> None:
        self._transfers[t.entry.sha256] = t
        self.conn.subscribe(t.missing_topics())

    def remove_transfer(self, t: ChunkTransfer) -> None:
        if self._transfers.pop(t.entry.sha256, None) is not None:
            self.conn.unsubscribe(t.all_topics())

    def transfers(self) -> list[ChunkTransfer]:
        return list(self._transfers.values())

    # --- MQTT out ---------------------------------------------------------------------------

    def report(self, entry: JournalEntry) -> None:
        """Publish one transition (already journaled): an event, the hook, and the status."""
        self._remember(entry)
        event = {"model": entry.model, "version": entry.version, "state": entry.state, "detail": entry.detail,
                 "ts": entry.ts}
        level = logging.WARNING if entry.state in ("failed", "rejected", "rolled_back") else logging.INFO
        log.log(level, "update %s v%d: %s %s", entry.model, entry.version, entry.state, entry.detail)
        payload = json.dumps(event, ensure_ascii=False).encode()
        topic = f"{self.device_prefix}/events"
        with self._lock:
            if self.connected:
                self.conn.publish(topic, payload, qos=1)
            elif len(self._outbox) < 1000:
                self._outbox.append((topic, payload))
        call_each(self.runtime.pm, "on_update_event", model=entry.model, version=entry.version, state=entry.state,
                  detail=entry.detail)  # a listener that raises is logged by name and skipped
        self._last_status = 0.0
        self._status_dirty.set()

    def progress(self, entry: JournalEntry, fraction: float) -> None:
        u = self._updates.get(entry.model)
        if u is not None:
            u["progress"] = round(min(1.0, fraction), 4)
            self._status_dirty.set()

    def _remember(self, entry: JournalEntry) -> None:
        self._updates[entry.model] = {"model": entry.model, "state": entry.state, "version": entry.version,
                                      "progress": entry.progress, "detail": entry.detail,
                                      "error": entry.detail if entry.state in ("failed", "rejected", "rolled_back")
                                      else None, "ts": entry.ts}
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

    def status(self) -> dict[str, Any]:
        rt = self.runtime
        try:
            profile = rt.profile.name
        except Exception as exc:
            profile = f"unknown ({exc})"
        backends = [{"name": b.name, "available": a.available, "version": a.version,
                     "reason": None if a.available else str(a)} for b, a in rt.backend_status()]
        models = []
        for m in rt.models():
            d = m.describe()
            models.append({k: d.get(k) for k in ("name", "version", "variant", "backend", "sha256", "memory_bytes")})
        current = self._updates.get(self._last_update) if self._last_update else None
        if current is not None:
            for u in self._updates.values():
                if u["state"] in IN_PROGRESS:
                    current = u
        return {"device": self.device, "fleet": self.config.mqtt.fleet, "ts": time.time(),
                "session": self.conn.session, "profile": profile, "backends": backends, "models": models,
                "update": current, "updates": dict(self._updates)}

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        try:
            payload = json.dumps(self.status(), ensure_ascii=False, default=str).encode()
        except Exception:
            log.exception("building the status failed")
            return
        self.conn.publish(f"{self.device_prefix}/status", payload, qos=1, retain=True)
