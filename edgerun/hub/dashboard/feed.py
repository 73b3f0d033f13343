"""The dashboard's live view of one fleet: device rows, recent events and rollouts, pushed to streams in batches.

The watcher's listener only notes which device changed (it runs in the MQTT thread, for every message);
every ``FLUSH_SECONDS`` the event loop rebuilds those rows from the watcher's state and sends them as one
``device`` message, so a burst of a thousand status messages costs each page a few messages a second.
Rollouts are read from the registry every ``ROLLOUT_POLL_SECONDS`` (the runner may be another process).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from edgerun.contract import Event
from edgerun.hub.dashboard.rows import device_row, event_row, rollout_row
from edgerun.hub.registry import DeviceRecord, Registry, RegistryError
from edgerun.hub.watch import FleetWatch

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.3
ROLLOUT_POLL_SECONDS = 1.0
EVENTS = 200
ROLLOUTS = 20
QUEUE = 64  # messages a stream may fall behind before it is closed (the page reconnects and reloads)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()


@dataclass(frozen=True)
class Message:
    """One server-sent event: its name and JSON data."""

    event: str
    data: str

    def sse(self) -> dict[str, str]:
        return {"event": self.event, "data": self.data}


class Subscriber:
    """One open stream: a bounded queue; ``None`` in it ends the stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=QUEUE)
        self.closed = False

    def put(self, msg: Message) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            log.info("a dashboard stream fell %d messages behind: closing it (the page reloads)", QUEUE)
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class FleetFeed:
    """Rows of every device, the last events and rollouts of one fleet; deltas for every open stream."""

    def __init__(self, registry: Registry, watch: FleetWatch, fleet: str, *, events: int = EVENTS,
                 rollouts: int = ROLLOUTS):
        self.registry = registry
        self.watch = watch
        self.fleet = fleet
        self.instance = uuid.uuid4().hex  # rev and event_seq count from here: a restarted hub is a new instance
        self.rev = 0  # grows with every row built: the page keeps the newest row of each device
        self.event_seq = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=events)
        self.rollouts: dict[int, dict[str, Any]] = {}
        self.hub: dict[str, Any] = {}
        self._rollout_limit = rollouts
        self._finished: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._records: dict[str, DeviceRecord] = {}
        self._lock = threading.Lock()
        self._dirty: dict[str, float] = {}
        self._incoming: list[tuple[str, Event, float]] = []
        self._loaded_events: set[tuple[Any, ...]] = set()
        self._subscribers: set[Subscriber] = set()
        self._snapshot: bytes | None = None
        self._gzipped: bytes | None = None
        self._poll_error: str | None = None
        self._poll_now: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        watch.add_listener(self._on_message)  # before loading: nothing that arrives meanwhile is lost
        self._load()

    # --- in -----------------------------------------------------------------------------------

    def _on_message(self, kind: str, device: str, obj: object) -> None:
        """The watcher's listener (MQTT thread): note what changed, nothing more."""
        if kind in ("state", "status") and device:
            with self._lock:
                self._dirty[device] = time.time()
        elif kind == "event" and isinstance(obj, Event):
            with self._lock:
                self._incoming.append((device, obj, time.time()))
                if len(self._incoming) > 10 * EVENTS:
                    del self._incoming[:-EVENTS]

    def _load(self) -> None:
        self._records = {r.device: r for r in self.registry.devices(self.fleet)}
        names = set(self._records) | set(list(self.watch.states)) | set(list(self.watch.statuses))
        for name in sorted(names):
            self.rows[name] = self._row(name, None)
        for e in self.registry.events(self.fleet, limit=self.events.maxlen or EVENTS):
            self.event_seq += 1
            self.events.append(event_row(self.event_seq, e.device, Event(e.model, e.version, e.state, e.detail, e.ts),
                                         e.received))
            self._loaded_events.add((e.device, e.model, e.version, e.state, e.ts))
        self._apply_rollouts(self.read_rollouts())
        self.hub = self._hub_status()

    def _row(self, name: str, seen: float | None) -> dict[str, Any]:
        self.rev += 1
        return device_row(name, self.watch.states.get(name), self.watch.statuses.get(name),
                          self._records.get(name), seen, self.rev)

    def _hub_status(self) -> dict[str, Any]:
        return {"broker": self.watch.conn.broker.address, "connected": self.watch.conn.connected.is_set(),
                "registry_error": self.watch.db_error or self._poll_error}

    # --- batches ------------------------------------------------------------------------------

    def flush(self) -> list[Message]:
        """Rebuild the rows that changed and take the new events: one message of each kind at most."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            incoming, self._incoming = self._incoming, []
        out = []
        if dirty:
            changed = []
            for name, seen in dirty.items():
                self.rows[name] = row = self._row(name, seen)
                changed.append(row)
            out.append(Message("device", dumps(changed)))
        if incoming:
            new = []
            for device, e, received in incoming[-(self.events.maxlen or EVENTS):]:
                if (device, e.model, e.version, e.state, e.ts) in self._loaded_events:
                    continue
                self.event_seq += 1
                row = event_row(self.event_seq, device, e, received)
                self.events.append(row)
                new.append(row)
            if new:
                out.append(Message("event", dumps(new)))
        self._loaded_events.clear()  # only events that arrived while the registry was read can be twice
        hub = self._hub_status()
        if hub != self.hub:
            self.hub = hub
            out.append(Message("hub", dumps(hub)))
        if out:
            self._snapshot = None
        return out

    def read_rollouts(self) -> list[dict[str, Any]]:
        """The recent rollouts with their counts (blocking: run it in a thread)."""
        now = time.time()
        out = []
        for r in self.registry.rollouts(self.fleet, limit=self._rollout_limit):
            key = (r.state, r.stage, r.request, r.reason, r.finished_at)
            cached = self._finished.get(r.id)
            if not r.in_progress and cached is not None and cached[0] == key:
                out.append(cached[1])
                continue
            row = rollout_row(r, self.registry.rollout_devices(r.id), now)
            if not r.in_progress:
                self._finished[r.id] = (key, row)
            out.append(row)
        return out

    def _apply_rollouts(self, rows: list[dict[str, Any]]) -> list[Message]:
        changed = []
        fresh = {}
        for row in rows:
            old = self.rollouts.get(row["id"])
            if old is not None and {**old, "rev": None} == {**row, "rev": None}:
                fresh[row["id"]] = old
                continue
            self.rev += 1
            fresh[row["id"]] = row = {**row, "rev": self.rev}
            changed.append(row)
        gone = set(self.rollouts) - set(fresh)
        self.rollouts = fresh
        if not changed and not gone:
            return []
        self._snapshot = None
        return [Message("rollout", dumps(changed))] if changed else []

    # --- out ----------------------------------------------------------------------------------

    def snapshot(self, gzipped: bool = False) -> bytes:
        """The whole view as JSON, built once per change."""
        if self._snapshot is None:
            self._snapshot = orjson.dumps({
                "fleet": self.fleet, "instance": self.instance, "generated": time.time(), "rev": self.rev,
                "event_seq": self.event_seq,
                "hub": {**self.hub, "messages": self.watch.messages}, "releases": self.releases(),
                "devices": list(self.rows.values()), "rollouts": list(self.rollouts.values()),
                "events": list(self.events)}, option=orjson.OPT_NON_STR_KEYS)
            self._gzipped = None
        if not gzipped:
            return self._snapshot
        if self._gzipped is None:
            self._gzipped = gzip.compress(self._snapshot, compresslevel=1)
        return self._gzipped

    def releases(self) -> list[dict[str, Any]]:
        """The fleet's current retained releases: model, version, when made."""
        out = []
        for topic, payload in list(self.watch.releases.items()):
            ref = self.watch.topics.parse(topic)
            if ref is None or ref.kind != "release" or not payload:
                continue
            try:
                m = json.loads(payload)
            except ValueError:
                continue
            if isinstance(m, dict):
                out.append({"model": ref.model, "version": m.get("version"), "created": m.get("created")})
        return sorted(out, key=lambda r: str(r["model"]))

    def hello(self) -> Message:
        return Message("hello", dumps({"instance": self.instance, "rev": self.rev, "event_seq": self.event_seq}))

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        if self._closed:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def broadcast(self, messages: list[Message]) -> None:
        for msg in messages:
            for sub in list(self._subscribers):
                sub.put(msg)
                if sub.closed:
                    self._subscribers.discard(sub)

    @property
    def streams(self) -> int:
        return len(self._subscribers)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the flush and rollout loops on the running event loop."""
        self._poll_now = asyncio.Event()
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._rollout_loop())]

    def poll_soon(self) -> None:
        """Read the rollouts now (after a pause, resume or abort from the page)."""
        if self._poll_now is not None:
            self._poll_now.set()

    def close_streams(self) -> None:
        """End every open stream (the server is stopping); new ones end at once."""
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()
        self._subscribers.clear()

    async def stop(self) -> None:
        self.close_streams()
        self.watch.remove_listener(self._on_message)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.broadcast(self.flush())
            except Exception:
                log.exception("dashboard: building the fleet's changes failed")

    async def _rollout_loop(self) -> None:
        assert self._poll_now is not None
        while True:
            try:
                await asyncio.wait_for(self._poll_now.wait(), ROLLOUT_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._poll_now.clear()
            try:
                rows = await asyncio.to_thread(self.read_rollouts)
            except RegistryError as exc:
                if self._poll_error != str(exc):
                    log.warning("dashboard: cannot read rollouts: %s", exc)
                self._poll_error = str(exc)
                continue
            except Exception:
                log.exception("dashboard: reading rollouts failed")
                continue
            self._poll_error = None
            self.broadcast(self._apply_rollouts(rows))
