"""The JSON rows the dashboard sends: one device, one event, one rollout's progress."""

from __future__ import annotations

import json
import time
from typing import Any

from edgerun.contract import FAILED, IN_PROGRESS, Event, State, Status, TuningInfo, UpdateInfo
from edgerun.hub.registry import DeviceRecord, RolloutDevice, RolloutRecord
from edgerun.hub.rollout import Progress, runner_alive


def status_of(record: DeviceRecord | None) -> Status | None:
    """The status the registry kept for a device, read as the watcher reads one off the broker."""
    if record is None or not record.status:
        return None
    return Status.from_payload(json.dumps(record.status).encode(), record.device)


def _update(u: UpdateInfo | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {"model": u.model, "version": u.version, "state": u.state, "progress": u.progress,
            "detail": u.detail, "error": u.error, "ts": u.ts}


def _tuned(t: TuningInfo | None) -> dict[str, Any] | None:
    """What a device picked when it tuned the version it serves, and what the hub's figures would have."""
    if t is None or t.chosen is None:
        return None
    c = t.chosen
    return {"variant": c.variant, "backend": c.backend,
            "options": " ".join(f"{k}={v}" for k, v in sorted(c.options.items())), "latency_ms": c.latency_ms,
            "default_latency_ms": t.default.latency_ms if t.default else None, "cpu_model": t.cpu_model,
            "complete": t.complete}


def _health(status: Status | None) -> tuple[str, str | None]:
    """``updating``, ``failed`` (the last update of some model failed) or ``ok``, and the newest error."""
    if status is None:
        return "ok", None
    latest = dict(status.updates)
    if status.update is not None:
        latest.setdefault(status.update.model, status.update)
    if any(u.state in IN_PROGRESS for u in latest.values()):
        health = "updating"
    elif any(u.state in FAILED for u in latest.values()):
        health = "failed"
    else:
        health = "ok"
    failed = [u for u in latest.values() if u.state in FAILED]
    newest = max(failed, key=lambda u: u.ts, default=None)
    error = (newest.error or newest.detail or newest.state) if newest is not None else None
    return health, error


def device_row(name: str, state: State | None, status: Status | None, record: DeviceRecord | None,
               seen: float | None, rev: int) -> dict[str, Any]:
    """One device's row: what the watcher holds, else what the registry last recorded."""
    if status is None:
        status = status_of(record)
    online = state.online if state is not None else (record.online if record is not None else None)
    session = state.session if state is not None else (record.session if record is not None else None)
    health, error = _health(status)
    memory = status.memory if status is not None else {}
    tuned = {(t.model, t.version): t for t in status.tuning} if status is not None else {}
    return {
        "id": name, "rev": rev, "online": online, "session": session,
        "profile": status.profile if status else (record.profile if record else ""),
        "tags": dict(status.tags) if status else dict(record.tags if record else {}),
        "models": [{"name": m.name, "version": m.version, "variant": m.variant, "backend": m.backend,
                    "memory": m.memory_bytes, "tuned": _tuned(tuned.get((m.name, m.version)))}
                   for m in (status.models if status else ())],
        "update": _update(status.update if status else None),
        "health": health, "error": error,
        "rss": memory.get("rss_bytes"), "available": memory.get("available_bytes"),
        "seen": seen if seen is not None else (record.last_seen if record else None),
    }


def event_row(seq: int, device: str, e: Event, received: float) -> dict[str, Any]:
    return {"seq": seq, "device": device, "model": e.model, "version": e.version, "state": e.state,
            "detail": e.detail, "failed": e.state in FAILED, "ts": e.ts, "received": received}


def rollout_row(r: RolloutRecord, devices: list[RolloutDevice], now: float | None = None) -> dict[str, Any]:
    """A rollout's progress: counts per device state, overall and per stage."""
    p = Progress(r, devices)
    return {
        "id": r.id, "model": r.model, "version": r.version, "state": r.state, "in_progress": r.in_progress,
        "stage": r.stage, "stages": p.stages, "request": r.request, "reason": r.reason, "plan": r.plan,
        "selector": r.selector, "fleet_wide": r.fleet_wide, "created_by": r.created_by,
        "created_at": r.created_at, "finished_at": r.finished_at, "runner": r.runner,
        "runner_alive": runner_alive(r, now or time.time()), "devices": len(devices), "counts": p.counts(),
        "stage_counts": [p.counts(i) for i in range(p.stages)],
    }
