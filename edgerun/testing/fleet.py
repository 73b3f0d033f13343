"""A simulated fleet: a thousand or more lightweight devices that speak the MQTT contract on one broker.

Each device has its own paho client, persistent session, birth and last will, and answers releases as the
real agent does on the wire (events, retained status, explicit roll-back, downgrade rejection), without
downloading or loading anything. One thread drives every client through paho's external-loop calls and
``selectors``, so an idle fleet costs little CPU.

>>> with SimFleet(broker.port, "f1", keydir, n=1000, fail_rate=0.1) as fleet:   # doctest: +SKIP
...     fleet.counts()

Injected failures: ``fail_rate`` with ``fail_mode="random"`` fails each device's update to a version with that
chance, fixed by the seed, the device and the version (``will_fail`` predicts it in any process);
``fail_mode="spread"`` fails exactly that share of the updates to each version, evenly in the order they
end (at 20%, the 5th, 10th, 15th... update), so any group of devices that updates first, such as a
rollout's canary of 10, holds exactly its share of failures whichever devices it is made of.

Tuning (``tune=True``, contract 1.4): once a version is active, each device "tunes" it and its status carries the
figures: every (variant, backend, threads) its profile's backends run, with a latency drawn from its profile's
CPU model (``PROFILE_CPUS``; several per profile), its variant's precision and the backend, spread from device to
device by a few per cent, fixed by the seed and the device; int8 is wrong (dropped) on about one in five x86
CPUs without VNNI, whose int8 kernels saturate. The device then serves the fastest candidate it kept. ``SimFleet.retune`` measures a device again.

``python -m edgerun.testing.fleet --port P --fleet F --trusted-keys DIR`` runs one in its own process. Do that
when the fleet is large and the same process runs other paho clients with ``loop_start()``: paho's own loop
uses ``select()``, which cannot watch a socket whose descriptor is 1024 or more.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import logging
import os
import queue
import random
import selectors
import signal
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgerun import manifest as manifest_mod
from edgerun.agent.agent import OUTBOX_LIMIT, SETTLE_SECONDS
from edgerun.contract import (FINAL, BackendInfo, Event, ModelInfo, State, Status, Topics, TunedCandidate,
                              TuningInfo, UpdateInfo, current_update)
from edgerun.errors import ManifestError
from edgerun.manifest import Manifest
from edgerun.mqtt import PROTOCOLS, SESSION_EXPIRY, SUBSCRIBE_BATCH, backoff_delay
from edgerun.package import Variant

log = logging.getLogger(__name__)
T = TypeVar("T")

PROFILES = ("generic-x86_64", "raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano")
TAGS: Mapping[str, Sequence[str]] = {"site": ("ams", "fra", "lis", "waw"),
                                     "ring": ("canary",) + ("stable",) * 9}  # about one device in ten is a canary
PROFILE_BACKENDS = {"generic-x86_64": ("onnxruntime", "openvino"), "raspberry-pi-4": ("litert", "onnxruntime"),
                    "raspberry-pi-5": ("litert", "onnxruntime"), "jetson-orin-nano": ("onnxruntime",)}
PROFILE_MEMORY = {"generic-x86_64": 16 << 30, "raspberry-pi-4": 4 << 30, "raspberry-pi-5": 8 << 30,
                  "jetson-orin-nano": 8 << 30}
FORMAT_BACKEND = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert"}
BACKEND_FORMATS = {"onnxruntime": ("onnx",), "openvino": ("onnx", "openvino"), "litert": ("tflite",)}
# the CPU models of each profile's devices, each with its class and how much slower than the first x86 one it runs
PROFILE_CPUS: Mapping[str, Sequence[str]] = {
    "generic-x86_64": ("Intel(R) Core(TM) i5-8259U CPU @ 2.30GHz", "11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz"),
    "raspberry-pi-4": ("Cortex-A72",), "raspberry-pi-5": ("Cortex-A76",), "jetson-orin-nano": ("Cortex-A78AE",)}
CPU_FIGURES = {"Intel(R) Core(TM) i5-8259U CPU @ 2.30GHz": ("x86", 1.0),
               "11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz": ("x86-vnni", 0.8),
               "Cortex-A72": ("arm64", 6.0), "Cortex-A76": ("arm64", 2.5), "Cortex-A78AE": ("arm64", 2.0)}
PRECISION_FACTOR = {"fp32": 1.0, "fp16": 1.1, "int4": 0.9}  # int8 depends on the CPU's kernels (INT8_FACTOR)
INT8_FACTOR = {"x86": 1.6, "x86-vnni": 0.6, "arm64": 0.7}
BACKEND_FACTOR = {("openvino", "x86"): 0.9, ("openvino", "x86-vnni"): 0.85, ("litert", "arm64"): 0.8}
BASE_LATENCY_MS = 0.05  # an fp32 MLP on onnxruntime, one thread, on the first x86 CPU
SIM_THREADS = (1, 2)
BASE_RSS = 120 << 20  # what a simulated device says its process uses before any model
CONNECT_BATCH = 50  # devices connected at once when the fleet starts
CONNECT_INTERVAL = 0.02  # seconds between two batches
MISC_INTERVAL = 1.0  # seconds between two keep-alive passes over every client
FAREWELL_TIMEOUT = 5.0  # seconds a clean stop waits for the broker to acknowledge every offline state
PARSE_CACHE = 256  # parsed release payloads kept (the fleet's devices all receive the same ones)
FAIL_MODES = ("random", "spread")


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts``, the same in every process (unlike ``hash``)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def _pick(choices: Sequence[T], *parts: object) -> T:
    return choices[int(_unit(*parts) * len(choices))]


def _guess_version(payload: bytes) -> int:
    """The version a refused payload claims, for its ``rejected`` event (0 when it names none)."""
    try:
        v = json.loads(payload).get("version")
    except Exception:
        return 0
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


@dataclass(frozen=True)
class _Kept:
    """One version a device keeps "on disk": what it serves as, its files, the release it came from."""

    info: ModelInfo
    files: frozenset[str]
    digest: str


@dataclass
class _Job:
    """One update or roll-back in progress: the transitions still to report, then the swap."""

    manifest: Manifest
    variant: str
    backend: str
    steps: list[tuple[str, str, float | None]]
    chosen: Variant | None = None  # None for a roll-back: the kept version is served again
    state: str = ""  # the last transition reported

    @property
    def cancellable(self) -> bool:
        """The real agent cancels an update only while it downloads."""
        return self.state in ("", "queued", "downloading")


@dataclass(eq=False, repr=False)
class SimDevice:
    """One simulated device; every attribute is written by the fleet's loop thread only."""

    fleet: "SimFleet"
    id: str
    index: int
    profile: str
    tags: dict[str, str]
    client: mqtt.Client = field(init=False)
    session: int = 0
    connected: bool = False
    ready: bool = False  # connected, and the broker acknowledged this connection's birth state and status
    online_wanted: bool = True
    active: dict[str, int] = field(default_factory=dict)  # model -> version served (replaced, never edited)
    events: list[Event] = field(default_factory=list)  # every event produced (sent, or in the outbox offline)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    updates: dict[str, UpdateInfo] = field(default_factory=dict)
    kept: dict[str, dict[int, _Kept]] = field(default_factory=dict)
    previous: dict[str, int | None] = field(default_factory=dict)
    fleet_releases: dict[str, bytes] = field(default_factory=dict)
    device_releases: dict[str, bytes] = field(default_factory=dict)
    pending: dict[str, bytes] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)  # digests of releases that reached a final state
    job: _Job | None = None
    last_update: str | None = None
    settle_until: float = 0.0
    attempt: int = 0
    mask: int = 0  # the selector events registered for this client's socket
    waiting: set[int] = field(default_factory=set)  # mids whose PUBACK ``ready`` (or a clean stop) waits for
    outbox: list[Event] = field(default_factory=list)
    tuned: dict[tuple[str, int], TuningInfo] = field(default_factory=dict)  # (model, version) -> what it measured
    tuned_from: dict[tuple[str, int], Manifest] = field(default_factory=dict)
    retunes: int = 0

    def __repr__(self) -> str:
        return f"SimDevice({self.id!r}, session={self.session}, connected={self.connected}, active={self.active})"

    # --- connection -----------------------------------------------------------------------------

    def connect(self) -> None:
        """Open a new connection (a new session number, its offline state as the last will)."""
        f = self.fleet
        if f.closing or not self.online_wanted or self.client.socket() is not None:
            return
        self.session += 1
        self.client.will_set(f.topics.state(self.id), State(False, self.session).to_payload(), qos=1, retain=True)
        try:
            if self.client.protocol == MQTTProtocolVersion.MQTTv5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = f.session_expiry
                self.client.connect(f.host, f.port, f.keepalive, clean_start=False, properties=props)
            else:
                self.client.connect(f.host, f.port, f.keepalive)
        except (OSError, ValueError) as exc:
            log.info("%s: broker unreachable: %s", self.id, exc)
            self._retry()

    def _retry(self) -> None:
        delay = backoff_delay(self.attempt)
        self.attempt += 1
        self.fleet.later(delay, self.connect)

    def on_connect(self) -> None:
        """Birth, subscriptions, the events kept while offline, the status; act on releases a second later."""
        t = self.fleet.topics
        self.connected, self.attempt = True, 0
        self.waiting = {self._publish(t.state(self.id), State(True, self.session).to_payload(), retain=True)}
        exact = [topic for m in self.known_models() for topic in (t.release(m), t.release(m, self.id))]
        filters = [t.releases_filter(), t.releases_filter(self.id), *exact]
        for i in range(0, len(filters), SUBSCRIBE_BATCH):
            self.client.subscribe([(x, 1) for x in filters[i:i + SUBSCRIBE_BATCH]])
        outbox, self.outbox = self.outbox, []
        for ev in outbox:
            self._publish(t.events(self.id), ev.to_payload())
        self.waiting.add(self.publish_status())
        self.settle_until = time.monotonic() + SETTLE_SECONDS
        self.fleet.later(SETTLE_SECONDS, self.work)

    def on_disconnect(self) -> None:
        self.connected = self.ready = False
        self.waiting.clear()
        if self.online_wanted and not self.fleet.closing:
            self._retry()

    def on_puback(self, mid: int) -> None:
        if mid in self.waiting:
            self.waiting.discard(mid)
            self.ready = self.connected and not self.waiting

    def drop(self) -> None:
        """Lose the connection without DISCONNECT: the broker publishes the last will."""
        self.online_wanted = False
        self.connected = self.ready = False
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def revive(self) -> None:
        self.online_wanted = True
        self.connect()

    def farewell(self) -> None:
        """A clean stop, as the agent's: the status, then the offline state (retained), before DISCONNECT."""
        if not self.connected:
            return
        self.waiting = {self.publish_status(),
                        self._publish(self.fleet.topics.state(self.id), State(False, self.session).to_payload(),
                                      retain=True)}

    # --- publishing -----------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.fleet.messages_sent += 1
        return info.mid

    def status(self) -> Status:
        current = current_update(self.updates, self.last_update)
        rss = BASE_RSS + sum(m.memory_bytes or 0 for m in self.models.values())
        total = PROFILE_MEMORY.get(self.profile, 4 << 30)
        backends = tuple(BackendInfo(b, True, "sim") for b in PROFILE_BACKENDS.get(self.profile, ("onnxruntime",)))
        tuning = tuple(t for m in self.models.values() if (t := self.tuned.get((m.name, m.version))))
        return Status(device=self.id, fleet=self.fleet.fleet, session=self.session, profile=self.profile,
                      tags=dict(self.tags), backends=backends, models=tuple(self.models.values()), update=current,
                      updates=dict(self.updates),
                      memory={"rss_bytes": rss, "available_bytes": total - rss, "budget_bytes": (total - rss) // 2},
                      tuning=tuning)

    def publish_status(self) -> int:
        return self._publish(self.fleet.topics.status(self.id), self.status().to_payload(), retain=True)

    def report(self, model: str, version: int, state: str, detail: str, progress: float | None = None,
               digest: str = "") -> None:
        """One transition: remembered, then the event and the retained status (the event waits while offline)."""
        ts = time.time()
        self.updates[model] = UpdateInfo.transition(model, version, state, detail, progress, ts)
        self.last_update = model
        if state in FINAL and digest:
            self.done.add(digest)
        ev = Event(model, version, state, detail, ts)
        self.events.append(ev)
        if not self.connected:
            if len(self.outbox) < OUTBOX_LIMIT:
                self.outbox.append(ev)
            return
        self._publish(self.fleet.topics.events(self.id), ev.to_payload())
        self.publish_status()

    # --- releases in ----------------------------------------------------------------------------

    def known_models(self) -> list[str]:
        return sorted(set(self.models) | set(self.kept) | set(self.fleet_releases) | set(self.device_releases))

    def on_message(self, topic: str, payload: bytes) -> None:
        ref = self.fleet.topics.parse(topic)
        if ref is None or ref.model is None:
            return
        if ref.kind == "device_release" and ref.device == self.id:
            if payload:
                self.device_releases[ref.model] = payload
            else:
                self.device_releases.pop(ref.model, None)
        elif ref.kind == "release":
            self.fleet_releases[ref.model] = payload
        else:
            return
        self.submit(ref.model)

    def submit(self, model: str) -> None:
        """Queue the effective release of ``model`` (the device's own overrides the fleet's)."""
        if self.id in self.fleet.silent_devices:
            return
        payload = self.device_releases.get(model) or self.fleet_releases.get(model)
        if payload is None:
            return
        job = self.job
        mine = job is not None and job.manifest.model == model
        if payload and mine and job.manifest.digest == self.fleet.digest(payload):
            self.pending.pop(model, None)
            return
        self.pending[model] = payload
        if mine and job.cancellable:
            self.job = None
            if job.state:  # once it is reported, the agent journals and reports a superseded download as over
                self.report(model, job.manifest.version, "failed",
                            "superseded by another release before it was installed", 0.0, job.manifest.digest)
        self.work()

    def work(self) -> None:
        """Process pending releases one at a time, once the retained ones had time to arrive."""
        while self.job is None and self.pending and time.monotonic() >= self.settle_until:
            model = next(iter(self.pending))
            self.process(model, self.pending.pop(model))

    def process(self, model: str, payload: bytes) -> None:
        """What ``Updater.process`` decides for one effective release payload."""
        if not payload:
            self.retire(model)
            return
        try:
            m = self.fleet.parse(payload, model)
        except ManifestError as exc:
            digest = hashlib.sha256(payload).hexdigest()
            if digest not in self.done:
                self.report(model, _guess_version(payload), "rejected", str(exc), digest=digest)
            return
        active = self.active.get(model)
        kept = self.kept.get(model, {}).get(m.version)
        if active is not None and m.version < active and kept is not None \
                and kept.files & {f.sha256 for v in m.variants for f in v.files}:
            self.start(_Job(m, kept.info.variant, kept.info.backend, [
                ("staged", f"the hub rolls back to v{m.version}, kept in models/{model}/{m.version}", None)]))
            return
        if m.digest in self.done:
            return
        if active is not None and m.version <= active:
            if m.version == active and kept is not None and kept.digest == m.digest:
                self.done.add(m.digest)
            else:
                self.report(model, m.version, "rejected",
                            f"downgrade: v{m.version} is not newer than the active v{active}", digest=m.digest)
            return
        variant, backend = self._choose(m)
        self.start(_Job(m, variant.id, backend, chosen=variant, steps=[
            ("queued", f"release v{m.version} signed by {m.key_id!r}", None),
            ("downloading", f"variant {variant.id} on {backend}, {variant.size} bytes", 0.0),
            ("verifying", f"checking size and sha256 of {len(variant.files)} file(s)", 1.0),
            ("staged", f"stored in models/{model}/{m.version}", 1.0)]))

    def _choose(self, m: Manifest) -> tuple[Variant, str]:
        """The first variant a backend of this profile runs (else the first one)."""
        have = PROFILE_BACKENDS.get(self.profile, ("onnxruntime",))
        for v in m.variants:
            if FORMAT_BACKEND.get(v.format, v.format) in have:
                return v, FORMAT_BACKEND.get(v.format, v.format)
        return m.variants[0], FORMAT_BACKEND.get(m.variants[0].format, m.variants[0].format)

    def retire(self, model: str) -> None:
        if model not in self.models and model not in self.kept:
            return
        version = self.models[model].version if model in self.models else 0
        self.models.pop(model, None)
        self.kept.pop(model, None)
        self.previous.pop(model, None)
        self.active = {n: i.version for n, i in self.models.items()}
        self.report(model, version, "retired", "the hub retired the model")

    # --- the update -----------------------------------------------------------------------------

    def start(self, job: _Job) -> None:
        job.steps.append(("warming", f"loading {job.variant} on {job.backend} and running the warm-up samples", 1.0))
        self.job = job
        self._next(job)

    def _next(self, job: _Job) -> None:
        self.fleet.later(self.fleet.rng.uniform(*self.fleet.step_delay), lambda: self._step(job))

    def _step(self, job: _Job) -> None:
        if self.job is not job:
            return  # superseded
        m = job.manifest
        if job.steps:
            job.state, detail, progress = job.steps.pop(0)
            self.report(m.model, m.version, job.state, detail, progress, m.digest)
            self._next(job)
            return
        self.job = None
        if job.chosen is not None and self.fleet.fails(self.id, m.model, m.version):
            old = self.active.get(m.model)
            self.report(m.model, m.version, "failed", f"simulated failure: v{m.version} did not load or warm up; "
                                                      f"v{old if old else '-'} keeps serving", 1.0, m.digest)
        else:
            self._swap(job)
        self.work()

    def _swap(self, job: _Job) -> None:
        """Serve the new version; the one it replaces is kept for roll-back, older ones are pruned."""
        m, model = job.manifest, job.manifest.model
        versions = self.kept.setdefault(model, {})
        v = job.chosen
        if v is None:
            info = versions[m.version].info
        else:
            info = ModelInfo(model, m.version, v.id, job.backend, v.main_file.sha256, v.memory_bytes or v.size)
            versions[m.version] = _Kept(info, frozenset(f.sha256 for x in m.variants for f in x.files), m.digest)
        old = self.models.get(model)
        previous = old.version if old is not None and old.version != m.version else self.previous.get(model)
        self.models[model] = info
        self.previous[model] = previous
        for stale in set(versions) - {m.version, previous}:
            del versions[stale]
        self.active = {n: i.version for n, i in self.models.items()}
        if self.fleet.tuning_enabled and v is not None:
            info = self.tune(m)
        self.report(model, m.version, "active", f"serving v{m.version} ({info.variant} on {info.backend})"
                    + (f"; v{previous} kept for rollback" if previous else ""), None, m.digest)


    # --- tuning ---------------------------------------------------------------------------------

    @property
    def cpu_model(self) -> str:
        return _pick(PROFILE_CPUS.get(self.profile, ("Intel(R) Core(TM) i5-8259U CPU @ 2.30GHz",)),
                     self.fleet.seed, self.id, "cpu")

    def tune(self, m: Manifest, slower: float = 1.0) -> ModelInfo:
        """Measure every candidate of ``m`` as this device would (``slower`` scales every latency), serve the
        fastest kept one; its ModelInfo."""
        self.tuned_from[(m.model, m.version)] = m
        cpu = self.cpu_model
        cpu_class, speed = CPU_FIGURES.get(cpu, ("x86", 1.0))
        seed, me = self.fleet.seed, self.id
        device_factor = 1 + 0.16 * (_unit(seed, me, "device") - 0.5)  # this board: ±8%
        cands = []
        for backend in PROFILE_BACKENDS.get(self.profile, ("onnxruntime",)):
            for v in m.variants:
                if v.format not in BACKEND_FORMATS.get(backend, (v.format,)):
                    continue
                precision = INT8_FACTOR.get(cpu_class, 1.0) if v.precision == "int8" else \
                    PRECISION_FACTOR.get(v.precision, 1.0)
                for threads in SIM_THREADS:
                    parts = (seed, me, m.model, m.version, v.id, backend, threads, self.retunes)
                    noise = 1 + 0.1 * (_unit(*parts, "latency") - 0.5)  # this candidate on this board: ±5%
                    latency = (BASE_LATENCY_MS * speed * precision * BACKEND_FACTOR.get((backend, cpu_class), 1.0)
                               * (1.0 if threads == 1 else 0.65) * device_factor * noise * slower)
                    agreement = 1.0 if v.precision == "fp32" else round(0.995 + 0.005 * _unit(*parts, "agree"), 4)
                    kept, reason = True, ""
                    if v.precision == "int8" and cpu_class == "x86" and _unit(seed, me, v.id, backend, "wrong") < 0.2:
                        agreement = round(0.9 + 0.05 * _unit(*parts, "agree"), 4)  # its int8 kernels saturate
                        kept, reason = False, f"wrong on this device: top-1 agreement {agreement} with fp32 < 0.99"
                    cands.append(TunedCandidate(v.id, backend, {"threads": threads}, round(latency, 5),
                                                round(latency * 0.03, 5), (v.memory_bytes or v.size) + (2 << 20),
                                                agreement, kept, reason))
        kept = [c for c in cands if c.kept]
        chosen = min(kept, key=lambda c: c.latency_ms or 0.0) if kept else None
        first, backend = self._choose(m)
        default = next((c for c in cands if c.variant == first.id and c.backend == backend), None)
        self.tuned[(m.model, m.version)] = TuningInfo(m.model, m.version, chosen, default, tuple(cands), cpu,
                                                      cpu_class, self.profile, 0.5 * len(cands), True, time.time())
        info = self.models[m.model]
        if chosen is not None:
            v = next(x for x in m.variants if x.id == chosen.variant)
            info = ModelInfo(m.model, m.version, v.id, chosen.backend, v.main_file.sha256, v.memory_bytes or v.size)
            self.models[m.model] = info
        return info

    def retune(self, model: str, slower: float) -> None:
        """Tune the version of ``model`` it serves again, every latency ``slower`` times what it was; publish."""
        self.retunes += 1
        self.tune(self.tuned_from[(model, self.active[model])], slower)
        if self.connected:
            self.publish_status()


class SimFleet:
    """``n`` simulated devices on one broker, all driven by one thread; see the module docstring."""

    def __init__(self, broker_port: int, fleet: str, trusted_keys_dir: Path | str | None, n: int = 1000, *,
                 host: str = "127.0.0.1", prefix: str = "sim", fail_rate: float = 0.0, seed: int = 0,
                 profiles: Sequence[str] = PROFILES, tags: Mapping[str, Sequence[str]] = TAGS,
                 step_delay: tuple[float, float] = (0.05, 0.3), protocol: str = "5", keepalive: int = 30,
                 session_expiry: int = SESSION_EXPIRY, fail_devices: Iterable[str] = (),
                 silent_devices: Iterable[str] = (), fail_from: int = 0, fail_mode: str = "random",
                 tune: bool = False):
        if protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol {protocol!r}: expected one of {sorted(PROTOCOLS)}")
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode {fail_mode!r}: expected one of {', '.join(FAIL_MODES)}")
        self.host, self.port, self.fleet = host, broker_port, fleet
        self.topics = Topics(fleet)
        self.trusted = manifest_mod.load_trusted_keys(Path(trusted_keys_dir) if trusted_keys_dir else None)
        self.fail_rate, self.seed, self.fail_mode = fail_rate, seed, fail_mode
        self.fail_from = fail_from  # versions below this one never fail (a fleet's baseline)
        self.step_delay = step_delay
        self.tuning_enabled = tune  # devices tune each version they activate and report the figures (contract 1.4)
        self.keepalive, self.session_expiry = keepalive, session_expiry
        self.fail_devices: set[str] = set(fail_devices)
        self.silent_devices: set[str] = set(silent_devices)
        self._ended: Counter[tuple[str, int]] = Counter()  # (model, version) -> updates that ended (spread mode)
        self._failed: set[tuple[str, int]] = set()  # (device, version) whose update failed (spread mode)
        self.rng = random.Random(seed)
        self.messages_sent = 0
        self.ready_seconds: float | None = None
        self.closing = False
        self._protocol = PROTOCOLS[protocol]
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._dirty: set[SimDevice] = set()
        self._parsed: dict[tuple[str, bytes], Manifest | ManifestError] = {}
        self._digests: dict[bytes, str] = {}
        self._sel: selectors.BaseSelector  # these three are made by start(): an unstarted fleet holds no socket
        self._wake_r: socket.socket
        self._wake_w: socket.socket
        self._thread: threading.Thread | None = None
        self.devices: dict[str, SimDevice] = {}
        for i in range(n):
            name = f"{prefix}-{i:04d}"
            dev = SimDevice(self, name, i, _pick(profiles, seed, name, "profile"),
                            {k: _pick(v, seed, name, k) for k, v in tags.items()})
            dev.client = self._client(dev)
            self.devices[name] = dev

    def _client(self, dev: SimDevice) -> mqtt.Client:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgerun-{self.fleet}-{dev.id}", userdata=dev,
                        protocol=self._protocol, clean_session=None if v5 else False, reconnect_on_failure=False)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_socket_register_write
        return c

    # --- what tests ask -------------------------------------------------------------------------

    def will_fail(self, device: str, version: int) -> bool:
        """Whether ``device`` fails the update to ``version``: predicted in random mode (the same answer in every
        process), known once the update ended in spread mode."""
        if version < self.fail_from:
            return False
        if device in self.fail_devices:
            return True
        if self.fail_mode == "spread":
            return (device, version) in self._failed
        return _unit(self.seed, device, version) < self.fail_rate

    def fails(self, device: str, model: str, version: int) -> bool:
        """Decide, as ``device``'s update to ``version`` ends, whether it fails (loop thread)."""
        if self.fail_mode != "spread" or version < self.fail_from or device in self.fail_devices:
            return self.will_fail(device, version)
        rate = Fraction(self.fail_rate).limit_denominator(10_000)
        self._ended[(model, version)] += 1
        k = self._ended[(model, version)]
        if k * rate // 1 > (k - 1) * rate // 1:
            self._failed.add((device, version))
            return True
        return False

    def retune(self, device: str, model: str, slower: float = 1.0) -> TuningInfo:
        """Make ``device`` tune the version of ``model`` it serves again (every latency ``slower`` times what it
        was) and publish its status; what it measured."""
        def run() -> TuningInfo:
            dev = self.devices[device]
            dev.retune(model, slower)
            return dev.tuned[(model, dev.active[model])]
        return self._call(run)

    def tuning(self) -> dict[str, list[TuningInfo]]:
        """What each device reports in its status's ``tuning`` now."""
        return self._call(lambda: {d.id: list(d.status().tuning) for d in self.devices.values()})

    def set_offline(self, device: str) -> None:
        """Drop the device's socket without DISCONNECT; the broker publishes its last will."""
        self._call(self.devices[device].drop)

    def set_online(self, device: str) -> None:
        """Reconnect a device ``set_offline`` dropped, with a new, higher session number."""
        self._call(self.devices[device].revive)

    def counts(self) -> dict[str, Any]:
        """A summary: devices online, versions served per model, last update states, events, messages."""
        return self._call(self._counts)

    def _counts(self) -> dict[str, Any]:
        active: dict[str, Counter[int]] = {}
        states: Counter[str] = Counter()
        for d in self.devices.values():
            for model, version in d.active.items():
                active.setdefault(model, Counter())[version] += 1
            states.update(u.state for u in d.updates.values())
        devs = self.devices.values()
        return {"devices": len(self.devices), "online": sum(d.connected for d in devs),
                "ready": sum(d.ready for d in devs), "updating": sum(d.job is not None for d in devs),
                "active": {m: dict(c) for m, c in active.items()}, "states": dict(states),
                "events": sum(len(d.events) for d in devs), "messages_sent": self.messages_sent}

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 120.0) -> "SimFleet":
        """Connect every device, in batches; with ``wait``, return once each one's birth and status are acked."""
        if self._thread is not None:
            return self
        t0 = time.monotonic()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="edgerun-simfleet", daemon=True)
        self._thread.start()
        self._call(self._schedule_connects)
        if wait:
            self.wait_ready(timeout)
            self.ready_seconds = time.monotonic() - t0
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every device that should be online is connected with its birth and status acked."""
        deadline = time.monotonic() + timeout
        while True:
            want = [d for d in self.devices.values() if d.online_wanted]
            ready = sum(d.ready for d in want)
            if ready == len(want):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready} of {len(want)} simulated devices ready after {timeout:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Each device publishes its status and offline state, then disconnects; the loop thread ends."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._call(self._close)
        self._thread.join(FAREWELL_TIMEOUT + 10)

    def __enter__(self) -> "SimFleet":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop thread ------------------------------------------------------------------------

    def _schedule_connects(self) -> None:
        devs = list(self.devices.values())
        for k in range(0, len(devs), CONNECT_BATCH):
            self.later(k // CONNECT_BATCH * CONNECT_INTERVAL, partial(self._connect, devs[k:k + CONNECT_BATCH]))

    def _connect(self, devs: list[SimDevice]) -> None:
        for d in devs:
            d.connect()

    def _close(self) -> None:
        self.closing = True  # the loop ends its pass, then _shutdown says goodbye

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop thread after ``delay`` seconds (call from the loop thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` in the loop thread and return its result."""
        if self._thread is None or threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        fut: Future = Future()
        self._commands.put((fn, fut))
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (the loop is awake anyway) or already closed by the stop
            pass
        return fut.result(timeout)

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL
        while not self.closing:
            now = time.monotonic()
            wait = min(next_misc, self._timers[0][0] if self._timers else next_misc) - now
            self._iterate(max(0.0, wait))
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + MISC_INTERVAL
                for d in self.devices.values():
                    if d.client.socket() is not None:
                        self._guard(d.client.loop_misc)
                        self._dirty.add(d)
                self._flush()
        self._shutdown()

    def _iterate(self, timeout: float) -> None:
        """One pass: socket events, commands from other threads, due timers, then every pending write."""
        for key, events in self._sel.select(timeout):
            dev = key.data
            if dev is None:
                self._drain_wake()
                continue
            c = dev.client
            if events & selectors.EVENT_READ:
                self._guard(c.loop_read)
            if events & selectors.EVENT_WRITE and c.socket() is not None:
                self._guard(c.loop_write)
            self._dirty.add(dev)
        self._run_commands()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self.closing:
            self._guard(heapq.heappop(self._timers)[2])
        self._flush()

    def _flush(self) -> None:
        """Write what each touched client has queued; watch for writability only where a write is left over."""
        dirty, self._dirty = self._dirty, set()
        for dev in dirty:
            c = dev.client
            if c.socket() is not None and c.want_write():
                self._guard(c.loop_write)
            sock = c.socket()
            if sock is None:
                continue
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write() else 0)
            if mask != dev.mask:
                self._sel.modify(sock, mask, dev)
                dev.mask = mask

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:
            log.exception("simulated fleet: %s failed", getattr(fn, "__qualname__", fn))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _shutdown(self) -> None:
        """The clean stop in the loop thread: farewells acked (or a timeout), DISCONNECT, sockets closed."""
        self._timers.clear()
        live = [d for d in self.devices.values() if d.connected]
        for d in live:
            d.farewell()
            self._dirty.add(d)
        end = time.monotonic() + FAREWELL_TIMEOUT
        while any(d.waiting and d.connected for d in live) and time.monotonic() < end:
            self._iterate(0.05)
        for d in self.devices.values():
            if d.client.socket() is not None:
                d.online_wanted = False
                d.client.disconnect()
                self._dirty.add(d)
        end = time.monotonic() + 2.0
        while any(d.client.socket() is not None for d in self.devices.values()) and time.monotonic() < end:
            self._iterate(0.05)
        for d in self.devices.values():
            sock = d.client.socket()
            if sock is not None:
                self._on_socket_close(d.client, d, sock)
                sock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._run_commands()  # what other threads asked while the loop was ending

    # --- paho callbacks (all in the loop thread) ---------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, dev)
        dev.mask = selectors.EVENT_READ

    def _on_socket_close(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        dev.mask = 0

    def _on_socket_register_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        self._dirty.add(dev)

    def _on_connect(self, client: mqtt.Client, dev: SimDevice, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:  # the broker closes the socket: on_disconnect retries
            log.warning("%s: the broker refused the connection: %s", dev.id, reason_code)
            return
        self._guard(dev.on_connect)

    def _on_disconnect(self, client: mqtt.Client, dev: SimDevice, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._guard(dev.on_disconnect)

    def _on_message(self, client: mqtt.Client, dev: SimDevice, msg: mqtt.MQTTMessage) -> None:
        self._guard(lambda: dev.on_message(msg.topic, msg.payload))

    def _on_publish(self, client: mqtt.Client, dev: SimDevice, mid: int, reason_code: Any, properties: Any) -> None:
        dev.on_puback(mid)

    # --- shared by every device ---------------------------------------------------------------------

    def parse(self, payload: bytes, model: str) -> Manifest:
        """``edgerun.manifest.parse`` against the trusted keys, once per payload for the whole fleet."""
        key = (model, payload)
        got = self._parsed.get(key)
        if got is None:
            try:
                got = manifest_mod.parse(payload, self.trusted, topic_model=model)
            except ManifestError as exc:
                got = exc
            if len(self._parsed) >= PARSE_CACHE:
                self._parsed.clear()
            self._parsed[key] = got
        if isinstance(got, ManifestError):
            raise got
        return got

    def digest(self, payload: bytes) -> str:
        """The digest the payload's manifest has (what tells the release in progress from a newer one)."""
        got = self._digests.get(payload)
        if got is None:
            if len(self._digests) >= PARSE_CACHE:
                self._digests.clear()
            got = self._digests[payload] = manifest_mod.payload_digest(payload)
        return got


# --- command line -------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run a simulated fleet until SIGTERM or SIGINT; print one JSON line once every device is online."""
    p = argparse.ArgumentParser(prog="python -m edgerun.testing.fleet", description=main.__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--trusted-keys", type=Path, required=True)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--fail-mode", choices=FAIL_MODES, default="random",
                   help="random: each update fails with the rate's chance; spread: exactly that share of the updates "
                        "to each version fail, evenly in the order they end")
    p.add_argument("--fail-from", type=int, default=0, help="only versions from this one on fail")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action="store_true", help="devices tune each version they activate and report the "
                                                      "figures in their status (contract 1.4)")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--step-delay", type=float, nargs=2, default=(0.05, 0.3), metavar=("MIN", "MAX"))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every device to connect")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EDGERUN_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fleet = SimFleet(args.port, args.fleet, args.trusted_keys, args.devices, host=args.host, prefix=args.prefix,
                     fail_rate=args.fail_rate, seed=args.seed, step_delay=tuple(args.step_delay),
                     fail_from=args.fail_from, fail_mode=args.fail_mode, tune=args.tune)
    t0 = time.monotonic()
    try:
        fleet.start(timeout=args.timeout)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        fleet.stop()
        return 1
    print(json.dumps({"ready": True, "devices": args.devices, "seconds": round(time.monotonic() - t0, 3)}),
          flush=True)
    while not stop.wait(1.0):
        pass
    fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
