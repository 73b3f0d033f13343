"""The hub's registry on SQLite and on a real PostgreSQL: records, idempotent writes, rollout ownership, failures."""

from __future__ import annotations

import sqlite3
import time

import pytest

from edgerun.contract import Event, ModelInfo, State, Status
from edgerun.hub.keys import generate
from edgerun.hub.registry import Batch, Registry, RegistryError
from edgerun.manifest import load_private_key, sign
from edgerun.testing.mosquitto import free_port
from edgerun.testing.postgres import drop_database, fresh_database

@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.db'}"
        return
    url = fresh_database()
    if url is None:
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    yield url
    drop_database(url)


@pytest.fixture
def registry(url):
    r = Registry(url)
    yield r
    r.close()


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    d = tmp_path_factory.mktemp("key")
    generate(d, "hub-t")
    return load_private_key(d / "hub-t.key")


def _manifest(key, version: int, created: str = "2026-12-01T10:00:00Z") -> dict:
    unsigned = {"schema": "edgerun.release/1", "model": "digits", "version": version, "created": created,
                "expires": None, "package": {"name": "digits", "version": version},
                "variants": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                              "files": [{"path": "m.onnx", "sha256": "ab" * 32, "size": 10, "chunk_size": 4}]}]}
    return sign(unsigned, key, "hub-t")


def test_a_release_is_recorded_once_with_its_exact_signed_manifest(registry, key):
    signed = _manifest(key, 3)
    first = registry.record_release("f", signed, source="upload", by="ana@hub")
    again = registry.record_release("f", signed, source="publish", by="bob@hub")
    assert first.id == again.id and again.source == "upload" and again.recorded_by == "ana@hub"
    assert again.signed() == signed  # published again byte for byte (same digest) by a rollout
    resigned = registry.record_release("f", _manifest(key, 3, "2026-12-02T10:00:00Z"), source="rollout")
    assert resigned.id != first.id and registry.release("f", "digits", 3).id == resigned.id
    assert [(r.version, r.variants[0]["id"]) for r in registry.releases("f", "digits")] == [(3, "onnx-fp32")] * 2
    assert registry.releases("other") == [] and registry.release("f", "digits", 9) is None


def test_device_writes_are_idempotent_and_a_stale_will_does_not_win(registry):
    now = time.time()
    b = Batch()
    b.states["d1"] = (State(True, 5), now)
    b.statuses["d1"] = (Status("d1", "f", profile="raspberry-pi-4", tags={"site": "berlin"},
                               models=(ModelInfo("digits", 2, "onnx-int8", "onnxruntime"),)), now)
    b.events.append(("d1", Event("digits", 2, "active", "serving v2", 100.0), now))
    registry.apply("f", b)
    registry.apply("f", b)  # a watcher replaying its session, or two hubs watching the same fleet
    late = Batch()
    late.states["d1"] = (State(False, 4), now + 1)  # the last will of an earlier connection, delivered late
    registry.apply("f", late)
    d = registry.device("f", "d1")
    assert (d.online, d.session, d.profile, d.tags) == (True, 5, "raspberry-pi-4", {"site": "berlin"})
    assert d.version_of("digits") == 2 and d.model("digits")["variant"] == "onnx-int8"
    assert [(e.device, e.state) for e in registry.events("f")] == [("d1", "active")]
    gone = Batch()
    gone.states["d1"] = (State(False, 5), now + 2)
    registry.apply("f", gone)
    assert registry.device("f", "d1").online is False


def test_one_rollout_per_model_at_a_time_and_a_live_runner_keeps_it(registry, key):
    rec = registry.record_release("f", _manifest(key, 3), source="upload")
    targets = [("d1", 0, 2, ""), ("d2", 1, 2, "")]
    r = registry.create_rollout("f", "digits", 3, rec.digest, selector=[], plan={}, fleet_wide=True,
                                targets=targets, runner="hub-a:1")
    with pytest.raises(RegistryError, match=f"rollout {r.id} of digits is already in progress"):
        registry.create_rollout("f", "digits", 3, rec.digest, selector=[], plan={}, fleet_wide=True,
                                targets=targets, runner="hub-b:2")
    with pytest.raises(RegistryError, match="being run by hub-a:1"):
        registry.claim_rollout(r.id, "hub-b:2", stale_after=15)
    registry.update_rollout(r.id, heartbeat=time.time() - 60)  # hub-a died a minute ago
    assert registry.claim_rollout(r.id, "hub-b:2", stale_after=15).runner == "hub-b:2"
    with pytest.raises(RegistryError, match="run by another hub"):
        registry.heartbeat(r.id, "hub-a:1")  # the old runner, if it wakes up, must stop
    registry.update_rollout(r.id, state="aborted")
    other = registry.create_rollout("f", "digits", 3, rec.digest, selector=[], plan={}, fleet_wide=True,
                                    targets=targets, runner="hub-b:2")
    assert other.id != r.id and [d.device for d in registry.rollout_devices(other.id)] == ["d1", "d2"]
    assert any("created by" in m for _, m in registry.rollout_log(other.id))


def test_an_unreachable_database_is_a_clear_error_without_the_password(monkeypatch):
    monkeypatch.setenv("EDGERUN_HUB_DB_PASSWORD", "s3cret-pass")
    port = free_port()
    with pytest.raises(RegistryError) as err:
        Registry(f"postgresql://edgerun@127.0.0.1:{port}/hub", timeout=2)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "cannot be used" in message, message
    assert "s3cret-pass" not in message


def test_a_locked_sqlite_database_is_a_clear_error(tmp_path):
    path = tmp_path / "hub.db"
    Registry(f"sqlite:///{path}").close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        r = Registry(f"sqlite:///{path}", create=False, timeout=0.3)
        b = Batch()
        b.states["d1"] = (State(True, 1), time.time())
        with pytest.raises(RegistryError, match="is locked by another process"):
            r.apply("f", b)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    r.apply("f", b)
    assert r.device("f", "d1").online is True


def test_a_registry_written_by_a_newer_edgerun_is_refused(tmp_path):
    path = tmp_path / "hub.db"
    Registry(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE edgerun_meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(RegistryError, match="schema 99, newer than"):
        Registry(f"sqlite:///{path}")
