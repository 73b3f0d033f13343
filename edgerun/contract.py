"""The MQTT wire contract between devices and hubs: topic names, payload shapes and update states.

Every topic a device or a hub uses is built and parsed here, and every payload is written and read by
the dataclasses below, so the two sides cannot drift apart. The contract is documented, with its
version history, in docs/contract.md; the signed release manifest lives in ``edgerun.manifest``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from edgerun.units import decimal

TOPIC_ROOT = "edgerun/v1"
CONTRACT_VERSION = "1.4"  # what a device's status says it speaks; additive changes raise the minor

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # fleet, device and model names: one safe topic level
SHA256 = re.compile(r"^[0-9a-f]{64}$")

IN_PROGRESS = ("queued", "downloading", "verifying", "staged", "warming")
FINAL = ("active", "failed", "rejected", "rolled_back", "retired")
FAILED = ("failed", "rejected", "rolled_back")  # a final state in which the release is not served
STATES = IN_PROGRESS + FINAL


def contract_key(version: object) -> tuple[int, int]:
    """``"1.2"`` as ``(1, 2)``, to compare versions; a status that names none (or garbage) speaks 1.0."""
    major, _, minor = (decimal(part, 6) for part in str(version).partition("."))
    return (major, minor) if major is not None and minor is not None else (1, 0)


def valid_name(value: object) -> bool:
    """True when ``value`` can be one topic level: a fleet, device or model name."""
    return isinstance(value, str) and bool(NAME.match(value))


# --- topics ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TopicRef:
    """What one contract topic names: its kind and the device, model, blob and chunk it is about."""

    kind: str  # release | device_release | blob | state | status | events
    device: str | None = None
    model: str | None = None
    sha256: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class Topics:
    """The topics of one fleet, ``edgerun/v1/{fleet}/...``."""

    fleet: str

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def release(self, model: str, device: str | None = None) -> str:
        """The retained release of ``model``: the fleet's, or one device's override."""
        if device:
            return f"{self.prefix}/devices/{device}/releases/{model}"
        return f"{self.prefix}/releases/{model}"

    def blob(self, sha256: str, index: int) -> str:
        return f"{self.prefix}/blobs/{sha256}/{index}"

    def blobs(self, sha256: str = "+") -> str:
        """The filter of every chunk of one blob (or, with ``+``, of chunk topics under one blob level)."""
        return f"{self.prefix}/blobs/{sha256}/+"

    def state(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/state"

    def status(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/status"

    def events(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/events"

    def device_topics(self, device: str) -> list[str]:
        """The exact topics one device writes (for brokers that keep retained messages from wildcards)."""
        return [self.state(device), self.status(device), self.events(device)]

    def releases_filter(self, device: str | None = None) -> str:
        """Every release of the fleet, or every override of one device (``+`` for all devices)."""
        return f"{self.prefix}/devices/{device}/releases/+" if device else f"{self.prefix}/releases/+"

    def device_filters(self) -> list[str]:
        """What a hub subscribes to in order to follow every device of the fleet."""
        base = f"{self.prefix}/devices/+"
        return [f"{base}/state", f"{base}/status", f"{base}/events"]

    def parse(self, topic: str) -> TopicRef | None:
        """The meaning of ``topic`` in this fleet, or None when it is not a contract topic of it."""
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1:].split("/")
        if len(parts) == 2 and parts[0] == "releases" and valid_name(parts[1]):
            return TopicRef("release", model=parts[1])
        if len(parts) == 3 and parts[0] == "blobs" and (index := decimal(parts[2])) is not None:
            return TopicRef("blob", sha256=parts[1], index=index)
        if len(parts) >= 3 and parts[0] == "devices" and valid_name(parts[1]):
            device = parts[1]
            if len(parts) == 3 and parts[2] in ("state", "status", "events"):
                return TopicRef(parts[2], device=device)
            if len(parts) == 4 and parts[2] == "releases" and valid_name(parts[3]):
                return TopicRef("device_release", device=device, model=parts[3])
        return None


# --- payloads -------------------------------------------------------------------------------------

def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


@dataclass(frozen=True)
class State:
    """``devices/{device}/state``: online or not, and the connection it belongs to (birth and last will)."""

    online: bool
    session: int
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return _dump({"online": self.online, "session": self.session, "ts": self.ts})

    @classmethod
    def from_payload(cls, payload: bytes) -> "State | None":
        d = _json_object(payload)
        if d is None or not isinstance(d.get("online"), bool):
            return None
        return cls(d["online"], _int(d.get("session")) or 0, _num(d.get("ts")) or 0.0)


@dataclass(frozen=True)
class Event:
    """``devices/{device}/events``: one update state transition."""

    model: str
    version: int
    state: str
    detail: str = ""
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return _dump({"model": self.model, "version": self.version, "state": self.state, "detail": self.detail,
                      "ts": self.ts})

    @classmethod
    def from_payload(cls, payload: bytes) -> "Event | None":
        d = _json_object(payload)
        if d is None or not isinstance(d.get("model"), str) or _int(d.get("version")) is None \
                or d.get("state") not in STATES:
            return None
        return cls(d["model"], d["version"], d["state"], _str(d.get("detail")), _num(d.get("ts")) or 0.0)

    @property
    def failed(self) -> bool:
        return self.state in FAILED


@dataclass(frozen=True)
class ModelInfo:
    """One model a device serves, as its status lists it."""

    name: str
    version: int
    variant: str = ""
    backend: str = ""
    sha256: str = ""
    memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "variant": self.variant, "backend": self.backend,
                "sha256": self.sha256, "memory_bytes": self.memory_bytes}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelInfo | None":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or _int(d.get("version")) is None:
            return None
        return cls(d["name"], d["version"], _str(d.get("variant")), _str(d.get("backend")), _str(d.get("sha256")),
                   _int(d.get("memory_bytes")))


@dataclass(frozen=True)
class UpdateInfo:
    """The last (or current) update of one model on a device."""

    model: str
    version: int
    state: str
    progress: float | None = None
    detail: str = ""
    error: str | None = None
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "state": self.state, "progress": self.progress,
                "detail": self.detail, "error": self.error, "ts": self.ts}

    @classmethod
    def transition(cls, model: str, version: int, state: str, detail: str = "", progress: float | None = None,
                   ts: float | None = None) -> "UpdateInfo":
        """The update as a device reports it after a transition: ``error`` is the detail of a failure."""
        return cls(model, version, state, progress, detail, detail if state in FAILED else None,
                   time.time() if ts is None else ts)

    @classmethod
    def from_dict(cls, d: Any) -> "UpdateInfo | None":
        if not isinstance(d, dict) or not isinstance(d.get("model"), str) or _int(d.get("version")) is None \
                or d.get("state") not in STATES:
            return None
        error = d.get("error")
        return cls(d["model"], d["version"], d["state"], _num(d.get("progress")), _str(d.get("detail")),
                   error if isinstance(error, str) else None, _num(d.get("ts")) or 0.0)


@dataclass(frozen=True)
class BackendInfo:
    """One backend plugin of a device: usable or not, and why."""

    name: str
    available: bool
    version: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "version": self.version, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Any) -> "BackendInfo | None":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            return None
        version, reason = d.get("version"), d.get("reason")
        return cls(d["name"], bool(d.get("available")), version if isinstance(version, str) else None,
                   reason if isinstance(reason, str) else None)


@dataclass(frozen=True)
class TunedCandidate:
    """One candidate (variant, backend and its options) as a device measured it while tuning (1.4)."""

    variant: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)  # what was set: threads, hints, optimization level...
    latency_ms: float | None = None  # the median of warm runs on this device ...
    latency_err_ms: float | None = None  # ... and its error
    peak_rss_bytes: int | None = None  # the process's resident memory grew this much while it was loaded and run
    agreement: float | None = None  # top-1 agreement with fp32 on the package's validation sample; None: no sample
    kept: bool = True
    reason: str = ""  # why it was dropped (wrong here, crashed, timed out, over the memory budget)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "backend": self.backend, "options": dict(self.options),
                "latency_ms": self.latency_ms, "latency_err_ms": self.latency_err_ms,
                "peak_rss_bytes": self.peak_rss_bytes, "agreement": self.agreement, "kept": self.kept,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Any) -> "TunedCandidate | None":
        if not isinstance(d, dict) or not isinstance(d.get("variant"), str) or not isinstance(d.get("backend"), str):
            return None
        options = d.get("options") if isinstance(d.get("options"), dict) else {}
        return cls(d["variant"], d["backend"], {str(k): v for k, v in options.items()
                                                 if isinstance(v, (str, int, float, bool))},
                   _num(d.get("latency_ms")), _num(d.get("latency_err_ms")), _int(d.get("peak_rss_bytes")),
                   _num(d.get("agreement")), d.get("kept") is not False, _str(d.get("reason")))


@dataclass(frozen=True)
class TuningInfo:
    """What a device measured when it tuned one model version, and what it picked (1.4)."""

    model: str
    version: int
    chosen: TunedCandidate | None = None  # what serves after tuning
    default: TunedCandidate | None = None  # what the variant choice picked from the hub's figures
    candidates: tuple[TunedCandidate, ...] = ()
    cpu_model: str = ""
    cpu_class: str = ""  # x86-vnni, x86, arm64
    profile: str = ""
    seconds: float = 0.0  # how long tuning took
    complete: bool = True  # False when the time budget ran out before every candidate was measured
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version,
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "default": self.default.to_dict() if self.default else None,
                "candidates": [c.to_dict() for c in self.candidates], "cpu_model": self.cpu_model,
                "cpu_class": self.cpu_class, "profile": self.profile, "seconds": self.seconds,
                "complete": self.complete, "ts": self.ts}

    @classmethod
    def from_dict(cls, d: Any) -> "TuningInfo | None":
        if not isinstance(d, dict) or not isinstance(d.get("model"), str) or _int(d.get("version")) is None:
            return None
        return cls(d["model"], d["version"], TunedCandidate.from_dict(d.get("chosen")),
                   TunedCandidate.from_dict(d.get("default")),
                   tuple(c for c in map(TunedCandidate.from_dict, _list(d.get("candidates"))) if c),
                   _str(d.get("cpu_model")), _str(d.get("cpu_class")), _str(d.get("profile")),
                   _num(d.get("seconds")) or 0.0, d.get("complete") is not False, _num(d.get("ts")) or 0.0)


@dataclass(frozen=True)
class Status:
    """``devices/{device}/status`` (retained): what a device is, serves and is doing."""

    device: str
    fleet: str
    session: int = 0
    profile: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    backends: tuple[BackendInfo, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    update: UpdateInfo | None = None
    updates: dict[str, UpdateInfo] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # rss_bytes, available_bytes, budget_bytes
    recipient: str | None = None  # the device's age key (age1...): what a hub encrypts releases to (1.3)
    tuning: tuple[TuningInfo, ...] = ()  # what the device measured of the models it serves (1.4)
    contract: str = CONTRACT_VERSION
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "fleet": self.fleet, "contract": self.contract, "ts": self.ts,
                "session": self.session, "profile": self.profile, "tags": dict(self.tags),
                "backends": [b.to_dict() for b in self.backends],
                "models": [m.to_dict() for m in self.models],
                "update": self.update.to_dict() if self.update else None,
                "updates": {k: u.to_dict() for k, u in self.updates.items()},
                "memory": dict(self.memory), "recipient": self.recipient,
                "tuning": [t.to_dict() for t in self.tuning]}

    def to_payload(self) -> bytes:
        return _dump(self.to_dict())

    @classmethod
    def from_payload(cls, payload: bytes, device: str | None = None) -> "Status | None":
        """Read a status leniently: a member of the wrong type is left out, not a reason to drop the rest."""
        d = _json_object(payload)
        if d is None:
            return None
        tags = d.get("tags") if isinstance(d.get("tags"), dict) else {}
        updates = d.get("updates") if isinstance(d.get("updates"), dict) else {}
        memory = d.get("memory") if isinstance(d.get("memory"), dict) else {}
        return cls(
            device=_str(d.get("device"), device or ""), fleet=_str(d.get("fleet")),
            session=_int(d.get("session")) or 0, profile=_str(d.get("profile")),
            tags={str(k): str(v) for k, v in tags.items() if isinstance(v, (str, int, float, bool))},
            backends=tuple(b for b in map(BackendInfo.from_dict, _list(d.get("backends"))) if b),
            models=tuple(m for m in map(ModelInfo.from_dict, _list(d.get("models"))) if m),
            update=UpdateInfo.from_dict(d.get("update")),
            updates={k: u for k, v in updates.items() if (u := UpdateInfo.from_dict(v))},
            memory={k: v for k, v in memory.items() if _int(v) is not None},
            recipient=d["recipient"] if isinstance(d.get("recipient"), str) else None,
            tuning=tuple(t for t in map(TuningInfo.from_dict, _list(d.get("tuning"))) if t),
            contract=_str(d.get("contract"), "1.0"), ts=_num(d.get("ts")) or 0.0)

    def model(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)


def current_update(updates: dict[str, UpdateInfo], last: str | None) -> UpdateInfo | None:
    """What a status's ``update`` shows: an update in progress if there is one, else the last one."""
    latest = updates.get(last) if last else None
    if latest is None:
        return None
    return next((u for u in updates.values() if u.state in IN_PROGRESS), latest)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
