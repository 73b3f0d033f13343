"""The hub's registry: what was released, every device seen, its events, and rollouts with their history.

SQLAlchemy Core over SQLite by default (a file, no server) or PostgreSQL by URL for a hub a team shares.
Writes that come from the broker (device state, status, events, releases seen) are idempotent upserts, so
two hub processes watching the same fleet, or a watcher replaying a persistent session, never duplicate.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection as DbConnection, Engine
from sqlalchemy.exc import IntegrityError as DbIntegrityError, OperationalError, SQLAlchemyError

from edgerun.contract import Event, State, Status, TunedCandidate
from edgerun.errors import EdgerunError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ACTIVE_ROLLOUT_STATES = ("running", "paused", "aborting")
DB_ENV = "EDGERUN_HUB_DB"
DB_PASSWORD_ENV = "EDGERUN_HUB_DB_PASSWORD"


class RegistryError(EdgerunError):
    """The registry database cannot be used (unreachable, locked, not writable, or a newer schema)."""

    exit_code = 69


class RolloutTakenOver(RegistryError):
    """Another hub runs this rollout now (it took it over while this one's heartbeat had stopped)."""


def default_url() -> str:
    """``EDGERUN_HUB_DB``, else a SQLite file under ``$XDG_DATA_HOME/edgerun`` (``~/.local/share``)."""
    env = os.environ.get(DB_ENV)
    if env:
        return env
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'edgerun' / 'hub.db'}"


