"""Staged rollouts: per-device releases stage by stage, health gates, automatic abort and roll-back.

A rollout publishes the release on the per-device release topics of its devices (the contract's canary
path), a canary first and then steps of the selection, waits for each device's ``active`` event, bakes, and
promotes. When failures, rejections and time-outs among the devices that finished pass the plan's threshold
(the abort criteria, judged once enough devices finished and at the end of every stage) it aborts: every device it
touched gets back the per-device release it had before, which makes the device fall back to the release
it served and switch back to that kept version (the contract's explicit roll-back). A rollout of the whole
fleet ends by moving the fleet's retained release and clearing the per-device ones. Its state lives in the
registry, so another hub process can pick it up after a crash (``resume``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from edgerun import manifest as manifest_mod
from edgerun.contract import FAILED, Event, Topics, contract_key
from edgerun.errors import EdgerunError
from edgerun.hub.publish import encode
from edgerun.hub.registry import (DeviceRecord, Registry, RegistryError, RolloutDevice, RolloutRecord,
                                  RolloutTakenOver)
from edgerun.hub.select import check_selector, matches
from edgerun.hub.watch import FleetWatch
from edgerun.units import parse_duration

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between looks at the fleet
DB_RETRY = 1.0  # seconds between two tries while the registry cannot be used
STALE_RUNNER = 15.0  # a runner whose heartbeat is older than this is gone: another hub may take over
CLOCK_SLACK = 120.0  # a device's status time may lag or lead the hub's by this much
DONE = ("active", "failed", "timed_out")  # a device whose update is over, one way or the other
FAILURES = ("failed", "timed_out")
SETTLED = ("reverted", "kept", "revert_timed_out")  # a device the abort has dealt with


class RolloutError(EdgerunError):
    """A rollout cannot start or go on: unknown release, no device selected, one already in progress."""

    exit_code = 65


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- the plan ---------------------------------------------------------------------------------------

def _amount(value: str | float | int, total: int, what: str) -> float:
    """``"25%"`` of ``total``, or an absolute count."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return total * pct / 100
        n = float(text)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise RolloutError(f"{what}: expected a count or a percentage such as 25%, got {value!r}") from None


@dataclass(frozen=True)
class Plan:
    """How a rollout proceeds: canary size, step, bake time, abort criteria, per-device time-out."""

    canary: int = 1
    step: str = "25%"
    bake: float = 60.0
    max_failures: str = "10%"
    timeout: float = 600.0
    min_finished: int = 10  # a share in max_failures is judged from this many finished devices (and at a stage's end)

    @classmethod
    def parse(cls, *, canary: int = 1, step: str = "25%", bake: str | float = "60s", max_failures: str = "10%",
              timeout: str | float = "10m", min_finished: int = 10) -> "Plan":
        try:
            plan = cls(canary, str(step), parse_duration(bake), str(max_failures), parse_duration(timeout),
                       min_finished)
        except ValueError as exc:
            raise RolloutError(str(exc)) from None
        if canary < 0:
            raise RolloutError(f"--canary: expected 0 or more devices, got {canary}")
        if min_finished < 1:
            raise RolloutError(f"--min-finished: expected 1 or more devices, got {min_finished}")
        if _amount(plan.step, 100, "--step") <= 0:
            raise RolloutError(f"--step: expected more than 0, got {plan.step!r}")
        _amount(plan.max_failures, 100, "--max-failures")
        if plan.timeout <= 0:
            raise RolloutError("--timeout: expected a positive duration")
        return plan

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def stages(self, n: int) -> list[int]:
        """The number of devices in each stage: the canary, then steps until all ``n``."""
        sizes = []
        left = n
        if self.canary and left:
            sizes.append(min(self.canary, left))
            left -= sizes[-1]
        step = max(1, math.ceil(_amount(self.step, n, "--step")))
        while left > 0:
            sizes.append(min(step, left))
            left -= sizes[-1]
        return sizes

    @property
    def share(self) -> bool:
        """Whether ``max_failures`` is a share of the finished devices (else an absolute count)."""
        return self.max_failures.strip().endswith("%")

    def gate(self, failures: int, finished: int, stage_over: bool) -> str | None:
        """Why the rollout aborts now, or None: the abort criteria over the devices whose update is over.

        A count is judged at once; a share once ``min_finished`` devices finished, and always when a stage's
        devices have all finished (before it can be promoted).
        """
        if not failures or (self.share and finished < self.min_finished and not stage_over):
            return None
        if failures <= _amount(self.max_failures, finished, "--max-failures"):
            return None
        return (f"{failures} of {finished} finished device(s) failed, timed out or were rejected: more than "
                f"{self.max_failures}")

    def describe(self) -> str:
        judged = f" of those finished (from {self.min_finished} on, and at each stage's end)" if self.share else ""
        return (f"canary {self.canary}, steps of {self.step}, bake {self.bake:g}s, abort above "
                f"{self.max_failures} failures{judged}, {self.timeout:g}s per device")


