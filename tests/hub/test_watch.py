"""The fleet watcher keeps the registry current from a real broker, and loses nothing while the database is locked."""

from __future__ import annotations

import sqlite3
import time

import pytest

from edgerun.contract import Event, State, Status, Topics
from edgerun.hub.registry import Registry
from edgerun.hub.watch import FleetWatch
from edgerun.mqtt import Broker, Connection
from edgerun.testing.mosquitto import Mosquitto, find_mosquitto

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


def _say(broker, topics: Topics, n: int, session: int, *, online: bool = True) -> None:
    with Connection(Broker(port=broker.port), persistent=False) as c:
        infos = []
        for i in range(n):
            d = f"d{i:03d}"
            infos.append(c.publish(topics.state(d), State(online, session).to_payload(), retain=True))
            infos.append(c.publish(topics.status(d), Status(d, topics.fleet, session=session, profile="p",
                                                            tags={"ring": str(i % 3)}).to_payload(), retain=True))
            infos.append(c.publish(topics.events(d), Event("digits", session, "active").to_payload()))
        c.wait(infos)


def test_retained_devices_reach_the_registry_and_live_events_follow(broker, tmp_path):
    topics = Topics("w1")
    _say(broker, topics, 50, 1)
    registry = Registry(f"sqlite:///{tmp_path / 'hub.db'}")
    seen = []
    with FleetWatch(Broker(port=broker.port), topics, registry) as w:
        assert len(registry.devices("w1")) == 50  # the retained state and status, synced at start
        w.add_listener(lambda kind, device, obj: seen.append((kind, device)))
        _say(broker, topics, 3, 2)
        deadline = time.monotonic() + 10
        while sum(1 for k, _ in seen if k == "event") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        w.flush()
    d = registry.device("w1", "d001")
    assert d.session == 2 and d.tags == {"ring": "1"} and d.online is True
    assert [(e.device, e.version) for e in registry.events("w1", version=2)] == [("d000", 2), ("d001", 2), ("d002", 2)]
    assert ("event", "d000") in seen and ("state", "d000") in seen


def test_a_locked_database_keeps_the_updates_until_it_is_free(broker, tmp_path):
    topics = Topics("w2")
    path = tmp_path / "hub.db"
    registry = Registry(f"sqlite:///{path}", timeout=0.2)
    with FleetWatch(Broker(port=broker.port), topics, registry) as w:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the database
        _say(broker, topics, 20, 7)
        deadline = time.monotonic() + 10
        while w.db_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.db_error and "locked" in w.db_error
        holder.execute("ROLLBACK")
        holder.close()
        deadline = time.monotonic() + 20
        while (w.db_error or len(registry.devices("w2")) < 20) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(registry.devices("w2")) == 20 and all(d.session == 7 for d in registry.devices("w2"))
    assert len(registry.events("w2")) == 20  # every event written once the lock was gone