def who() -> str:
    """``user@host``: who recorded a release or started a rollout."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


metadata = sa.MetaData()

meta = sa.Table("edgerun_meta", metadata,
                sa.Column("key", sa.String(64), primary_key=True),
                sa.Column("value", sa.Text, nullable=False))

releases = sa.Table(
    "releases", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fleet", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(128), nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("variants", sa.JSON, nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),  # the exact signed bytes, published again as they are
    sa.Column("source", sa.String(16), nullable=False),  # publish | upload | rollout | seen
    sa.Column("recorded_by", sa.String(256), nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.UniqueConstraint("fleet", "digest", name="uq_release_digest"),
    sa.Index("ix_release_model", "fleet", "model", "version"))

devices = sa.Table(
    "devices", metadata,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("online", sa.Boolean, nullable=True),
    sa.Column("session", sa.Integer, nullable=True),
    sa.Column("profile", sa.String(128), nullable=False, default=""),
    sa.Column("tags", sa.JSON, nullable=False, default=dict),
    sa.Column("models", sa.JSON, nullable=False, default=list),
    sa.Column("update_info", sa.JSON, nullable=True),
    sa.Column("status", sa.JSON, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("state_ts", sa.Float, nullable=True),
    sa.Column("status_ts", sa.Float, nullable=True))

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fleet", sa.String(128), nullable=False),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("received", sa.Float, nullable=False),
    sa.UniqueConstraint("fleet", "device", "model", "version", "state", "ts", name="uq_event"),
    sa.Index("ix_event_model", "fleet", "model", "version"),
    sa.Index("ix_event_device", "fleet", "device"))

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fleet", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("plan", sa.JSON, nullable=False),
    sa.Column("fleet_wide", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("stage", sa.Integer, nullable=False, default=0),
    sa.Column("stage_done_at", sa.Float, nullable=True),  # when the current stage's last device finished
    sa.Column("request", sa.String(16), nullable=True),  # pause | resume | abort, asked by hand
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("runner", sa.String(256), nullable=True),
    sa.Column("heartbeat", sa.Float, nullable=True))

# One rollout per model in progress, whatever the hubs sharing the database do at the same moment. A partial
# index in the same words for SQLite and PostgreSQL (made by create(), so SQLAlchemy loads no other dialect).
IN_PROGRESS_INDEX = sa.text("CREATE UNIQUE INDEX IF NOT EXISTS uq_rollout_in_progress ON rollouts (fleet, model) "
                            "WHERE state IN ('running', 'paused', 'aborting')")

rollout_devices = sa.Table(
    "rollout_devices", metadata,
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("before_version", sa.Integer, nullable=True),
    sa.Column("before_release", sa.Text, nullable=True),  # the device's own release before; "" for none
    sa.Column("published_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("detail", sa.Text, nullable=False, default=""))

device_keys = sa.Table(
    "device_keys", metadata,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),  # a device name, or "@fleet" for the fleet key
    sa.Column("recipient", sa.String(128), nullable=False),  # age1...
    sa.Column("fingerprint", sa.String(16), nullable=False),
    sa.Column("added_by", sa.String(256), nullable=False),
    sa.Column("added_at", sa.Float, nullable=False))

# What each device measured when it tuned a model version (contract 1.4): one row per device, model and version,
# replaced when the device tunes that version again. A database made before this table is given it on open.
device_tuning = sa.Table(
    "device_tuning", metadata,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("profile", sa.String(128), nullable=False),
    sa.Column("cpu_model", sa.String(256), nullable=False),
    sa.Column("cpu_class", sa.String(32), nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),  # when the device tuned (its clock)
    sa.Column("received", sa.Float, nullable=False),
    sa.Column("chosen", sa.JSON, nullable=True),
    sa.Column("default_choice", sa.JSON, nullable=True),
    sa.Column("candidates", sa.JSON, nullable=False),
    sa.Index("ix_tuning_model", "fleet", "model", "version"))

rollout_log = sa.Table(
    "rollout_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Index("ix_rollout_log", "rollout_id", "id"))


# --- records ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReleaseRecord:
    """One signed release the hub made or saw."""

    id: int
    fleet: str
    model: str
    version: int
    digest: str
    key_id: str
    created: str
    variants: list[dict[str, Any]]
    manifest: str
    source: str
    recorded_by: str
    recorded_at: float

    def signed(self) -> dict[str, Any]:
        return json.loads(self.manifest)


@dataclass(frozen=True)
class DeviceRecord:
    """A device as the hub last saw it."""

    fleet: str
    device: str
    online: bool | None
    session: int | None
    profile: str
    tags: dict[str, str]
    models: list[dict[str, Any]]
    update: dict[str, Any] | None
    status: dict[str, Any] | None
    last_error: str | None
    first_seen: float
    last_seen: float
    state_ts: float | None = None
    status_ts: float | None = None

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.models if m.get("name") == name), None)

    def version_of(self, name: str) -> int | None:
        m = self.model(name)
        return m.get("version") if m else None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "online": self.online, "session": self.session, "profile": self.profile,
                "tags": self.tags, "models": self.models, "update": self.update, "last_error": self.last_error,
                "memory": (self.status or {}).get("memory") or {},
                "contract": (self.status or {}).get("contract") if self.status is not None else None,
                "first_seen": self.first_seen,
                "last_seen": self.last_seen, "status_ts": self.status_ts}


@dataclass(frozen=True)
class EventRecord:
    """One update transition a device reported."""

    device: str
    model: str
    version: int
    state: str
    detail: str
    ts: float
    received: float

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.model, "version": self.version, "state": self.state,
                "detail": self.detail, "ts": self.ts, "received": self.received}


@dataclass(frozen=True)
class RolloutRecord:
    """A staged rollout of one release: its plan, where it is, and who runs it."""

    id: int
    fleet: str
    model: str
    version: int
    digest: str
    selector: list[str]
    plan: dict[str, Any]
    fleet_wide: bool
    state: str
    stage: int
    stage_done_at: float | None
    request: str | None
    reason: str | None
    created_by: str
    created_at: float
    updated_at: float
    finished_at: float | None
    runner: str | None
    heartbeat: float | None

    @property
    def in_progress(self) -> bool:
        return self.state in ACTIVE_ROLLOUT_STATES

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class RolloutDevice:
    """One device of a rollout: its stage and how its update went."""

    device: str
    position: int
    stage: int
    state: str  # pending | updating | active | failed | timed_out | reverting | reverted | kept
    before_version: int | None
    before_release: str | None
    published_at: float | None
    finished_at: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.pop("before_release")
        return d


@dataclass(frozen=True)
class DeviceKeyRecord:
    """An enrolled age key: a device's own (or the fleet's, as device "@fleet"), what releases are encrypted to."""

    fleet: str
    device: str
    recipient: str
    fingerprint: str
    added_by: str
    added_at: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class TuningRecord:
    """What one device measured when it last tuned one model version, and what it picked."""

    device: str
    model: str
    version: int
    profile: str
    cpu_model: str
    cpu_class: str
    complete: bool
    seconds: float
    ts: float
    received: float
    chosen: TunedCandidate | None
    default: TunedCandidate | None
    candidates: tuple[TunedCandidate, ...]


@dataclass
class Batch:
    """What a watcher collected from the broker, written in one transaction."""

    states: dict[str, tuple[State, float]] = field(default_factory=dict)
    statuses: dict[str, tuple[Status, float]] = field(default_factory=dict)
    events: list[tuple[str, Event, float]] = field(default_factory=list)
    releases: dict[str, bytes] = field(default_factory=dict)  # sha256 of the payload -> signed manifest seen retained

    def __len__(self) -> int:
        return len(self.states) + len(self.statuses) + len(self.events) + len(self.releases)

    def merge(self, other: "Batch") -> None:
        """Fold ``other`` (newer) into this one, keeping what is newest per device."""
        self.states.update(other.states)
        self.statuses.update(other.statuses)
        self.events.extend(other.events)
        self.releases.update(other.releases)


# --- the registry -----------------------------------------------------------------------------------

class Registry:
    """The hub's database; every method is one transaction and raises RegistryError with a clear message."""

    def __init__(self, url: str | None = None, *, create: bool = True, timeout: float = 10.0):
        self.url = sa.make_url(url or default_url())
        password = os.environ.get(DB_PASSWORD_ENV)
        if password and self.url.password is None and not self.url.drivername.startswith("sqlite"):
            self.url = self.url.set(password=password)
        if self.url.drivername in ("postgresql", "postgres"):
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.shown = self.url.render_as_string(hide_password=True)
        self.sqlite = self.url.drivername.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.sqlite:
            db = self.url.database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": timeout}  # wait this long for a lock before "locked"
        else:
            kwargs["connect_args"] = {"connect_timeout": max(1, int(timeout))}
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = sa.create_engine(self.url, **kwargs)
        except (SQLAlchemyError, ImportError) as exc:
            raise RegistryError(f"registry {self.shown}: {exc}") from None
        if self.sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            self.create()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _begin(self) -> "_Tx":
        return _Tx(self)

    def create(self) -> None:
        """Create the tables (once); refuse a database written by a newer edgerun."""
        with self._begin() as db:
            metadata.create_all(db)
            db.execute(IN_PROGRESS_INDEX)
            row = db.execute(sa.select(meta.c.value).where(meta.c.key == "schema")).first()
            if row is None:
                db.execute(meta.insert().values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RegistryError(f"registry {self.shown} has schema {row[0]}, newer than this edgerun's "
                                    f"{SCHEMA_VERSION}: upgrade edgerun on this hub")

    def _upsert(self, table: sa.Table, keys: Sequence[str], update: Sequence[str] | None) -> sa.Executable:
        """INSERT ... ON CONFLICT (keys) DO UPDATE/NOTHING in the database's own dialect (run with many rows)."""
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        stmt = insert(table)
        if not update:
            return stmt.on_conflict_do_nothing(index_elements=list(keys))
        return stmt.on_conflict_do_update(index_elements=list(keys),
                                          set_={c: getattr(stmt.excluded, c) for c in update})

    # --- releases ---------------------------------------------------------------------------

    def record_release(self, fleet: str, signed: dict[str, Any], *, source: str,
                       by: str | None = None) -> ReleaseRecord:
        """Remember a signed release (the same digest twice is one row)."""
        from edgerun import manifest as manifest_mod

        digest = manifest_mod.digest(signed)
        variants = [{"id": v.get("id"), "format": v.get("format"), "precision": v.get("precision"),
                     "files": [{"path": f.get("path"), "sha256": f.get("sha256"), "size": f.get("size")}
                               for f in v.get("files", [])]} for v in signed.get("variants", [])]
        row = {"fleet": fleet, "model": signed["model"], "version": signed["version"], "digest": digest,
               "key_id": (signed.get("signature") or {}).get("key_id", ""), "created": signed.get("created", ""),
               "variants": variants, "manifest": json.dumps(signed, ensure_ascii=False, separators=(",", ":")),
               "source": source, "recorded_by": by or who(), "recorded_at": time.time()}
        with self._begin() as db:
            db.execute(self._upsert(releases, ("fleet", "digest"), None), [row])
            found = db.execute(sa.select(releases).where(releases.c.fleet == fleet,
                                                         releases.c.digest == digest)).one()
        return ReleaseRecord(**found._mapping)

    def releases(self, fleet: str, model: str | None = None) -> list[ReleaseRecord]:
        q = sa.select(releases).where(releases.c.fleet == fleet)
        if model:
            q = q.where(releases.c.model == model)
        with self._begin() as db:
            rows = db.execute(q.order_by(releases.c.model, releases.c.version, releases.c.recorded_at)).all()
        return [ReleaseRecord(**r._mapping) for r in rows]

    def release(self, fleet: str, model: str, version: int) -> ReleaseRecord | None:
        """The latest recorded release of ``model`` v``version`` (the one a rollout re-signs)."""
        with self._begin() as db:
            r = db.execute(sa.select(releases).where(releases.c.fleet == fleet, releases.c.model == model,
                                                     releases.c.version == version)
                           .order_by(releases.c.recorded_at.desc()).limit(1)).first()
        return ReleaseRecord(**r._mapping) if r else None

    def release_by_digest(self, fleet: str, digest: str) -> ReleaseRecord | None:
        with self._begin() as db:
            r = db.execute(sa.select(releases).where(releases.c.fleet == fleet,
                                                     releases.c.digest == digest)).first()
        return ReleaseRecord(**r._mapping) if r else None

    # --- enrolled device keys ---------------------------------------------------------------

    def add_device_key(self, fleet: str, device: str, recipient: str, fingerprint: str, *,
                       by: str | None = None) -> DeviceKeyRecord:
        """Enrol (or replace) the age key releases are encrypted to for ``device`` ("@fleet": the fleet key)."""
        row = {"fleet": fleet, "device": device, "recipient": recipient, "fingerprint": fingerprint,
               "added_by": by or who(), "added_at": time.time()}
        with self._begin() as db:
            db.execute(self._upsert(device_keys, ("fleet", "device"), ("recipient", "fingerprint", "added_by",
                                                                        "added_at")), [row])
        return DeviceKeyRecord(**row)

    def device_keys(self, fleet: str) -> list[DeviceKeyRecord]:
        with self._begin() as db:
            rows = db.execute(sa.select(device_keys).where(device_keys.c.fleet == fleet)
                              .order_by(device_keys.c.device)).all()
        return [DeviceKeyRecord(**r._mapping) for r in rows]

    def device_key(self, fleet: str, device: str) -> DeviceKeyRecord | None:
        with self._begin() as db:
            r = db.execute(sa.select(device_keys).where(device_keys.c.fleet == fleet,
                                                        device_keys.c.device == device)).first()
        return DeviceKeyRecord(**r._mapping) if r else None

    def remove_device_key(self, fleet: str, device: str) -> bool:
        with self._begin() as db:
            return db.execute(device_keys.delete().where(device_keys.c.fleet == fleet,
                                                         device_keys.c.device == device)).rowcount > 0

    # --- what the broker says ---------------------------------------------------------------

    def apply(self, fleet: str, batch: Batch) -> None:
        """Write a watcher's batch: device states and statuses (newest wins), events, releases seen."""
        if not len(batch):
            return
        from edgerun import manifest as manifest_mod

        now = time.time()
        with self._begin() as db:
            names = set(batch.states) | set(batch.statuses)
            existing = {r.device: r for r in db.execute(
                sa.select(devices.c.device, devices.c.state_ts, devices.c.status_ts, devices.c.session,
                          devices.c.first_seen)
                .where(devices.c.fleet == fleet, devices.c.device.in_(names)))} if names else {}
            rows = []
            for name in sorted(names):
                old = existing.get(name)
                row: dict[str, Any] = {"fleet": fleet, "device": name, "last_seen": now,
                                       "first_seen": old.first_seen if old else now}
                state = batch.states.get(name)
                if state is not None and not (old and old.session and state[0].session < old.session):
                    row.update(online=state[0].online, session=state[0].session, state_ts=state[1])
                status = batch.statuses.get(name)
                if status is not None:
                    s, received = status
                    data = s.to_dict()
                    update = data["update"]
                    row.update(profile=s.profile, tags=s.tags, models=data["models"], update_info=update,
                               status=data, status_ts=received,
                               last_error=(update or {}).get("error") if update else None)
                rows.append(row)
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in rows:  # one multi-row statement per set of columns (state only, status only, both)
                cols = tuple(c for c in row if c not in ("fleet", "device", "first_seen"))
                groups.setdefault(cols, []).append({**_DEVICE_DEFAULTS, **row})
            for cols, group in groups.items():
                db.execute(self._upsert(devices, ("fleet", "device"), cols), group)
            rows = [{"fleet": fleet, "device": d, "model": e.model, "version": e.version, "state": e.state,
                     "detail": e.detail, "ts": e.ts, "received": received} for d, e, received in batch.events]
            if rows:
                db.execute(self._upsert(events, ("fleet", "device", "model", "version", "state", "ts"), None), rows)
            self._apply_tuning(db, fleet, batch)
        for payload in batch.releases.values():
            try:
                signed = json.loads(payload)
                if isinstance(signed, dict) and isinstance(signed.get("model"), str) \
                        and isinstance(signed.get("version"), int) and signed.get("signature"):
                    manifest_mod.digest(signed)
                    self.record_release(fleet, signed, source="seen", by="broker")
            except (ValueError, TypeError, KeyError):
                continue

    def _apply_tuning(self, db: DbConnection, fleet: str, batch: Batch) -> None:
        """The tuning figures of the batch's statuses: a (device, model, version) tuned later than the row the
        registry holds replaces it; the same figures again (every status repeats them) write nothing."""
        tuned = {name: st for name, st in batch.statuses.items() if st[0].tuning}
        if not tuned:
            return
        held = {(r.device, r.model, r.version): r.ts for r in db.execute(
            sa.select(device_tuning.c.device, device_tuning.c.model, device_tuning.c.version, device_tuning.c.ts)
            .where(device_tuning.c.fleet == fleet, device_tuning.c.device.in_(sorted(tuned))))}
        rows = []
        for name, (s, received) in sorted(tuned.items()):
            latest = {}
            for t in s.tuning:  # one per model and version: the latest, should a status list one twice
                if (t.model, t.version) not in latest or t.ts > latest[(t.model, t.version)].ts:
                    latest[(t.model, t.version)] = t
            for t in latest.values():
                old = held.get((name, t.model, t.version))
                if old is not None and t.ts <= old:
                    continue
                rows.append({"fleet": fleet, "device": name, "model": t.model, "version": t.version,
                             "profile": (t.profile or s.profile)[:128], "cpu_model": t.cpu_model[:256],
                             "cpu_class": t.cpu_class[:32],
                             "complete": t.complete, "seconds": t.seconds, "ts": t.ts, "received": received,
                             "chosen": t.chosen.to_dict() if t.chosen else None,
                             "default_choice": t.default.to_dict() if t.default else None,
                             "candidates": [c.to_dict() for c in t.candidates]})
        if rows:
            keys = ("fleet", "device", "model", "version")
            db.execute(self._upsert(device_tuning, keys, [c for c in rows[0] if c not in keys]), rows)

    def tuning(self, fleet: str, model: str, version: int | None = None, *,
               profile: str | None = None) -> list[TuningRecord]:
        """What each device measured of ``model`` v``version`` (default: the latest version any device tuned),
        optionally only the devices of one profile (then by default the latest version they tuned)."""
        if version is None:
            version = max(self.tuning_versions(fleet, model, profile=profile), default=None)
            if version is None:
                return []
        q = sa.select(device_tuning).where(device_tuning.c.fleet == fleet, device_tuning.c.model == model,
                                           device_tuning.c.version == version)
        if profile:
            q = q.where(device_tuning.c.profile == profile)
        with self._begin() as db:
            rows = db.execute(q.order_by(device_tuning.c.device)).all()
        return [_tuning(r) for r in rows]

    def tuning_versions(self, fleet: str, model: str, *, profile: str | None = None) -> dict[int, int]:
        """The versions of ``model`` that devices (of ``profile``) tuned, each with how many devices did."""
        q = sa.select(device_tuning.c.version, sa.func.count()).where(device_tuning.c.fleet == fleet,
                                                                       device_tuning.c.model == model)
        if profile:
            q = q.where(device_tuning.c.profile == profile)
        with self._begin() as db:
            rows = db.execute(q.group_by(device_tuning.c.version).order_by(device_tuning.c.version)).all()
        return {v: n for v, n in rows}

    def devices(self, fleet: str, *, with_status: bool = True) -> list[DeviceRecord]:
        """Every device of ``fleet``; without ``with_status`` the last status itself (the largest column) is left
        out, and ``DeviceRecord.status`` is None."""
        cols = [c for c in devices.c if with_status or c.name != "status"]
        with self._begin() as db:
            rows = db.execute(sa.select(*cols).where(devices.c.fleet == fleet).order_by(devices.c.device)).all()
        return [_device(r) for r in rows]

    def device_names(self, fleet: str) -> list[str]:
        with self._begin() as db:
            return list(db.execute(sa.select(devices.c.device).where(devices.c.fleet == fleet)
                                   .order_by(devices.c.device)).scalars())

    def device(self, fleet: str, name: str) -> DeviceRecord | None:
        with self._begin() as db:
            r = db.execute(sa.select(devices).where(devices.c.fleet == fleet, devices.c.device == name)).first()
        return _device(r) if r else None

    def events(self, fleet: str, *, model: str | None = None, version: int | None = None,
               device: str | None = None, since: float | None = None, limit: int = 200) -> list[EventRecord]:
        """The most recent events, newest last."""
        q = sa.select(events).where(events.c.fleet == fleet)
        if model:
            q = q.where(events.c.model == model)
        if version is not None:
            q = q.where(events.c.version == version)
        if device:
            q = q.where(events.c.device == device)
        if since is not None:
            q = q.where(events.c.received >= since)
        with self._begin() as db:
            rows = db.execute(q.order_by(events.c.id.desc()).limit(limit)).all()
        return [EventRecord(r.device, r.model, r.version, r.state, r.detail, r.ts, r.received)
                for r in reversed(rows)]

    # --- rollouts ---------------------------------------------------------------------------

    def create_rollout(self, fleet: str, model: str, version: int, digest: str, *, selector: list[str],
                       plan: dict[str, Any], fleet_wide: bool, targets: list[tuple[str, int, int | None, str]],
                       runner: str, by: str | None = None) -> RolloutRecord:
        """A new rollout with its devices (name, stage, version before, device release before)."""
        now = time.time()
        try:
            with self._begin() as db:
                rid = db.execute(rollouts.insert().values(
                    fleet=fleet, model=model, version=version, digest=digest, selector=selector, plan=plan,
                    fleet_wide=fleet_wide, state="running", stage=0, created_by=by or who(), created_at=now,
                    updated_at=now, runner=runner, heartbeat=now)).inserted_primary_key[0]
                db.execute(rollout_devices.insert(), [
                    {"rollout_id": rid, "device": d, "position": i, "stage": stage, "state": "pending",
                     "before_version": before, "before_release": before_release, "detail": ""}
                    for i, (d, stage, before, before_release) in enumerate(targets)])
                db.execute(rollout_log.insert().values(rollout_id=rid, ts=now, message=(
                    f"rollout of {model} v{version} to {len(targets)} device(s) created by {by or who()}")))
        except DbIntegrityError:
            busy = self.active_rollout(fleet, model)
            raise RegistryError(f"rollout {busy.id if busy else '?'} of {model} is already in progress "
                                f"({busy.state if busy else 'unknown'}); pause, resume or abort it first") from None
        return self.rollout(rid)

    def find_rollout(self, rid: int) -> RolloutRecord | None:
        with self._begin() as db:
            r = db.execute(sa.select(rollouts).where(rollouts.c.id == rid)).first()
        return RolloutRecord(**r._mapping) if r else None

    def rollout(self, rid: int) -> RolloutRecord:
        r = self.find_rollout(rid)
        if r is None:
            raise RegistryError(f"no rollout {rid} in registry {self.shown}")
        return r

    def rollouts(self, fleet: str, model: str | None = None, limit: int = 50) -> list[RolloutRecord]:
        q = sa.select(rollouts).where(rollouts.c.fleet == fleet)
        if model:
            q = q.where(rollouts.c.model == model)
        with self._begin() as db:
            rows = db.execute(q.order_by(rollouts.c.id.desc()).limit(limit)).all()
        return [RolloutRecord(**r._mapping) for r in rows]

    def active_rollout(self, fleet: str, model: str) -> RolloutRecord | None:
        with self._begin() as db:
            r = db.execute(sa.select(rollouts).where(rollouts.c.fleet == fleet, rollouts.c.model == model,
                                                     rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES))).first()
        return RolloutRecord(**r._mapping) if r else None

    def update_rollout(self, rid: int, *, log_message: str | None = None, expect_runner: str | None = None,
                       **values: Any) -> RolloutRecord:
        """Change a rollout (and log why); with ``expect_runner``, only while that runner still owns it."""
        now = time.time()
        with self._begin() as db:
            q = rollouts.update().where(rollouts.c.id == rid)
            if expect_runner is not None:
                q = q.where(rollouts.c.runner == expect_runner)
            if db.execute(q.values(updated_at=now, **values)).rowcount == 0:
                raise RolloutTakenOver(f"rollout {rid} is run by another hub now")
            if log_message:
                db.execute(rollout_log.insert().values(rollout_id=rid, ts=now, message=log_message))
        return self.rollout(rid)

    def claim_rollout(self, rid: int, runner: str, *, stale_after: float, force: bool = False) -> RolloutRecord:
        """Become the runner of a rollout whose runner stopped beating (or ``force``)."""
        now = time.time()
        with self._begin() as db:
            q = rollouts.update().where(rollouts.c.id == rid, rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES))
            if not force:
                q = q.where(sa.or_(rollouts.c.heartbeat.is_(None), rollouts.c.heartbeat < now - stale_after,
                                   rollouts.c.runner == runner))
            claimed = db.execute(q.values(runner=runner, heartbeat=now, updated_at=now)).rowcount
            if claimed:
                db.execute(rollout_log.insert().values(rollout_id=rid, ts=now, message=f"run by {runner}"))
        r = self.rollout(rid)
        if not claimed:
            if not r.in_progress:
                raise RegistryError(f"rollout {rid} is {r.state}: nothing to run")
            age = now - (r.heartbeat or 0)
            raise RegistryError(f"rollout {rid} is being run by {r.runner} (last seen {age:.0f}s ago); "
                                f"pass --force if that hub is gone")
        return r

    def heartbeat(self, rid: int, runner: str) -> RolloutRecord:
        return self.update_rollout(rid, expect_runner=runner, heartbeat=time.time())

    def rollout_devices(self, rid: int) -> list[RolloutDevice]:
        with self._begin() as db:
            rows = db.execute(sa.select(rollout_devices).where(rollout_devices.c.rollout_id == rid)
                              .order_by(rollout_devices.c.position)).all()
        return [RolloutDevice(**{k: v for k, v in r._mapping.items() if k != "rollout_id"}) for r in rows]

    def set_rollout_devices(self, rid: int, changes: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Update several devices of a rollout in one transaction: (device, column values)."""
        changes = list(changes)
        if not changes:
            return
        with self._begin() as db:
            for name, values in changes:
                db.execute(rollout_devices.update().where(rollout_devices.c.rollout_id == rid,
                                                          rollout_devices.c.device == name).values(**values))

    def rollout_log(self, rid: int) -> list[tuple[float, str]]:
        with self._begin() as db:
            rows = db.execute(sa.select(rollout_log.c.ts, rollout_log.c.message)
                              .where(rollout_log.c.rollout_id == rid).order_by(rollout_log.c.id)).all()
        return [(r.ts, r.message) for r in rows]


class _Tx:
    """``with registry._begin() as db``: one transaction, database errors turned into RegistryError."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._ctx: Any = None

    def __enter__(self) -> DbConnection:
        try:
            self._ctx = self.registry.engine.begin()
            return self._ctx.__enter__()
        except SQLAlchemyError as exc:
            raise _explain(self.registry, exc) from None

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            self._ctx.__exit__(kind, exc, tb)
        except SQLAlchemyError as err:
            if isinstance(err, DbIntegrityError) or isinstance(exc, DbIntegrityError):
                raise
            raise _explain(self.registry, err) from None
        if isinstance(exc, SQLAlchemyError) and not isinstance(exc, DbIntegrityError):
            raise _explain(self.registry, exc) from None
        return False


def _explain(registry: Registry, exc: SQLAlchemyError) -> RegistryError:
    msg = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if isinstance(exc, OperationalError) and "locked" in msg:
        return RegistryError(f"registry {registry.shown} is locked by another process: {msg}")
    if isinstance(exc, OperationalError):
        return RegistryError(f"registry {registry.shown} cannot be used: {msg}")
    return RegistryError(f"registry {registry.shown}: {msg}")


def _sqlite_pragmas(dbapi_conn, record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (status, dashboard) never wait for the watcher
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _device(r: Any) -> DeviceRecord:
    m = r._mapping
    return DeviceRecord(fleet=m["fleet"], device=m["device"], online=m["online"], session=m["session"],
                        profile=m["profile"] or "", tags=m["tags"] or {}, models=m["models"] or [],
                        update=m["update_info"], status=m.get("status"), last_error=m["last_error"],
                        first_seen=m["first_seen"], last_seen=m["last_seen"], state_ts=m["state_ts"],
                        status_ts=m["status_ts"])


def _tuning(r: Any) -> TuningRecord:
    m = r._mapping
    return TuningRecord(device=m["device"], model=m["model"], version=m["version"], profile=m["profile"],
                        cpu_model=m["cpu_model"], cpu_class=m["cpu_class"], complete=bool(m["complete"]),
                        seconds=m["seconds"], ts=m["ts"], received=m["received"],
                        chosen=_tuned(m["chosen"]), default=_tuned(m["default_choice"]),
                        candidates=tuple(c for c in map(_tuned, m["candidates"] or []) if c))


def _tuned(d: Any) -> TunedCandidate | None:
    """A candidate as ``apply`` wrote it (checked then); one another edgerun wrote is read as a status is."""
    if isinstance(d, dict) and d.keys() == _TUNED_KEYS and isinstance(d["options"], dict):
        return TunedCandidate(**d)
    return TunedCandidate.from_dict(d)


_TUNED_KEYS = TunedCandidate("", "").to_dict().keys()


_DEVICE_DEFAULTS = {"online": None, "session": None, "profile": "", "tags": {}, "models": [], "update_info": None,
                    "status": None, "last_error": None, "state_ts": None, "status_ts": None}
