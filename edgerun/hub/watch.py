"""Follow one fleet on the broker: device state, status and events into the registry and to live listeners.

The watcher subscribes the contract's device topics with wildcards and, when the broker delivers no
retained message to them (RabbitMQ), the exact topics of every device the registry knows.
Messages are parsed in the MQTT thread and written by a writer thread in batches; while the database is
unreachable or locked the batch is kept (device state and status coalesce per device) and written later.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from typing import Callable

from edgerun.contract import Event, State, Status, Topics
from edgerun.hub.registry import Batch, Registry, RegistryError
from edgerun.mqtt import Broker, Connection, backoff_delay

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2
QUIET = 0.25  # no message for this long after the SUBACKs: the retained messages are in
QUIET_ALL_KNOWN = 0.05  # ... or this long, once every device the registry knows has sent its state and status
QUIET_NOTHING_YET = 1.0  # ... or this long when nothing at all has come: a busy broker can be slow to start
MAX_PENDING_EVENTS = 200_000  # kept while the database is down; the oldest go first beyond this
HUB_SESSION_EXPIRY = 3600  # the broker keeps a hub's events this long while it restarts
Listener = Callable[[str, str, object], None]  # (kind: state | status | event | release, device, payload)


class FleetWatch:
    """Keeps the registry and an in-memory view of one fleet current; ``with FleetWatch(...) as w``."""

    def __init__(self, broker: Broker, topics: Topics, registry: Registry | None, *, name: str = "watch",
                 persistent: bool = True, known_devices: list[str] | None = None, recent_events: int = 2000):
        self.topics = topics
        self.registry = registry
        self.states: dict[str, State] = {}
        self.statuses: dict[str, Status] = {}
        self.releases: dict[str, bytes] = {}  # topic -> retained payload ("" when cleared)
        self.recent: deque[tuple[str, Event, float]] = deque(maxlen=recent_events)
        self.messages = 0
        self._known = list(known_devices) if known_devices is not None else \
            registry.device_names(topics.fleet) if registry is not None else []
        self._listeners: list[Listener] = []
        self._batch = Batch()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flushed = threading.Event()
        self._writing = False  # the writer holds a batch it has not written yet
        self._last_message = time.monotonic()
        self._writer: threading.Thread | None = None
        self.db_error: str | None = None
        self._started = False
        self._exact = False  # also subscribe each known device's exact topics (a broker that needs it)
        self._retained_seen = False
        client_id = f"edgerun-hub-{topics.fleet}-{name}" + ("" if persistent else f"-{uuid.uuid4().hex[:8]}")
        self.conn = Connection(broker, client_id=client_id, persistent=persistent,
                               session_expiry=HUB_SESSION_EXPIRY, on_message=self._on_message,
                               on_connected=self._subscribe, max_inflight=100)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, *, wait: bool = True, quiet: float = QUIET, timeout: float = 10.0) -> "FleetWatch":
        """Connect; with ``wait``, return once the retained messages have arrived (none for ``quiet`` s)."""
        if self._started:
            return self
        self._started = True
        if self.registry is not None:
            self._writer = threading.Thread(target=self._write_loop, name="edgerun-hub-writer", daemon=True)
            self._writer.start()
        try:
            self.conn.__enter__()
        except BaseException:
            self._stop.set()
            raise
        if wait:
            self.settle(quiet, timeout)
            if self._known and not self._retained_seen:  # RabbitMQ: retained messages only for exact topics
                self._exact = True
                self.conn.subscribe(self._exact_topics(), wait=timeout)
                self.settle(quiet, timeout)
        return self

    def settle(self, quiet: float = QUIET, timeout: float = 10.0) -> None:
        """Wait for the subscriptions' acknowledgements, then until no message arrived for ``quiet`` seconds
        (a broker sends the retained messages right after it acknowledges; once every known device's state
        and status are in, a shorter pause will do; while nothing at all has come, a longer one), then flush."""
        end = time.monotonic() + timeout
        before = self.messages
        self.conn.wait_subscribed(timeout)
        self._last_message = max(self._last_message, time.monotonic())
        while time.monotonic() < end:
            silent = time.monotonic() - self._last_message
            enough = quiet if self.messages > before else max(quiet, QUIET_NOTHING_YET)
            if silent >= enough or (silent >= QUIET_ALL_KNOWN and self._heard_all_known()):
                break
            time.sleep(0.01)
        self.flush()

    def _heard_all_known(self) -> bool:
        states, statuses = self.states, self.statuses
        return bool(self._known) and all(d in states and d in statuses for d in self._known)

    def stop(self) -> None:
        self.conn.stop()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(5)
        if self.registry is not None:
            self._write_once()

    def __enter__(self) -> "FleetWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what arrived so far is in the registry (or the database refused it): the updates waiting, and
        a write the writer has already taken up."""
        if self.registry is None or self._writer is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not len(self._batch) and not self._writing:
                    return
                self._flushed.clear()
            if not self._flushed.wait(max(0.0, deadline - time.monotonic())) or self.db_error:
                return

    # --- MQTT in ----------------------------------------------------------------------------

    def _exact_topics(self) -> list[str]:
        return [topic for d in self._known for topic in (self.topics.state(d), self.topics.status(d))]

    def _subscribe(self) -> None:
        t = self.topics
        exact = self._exact_topics() if self._exact else []
        self.conn.subscribe([*t.device_filters(), t.releases_filter(), t.releases_filter("+"), *exact])

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        ref = self.topics.parse(topic)
        if ref is None:
            return
        self.messages += 1
        self._last_message = time.monotonic()
        if retained and ref.kind in ("state", "status"):
            self._retained_seen = True
        now = time.time()
        obj: object
        if ref.kind == "state":
            obj = State.from_payload(payload)
            if obj is None:
                return
            old = self.states.get(ref.device)
            if old is not None and obj.session < old.session:
                return  # a stale last will of an earlier connection
            self.states[ref.device] = obj
            with self._lock:
                self._batch.states[ref.device] = (obj, now)
        elif ref.kind == "status":
            obj = Status.from_payload(payload, ref.device)
            if obj is None:
                return
            self.statuses[ref.device] = obj
            with self._lock:
                self._batch.statuses[ref.device] = (obj, now)
        elif ref.kind == "events":
            obj = Event.from_payload(payload)
            if obj is None:
                return
            self.recent.append((ref.device, obj, now))
            with self._lock:
                self._batch.events.append((ref.device, obj, now))
                if len(self._batch.events) > MAX_PENDING_EVENTS:
                    del self._batch.events[:len(self._batch.events) - MAX_PENDING_EVENTS]
        elif ref.kind in ("release", "device_release"):
            self.releases[topic] = payload
            obj = payload
            if payload:
                with self._lock:
                    self._batch.releases[hashlib.sha256(payload).hexdigest()] = payload
        else:
            return
        kind = {"events": "event", "device_release": "release"}.get(ref.kind, ref.kind)
        for fn in list(self._listeners):
            try:
                fn(kind, ref.device or "", obj)
            except Exception:
                log.exception("fleet listener failed on %s", topic)

    # --- the writer -------------------------------------------------------------------------

    def _write_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._stop.wait(FLUSH_SECONDS if not failures else backoff_delay(failures, base=1.0, cap=15.0))
            failures = 0 if self._write_once() else failures + 1

    def _write_once(self) -> bool:
        with self._lock:
            batch, self._batch = self._batch, Batch()
            self._writing = bool(len(batch))
        if not len(batch):
            self._flushed.set()
            return True
        try:
            self.registry.apply(self.topics.fleet, batch)
        except RegistryError as exc:
            if self.db_error != str(exc):
                log.warning("%s; keeping %d update(s) to write when it is back", exc, len(batch))
            self.db_error = str(exc)
            with self._lock:
                batch.merge(self._batch)
                self._batch = batch
                self._writing = False
            self._flushed.set()
            return False
        if self.db_error:
            log.info("registry %s is back: wrote %d kept update(s)", self.registry.shown, len(batch))
            self.db_error = None
        with self._lock:
            self._writing = False
        self._flushed.set()
        return True