# --- ordering devices --------------------------------------------------------------------------------

def order(devices: list[DeviceRecord], seed: str) -> list[DeviceRecord]:
    """Online devices first (a canary must answer), then a stable spread over the fleet."""
    def key(d: DeviceRecord) -> tuple[bool, str]:
        return (not d.online, hashlib.sha256(f"{seed}/{d.device}".encode()).hexdigest())

    return sorted(devices, key=key)


# --- starting ---------------------------------------------------------------------------------------

@dataclass
class Start:
    """What ``start_rollout`` decided, for the command line to print."""

    rollout: RolloutRecord
    skipped: list[tuple[str, str]]  # (device, why it is not part of the rollout)


def start_rollout(registry: Registry, watch: FleetWatch, key: Any, key_id: str, model: str, version: int, *,
                  selector: list[str], plan: Plan, runner: str) -> Start:
    """Check, select, sign the release afresh and record the rollout; ``RolloutRunner`` then runs it."""
    fleet = watch.topics.fleet
    check_selector(selector)
    release = registry.release(fleet, model, version)
    if release is None:
        known = registry.releases(fleet)
        versions = sorted({r.version for r in known if r.model == model})
        if not versions:
            models = sorted({r.model for r in known})
            raise RolloutError(f"no model {model!r} in the registry of fleet {fleet!r} (models released: "
                               f"{', '.join(models) or 'none'}); upload it first: edgerun hub upload PACKAGE")
        raise RolloutError(f"no release of {model} v{version} in the registry of fleet {fleet!r} (its versions: "
                           f"{', '.join(f'v{v}' for v in versions)}); upload it first: edgerun hub upload PACKAGE")
    busy = registry.active_rollout(fleet, model)
    if busy is not None:
        raise RolloutError(f"rollout {busy.id} of {model} v{busy.version} is already {busy.state}; "
                           f"abort it (edgerun hub rollout abort {busy.id}) or let it finish first")
    watch.flush()
    everyone = registry.devices(fleet)
    chosen = [d for d in everyone if matches(d, selector)]
    if not chosen:
        what = " and ".join(selector) if selector else "the whole fleet"
        raise RolloutError(f"no device of fleet {fleet!r} matches {what} ({len(everyone)} device(s) known; "
                           f"`edgerun hub status` lists them)")
    needed = manifest_mod.contract_needed(release.signed())
    skipped, targets = [], []
    for d in chosen:
        have = d.version_of(model)
        speaks = d.status.get("contract", "1.0") if d.status is not None else None  # None: never reported
        if have is not None and have > version:
            skipped.append((d.device, f"serves v{have}, newer than v{version}"))
        elif speaks is not None and contract_key(speaks) < contract_key(needed):
            skipped.append((d.device, f"speaks contract {speaks}; this release needs {needed} and it would refuse "
                                      f"it: update edgerun on it first"))
        else:
            targets.append(d)
    if not targets:
        raise RolloutError(f"no selected device can take {model} v{version}: "
                           + ", ".join(f"{d} ({why})" for d, why in skipped[:5]))
    unsigned = {k: v for k, v in release.signed().items() if k != "signature"}
    unsigned["created"] = manifest_mod.utc_now()  # a new digest: devices that failed an earlier try take it
    signed = manifest_mod.sign(unsigned, key, key_id)
    record = registry.record_release(fleet, signed, source="rollout")
    ordered = order(targets, record.digest)
    stage_of = [i for i, size in enumerate(plan.stages(len(ordered))) for _ in range(size)]
    rows = [(d.device, stage, d.version_of(model),
             watch.releases.get(watch.topics.release(model, d.device), b"").decode())
            for d, stage in zip(ordered, stage_of)]
    rollout = registry.create_rollout(fleet, model, version, record.digest, selector=selector, plan=asdict(plan),
                                      fleet_wide=not selector, targets=rows, runner=runner)
    return Start(rollout, skipped)


# --- running ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """A rollout and its devices, as the runner sees them after one look."""

    rollout: RolloutRecord
    devices: list[RolloutDevice]
    problem: str | None = None  # why the registry cannot be written now (the runner goes on and retries)

    def counts(self, stage: int | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            if stage is None or d.stage == stage:
                out[d.state] = out.get(d.state, 0) + 1
        return out

    @property
    def stages(self) -> int:
        return max((d.stage for d in self.devices), default=-1) + 1


class RolloutRunner:
    """Drives one rollout to its end; ``run()`` returns when it succeeded or was aborted (or on ``stop()``)."""

    def __init__(self, registry: Registry, watch: FleetWatch, rollout_id: int, *, runner: str | None = None,
                 on_progress: Callable[[Progress], None] | None = None, tick: float = TICK):
        self.registry = registry
        self.watch = watch
        self.topics: Topics = watch.topics
        self.runner = runner or runner_name()
        self.on_progress = on_progress
        self.tick = tick
        self.rollout = registry.rollout(rollout_id)
        self.plan = Plan.from_dict(self.rollout.plan)
        release = registry.release_by_digest(self.rollout.fleet, self.rollout.digest)
        if release is None:
            raise RolloutError(f"rollout {rollout_id}: its signed release {self.rollout.digest[:12]} is not in the "
                               f"registry")
        self.payload = encode(release.signed())
        self.devices = {d.device: d for d in registry.rollout_devices(rollout_id)}
        self._seen: dict[str, list[tuple[Event, float]]] = {}  # device -> (event, when the hub received it)
        self._unsaved: dict[str, dict[str, Any]] = {}  # device changes the registry has not taken yet
        self._offline = False  # following the devices in memory only, while the registry cannot be used
        self.db_error: str | None = None  # why the registry cannot be used now
        self._down_since: float | None = None
        self._stop = False
        since = min((d.published_at for d in self.devices.values() if d.published_at), default=None)
        if since is not None:  # what devices reported while no hub ran this rollout
            for e in registry.events(self.rollout.fleet, model=self.rollout.model, since=since - 1, limit=100_000):
                if e.device in self.devices:
                    self._note(e.device, Event(e.model, e.version, e.state, e.detail, e.ts), e.received)

    # --- events in --------------------------------------------------------------------------

    def _listen(self, kind: str, device: str, obj: object) -> None:
        if kind == "event" and device in self.devices and isinstance(obj, Event) and obj.model == self.rollout.model:
            self._note(device, obj, time.time())

    def _note(self, device: str, e: Event, received: float) -> None:
        self._seen.setdefault(device, []).append((e, received))

    def _events_after(self, device: str, since: float) -> list[Event]:
        return [e for e, received in self._seen.get(device, []) if received >= since - 1.0]

    # --- the loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop = True

    def run(self) -> RolloutRecord:
        """Look at the fleet every tick until the rollout ends. While the registry cannot be used (down,
        locked) the runner says so once, follows the devices in memory, retries, and writes what it saw when
        the registry is back; decisions (a gate, a promotion, the end) wait for it. Only another hub taking the
        rollout over ends the run here (``RolloutTakenOver``)."""
        self.watch.add_listener(self._listen)
        try:
            while not self._stop:
                self._tick()
                if self.on_progress is not None:
                    self.on_progress(Progress(self.rollout, list(self.devices.values()), self.db_error))
                if not self.rollout.in_progress:
                    break
                time.sleep(self.tick if self.db_error is None else max(self.tick, DB_RETRY))
        finally:
            self.watch.remove_listener(self._listen)
            self._last_write()
        return self.rollout

    def _tick(self) -> None:
        try:
            self.rollout = self.registry.heartbeat(self.rollout.id, self.runner)
            self._write_devices()
            if self.db_error is not None:
                self._registry_back()
            self._step()
        except RolloutTakenOver:
            raise
        except RegistryError as exc:
            self._registry_down(exc)
            self._follow_in_memory()

    def _follow_in_memory(self) -> None:
        """Note the devices' outcomes without the registry (written when it is back)."""
        self._offline = True
        try:
            if self.rollout.state in ("running", "paused"):
                self._track_updates()
            elif self.rollout.state == "aborting":
                self._track_reverts()
        finally:
            self._offline = False

    def _last_write(self) -> None:
        try:
            self._write_devices()
        except RegistryError as exc:
            log.warning("rollout %d: %d device change(s) not written (%s); the hub that resumes the rollout reads "
                        "them again from the devices' events and statuses", self.rollout.id, len(self._unsaved), exc)

    def _registry_down(self, exc: RegistryError) -> None:
        if self.db_error is None:
            self._down_since = time.time()
            log.warning("rollout %d: %s; the runner keeps the rollout's state and goes on, retrying every %gs",
                        self.rollout.id, exc, max(self.tick, DB_RETRY))
        self.db_error = str(exc)

    def _registry_back(self) -> None:
        took = time.time() - (self._down_since or time.time())
        message = (f"the registry could not be used for {took:.0f}s ({self.db_error}); the runner kept the "
                   f"rollout's state and went on")
        self._set(log_message=message)
        self.db_error, self._down_since = None, None

    def _step(self) -> None:
        r = self.rollout
        if r.request:
            self._handle_request(r.request)
            r = self.rollout
        if r.state in ("running", "paused"):
            self._track_updates()
            failures = sum(1 for d in self.devices.values() if d.state in FAILURES)
            finished = sum(1 for d in self.devices.values() if d.state in DONE)
            stage = [d for d in self.devices.values() if d.stage == r.stage]
            why = self.plan.gate(failures, finished, bool(stage) and all(d.state in DONE for d in stage))
            if why:
                self._begin_abort(why)
            elif r.state == "running":
                self._advance()
        if self.rollout.state == "aborting":
            self._revert_touched()
            self._track_reverts()
            self._end_abort()

    def _handle_request(self, request: str) -> None:
        r = self.rollout
        if request == "abort" and r.state in ("running", "paused"):
            self._begin_abort("aborted by hand")
        elif request == "pause" and r.state == "running":
            self._set(state="paused", request=None, log_message="paused by hand: no new stage starts")
        elif request == "resume" and r.state == "paused":
            self._set(state="running", request=None, log_message="resumed by hand")
        else:
            self._set(request=None)

    def _set(self, log_message: str | None = None, **values: Any) -> None:
        if log_message:
            log.info("rollout %d: %s", self.rollout.id, log_message)
        self.rollout = self.registry.update_rollout(self.rollout.id, expect_runner=self.runner,
                                                    log_message=log_message, **values)

    def _save(self, changed: dict[str, dict[str, Any]]) -> None:
        """Devices change here at once; the registry takes the changes now, or when it is back."""
        for name, values in changed.items():
            self.devices[name] = replace(self.devices[name], **values)
            self._unsaved.setdefault(name, {}).update(values)
        self._write_devices()

    def _write_devices(self) -> None:
        if self._unsaved and not self._offline:
            self.registry.set_rollout_devices(self.rollout.id, self._unsaved.items())
            self._unsaved.clear()

    def _publish(self, names: list[str], payloads: dict[str, bytes]) -> None:
        conn = self.watch.conn
        conn.wait([conn.publish(self.topics.release(self.rollout.model, n), payloads[n], retain=True) for n in names])

    # --- updating ---------------------------------------------------------------------------

    def _advance(self) -> None:
        """Publish the current stage, or bake it, or go to the next one, or finish."""
        r = self.rollout
        stage = [d for d in self.devices.values() if d.stage == r.stage]
        pending = [d.device for d in stage if d.state == "pending"]
        if pending:
            self._start_stage(pending)
            return
        if any(d.state not in DONE for d in stage):
            return
        now = time.time()
        if r.stage_done_at is None:
            c = Progress(r, stage).counts()
            self._set(stage_done_at=now, log_message=(
                f"stage {r.stage + 1}: {c.get('active', 0)} active, {c.get('failed', 0)} failed, "
                f"{c.get('timed_out', 0)} timed out; baking {self.plan.bake:g}s"))
            return
        if now - r.stage_done_at < self.plan.bake:
            return
        if any(d.stage > r.stage for d in self.devices.values()):
            self._set(stage=r.stage + 1, stage_done_at=None, log_message=f"stage {r.stage + 2} starts")
        else:
            self._finish()

    def _start_stage(self, names: list[str]) -> None:
        now = time.time()
        changed, publish = {}, []
        for n in names:
            have = self._serving(n)
            if have == self.rollout.version:
                changed[n] = {"state": "active", "published_at": now, "finished_at": now,
                              "detail": f"already serves v{have}"}
            else:
                publish.append(n)
                changed[n] = {"state": "updating", "published_at": now, "detail": ""}
        self._publish(publish, {n: self.payload for n in publish})
        self._save(changed)
        log.info("rollout %d: stage %d published to %d device(s)", self.rollout.id, self.rollout.stage + 1,
                 len(publish))

    def _serving(self, device: str) -> int | None:
        status = self.watch.statuses.get(device)
        m = status.model(self.rollout.model) if status else None
        return m.version if m else None

    def _track_updates(self) -> None:
        now = time.time()
        target = self.rollout.version
        changed = {}
        for d in self.devices.values():
            if d.state == "active" and d.finished_at:  # a device that fails later (e.g. rolled back at a restart)
                later = [e for e in self._events_after(d.device, d.finished_at + 1.0)
                         if e.version == target and e.failed]
                if later:
                    changed[d.device] = {"state": "failed", "detail": f"{later[-1].state} after it was active: "
                                                                      f"{later[-1].detail}"[:500]}
                continue
            if d.state != "updating":
                continue
            since = d.published_at or now
            outcome = None
            for e in self._events_after(d.device, since):
                if e.version == target and (e.state == "active" or e.failed):
                    outcome = ("active" if e.state == "active" else "failed", f"{e.state}: {e.detail}")
            if outcome is None:
                outcome = self._from_status(d.device, since)
            if outcome is None and now - since > self.plan.timeout:
                outcome = ("timed_out", f"no answer within {self.plan.timeout:g}s"
                                        + ("" if (self.watch.states.get(d.device) or _OFF).online else " (offline)"))
            if outcome is not None:
                changed[d.device] = {"state": outcome[0], "detail": outcome[1][:500], "finished_at": now}
        self._save(changed)

    def _from_status(self, device: str, since: float) -> tuple[str, str] | None:
        """The outcome the retained status shows, for events missed while no hub was watching."""
        status = self.watch.statuses.get(device)
        if status is None:
            return None
        if self._serving(device) == self.rollout.version:
            return ("active", f"serves v{self.rollout.version}")
        u = status.updates.get(self.rollout.model)
        if u is not None and u.version == self.rollout.version and u.state in FAILED and u.ts >= since - CLOCK_SLACK:
            return ("failed", f"{u.state}: {u.detail}")
        return None

    def _finish(self) -> None:
        r = self.rollout
        names = list(self.devices)
        if r.fleet_wide:
            conn = self.watch.conn
            conn.wait([conn.publish(self.topics.release(r.model), self.payload, retain=True)])
            self._publish(names, {n: b"" for n in names})
            where = "the fleet's release now names it; per-device releases cleared"
        else:
            where = "the selected devices keep their per-device release"
        c = Progress(r, list(self.devices.values())).counts()
        self._set(state="succeeded", finished_at=time.time(), log_message=(
            f"succeeded: {c.get('active', 0)} active, {c.get('failed', 0) + c.get('timed_out', 0)} failed; {where}"))

    # --- aborting ---------------------------------------------------------------------------

    def _begin_abort(self, reason: str) -> None:
        self._set(state="aborting", request=None, reason=reason, log_message=f"aborting: {reason}")
        self._revert_touched()

    def _revert_touched(self) -> None:
        """Give every device the rollout touched and has not dealt with yet its own release as it was before."""
        now = time.time()
        touched = [d for d in self.devices.values() if d.state not in (*SETTLED, "reverting", "pending")]
        if not touched:
            return
        payloads = {d.device: (d.before_release or "").encode() for d in touched}
        self._publish([d.device for d in touched], payloads)
        changed = {}
        fleet_version = self._fleet_release_version()
        follows_fleet = fleet_version is not None and fleet_version != self.rollout.version
        for d in touched:
            if d.before_version is None and not d.before_release and follows_fleet:
                # no version known before (its status had not reached the hub), but with its own release
                # cleared it follows the fleet's release again: it goes back to that version
                changed[d.device] = {"state": "reverting", "published_at": now, "before_version": fleet_version,
                                     "detail": f"{d.state}: {d.detail}; the fleet's release names "
                                               f"v{fleet_version}"[:500]}
            elif d.before_version is None and d.state == "active":
                changed[d.device] = {"state": "kept", "finished_at": now,
                                     "detail": f"keeps v{self.rollout.version}: it served no earlier version"}
            else:
                changed[d.device] = {"state": "reverting", "published_at": now,
                                     "detail": f"{d.state}: {d.detail}"[:500]}
        self._save(changed)

    def _fleet_release_version(self) -> int | None:
        """The version the fleet's retained release of the model names, which a device without a release of its
        own serves."""
        payload = self.watch.releases.get(self.topics.release(self.rollout.model))
        try:
            version = json.loads(payload)["version"] if payload else None
        except (ValueError, KeyError, TypeError):
            return None
        return version if isinstance(version, int) else None

    def _track_reverts(self) -> None:
        now = time.time()
        changed = {}
        for d in self.devices.values():
            if d.state != "reverting":
                continue
            have = self._serving(d.device)
            if have == d.before_version or (have is None and d.before_version is None):
                back = f"back on v{d.before_version}" if d.before_version else "serves no version, as before"
                changed[d.device] = {"state": "reverted", "finished_at": now, "detail": f"{d.detail}; {back}"[:500]}
            elif now - (d.published_at or now) > self.plan.timeout:
                changed[d.device] = {"state": "revert_timed_out", "finished_at": now,
                                     "detail": f"{d.detail}; not back on v{d.before_version} within "
                                               f"{self.plan.timeout:g}s: its release names it, it switches when "
                                               f"it is back"[:500]}
        self._save(changed)

    def _end_abort(self) -> None:
        if all(d.state in SETTLED or d.state == "pending" for d in self.devices.values()):
            c = Progress(self.rollout, list(self.devices.values())).counts()
            self._set(state="aborted", finished_at=time.time(), log_message=(
                f"aborted: {c.get('reverted', 0)} rolled back, {c.get('kept', 0)} kept the new version, "
                f"{c.get('revert_timed_out', 0)} not confirmed, {c.get('pending', 0)} never updated"))


class _Off:
    online = False


_OFF = _Off()


# --- by hand ----------------------------------------------------------------------------------------

def request(registry: Registry, rollout_id: int, what: str) -> RolloutRecord:
    """Ask the rollout's runner to pause, resume or abort (it acts within a tick)."""
    r = registry.rollout(rollout_id)
    if not r.in_progress:
        raise RolloutError(f"rollout {rollout_id} is {r.state}: nothing to {what}")
    allowed = {"pause": ("running",), "resume": ("paused", "running"), "abort": ("running", "paused")}
    if r.state not in allowed[what]:
        raise RolloutError(f"rollout {rollout_id} is {r.state}: it cannot be {what}d")
    return registry.update_rollout(rollout_id, request=what, log_message=f"{what} asked by hand")


def runner_alive(r: RolloutRecord, now: float | None = None) -> bool:
    return r.heartbeat is not None and (now or time.time()) - r.heartbeat < STALE_RUNNER


__all__ = ["Plan", "Progress", "RolloutError", "RolloutRunner", "RegistryError", "Start", "request", "runner_alive",
           "runner_name", "start_rollout"]
