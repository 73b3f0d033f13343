"""A registry that goes away mid-rollout: a PostgreSQL server stopped and started again, a SQLite file locked.

The runner keeps the rollout's state in memory, says so once, retries, and goes on when the registry is back;
every device's outcome and every event the devices sent meanwhile end up in the registry.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

import pytest

from edgerun.hub.registry import Registry
from edgerun.hub.rollout import RolloutRunner
from edgerun.testing.fleet import SimFleet
from edgerun.testing.mosquitto import find_mosquitto
from edgerun.testing.postgres import Postgres, find_postgres
from rollout_helpers import Setup, all_on, wait_for

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

KEPT = "the runner keeps the rollout's state and goes on"


class Run:
    """A rollout's runner in a thread, as `hub rollout start` runs it."""

    def __init__(self, runner: RolloutRunner):
        self.runner = runner
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=lambda: self.result.update(final=runner.run()), daemon=True)
        self.thread.start()

    def canary_in_memory(self, state: str) -> bool:
        canary = [d for d in self.runner.devices.values() if d.stage == 0]
        return bool(canary) and all(d.state == state for d in canary)

    def final(self, timeout: float = 90) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the rollout did not end"
        return self.result["final"]


def _nothing_lost(url: str, fleet: str, rid: int, n: int) -> None:
    with Registry(url) as registry:
        devices = registry.rollout_devices(rid)
        assert len(devices) == n and {d.state for d in devices} == {"active"}
        assert all(d.published_at and d.finished_at for d in devices)
        log = [m for _, m in registry.rollout_log(rid)]
        assert sum("the registry could not be used for" in m for m in log) == 1, log
        assert registry.rollout(rid).state == "succeeded"
        active = {e.device for e in registry.events(fleet, model="digits", version=2, limit=10_000)
                  if e.state == "active"}
        assert len(active) == n  # the events sent while the registry was away were written when it came back


@pytest.fixture
def postgres():
    if find_postgres() is None:
        pytest.skip("PostgreSQL is not installed (apt install postgresql)")
    try:
        pg = Postgres().start()
    except RuntimeError as exc:
        pytest.skip(f"cannot start a PostgreSQL server here: {exc}")
    yield pg
    pg.close()


def test_a_postgresql_registry_stopped_mid_rollout_loses_nothing(broker, keys, tmp_path, digits_package, postgres,
                                                                 caplog):
    url = postgres.create_database("hub")
    setup = Setup(broker, keys, tmp_path, digits_package, "outage-pg", url)
    caplog.set_level(logging.WARNING, logger="edgerun.hub.rollout")
    with SimFleet(broker.port, setup.fleet, keys, n=30, seed=21) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        with setup.watch() as w:
            rid = setup.start(w, 2, canary=5, step="50%", bake="0.5s", timeout="60s")
            run = Run(RolloutRunner(setup.registry, w, rid, runner="test:1", tick=0.1))
            wait_for(lambda: any(d.state != "pending" for d in run.runner.devices.values()), what="the canary")
            postgres.stop()
            problem = wait_for(lambda: run.runner.db_error, what="the runner noticing the registry is gone")
            assert "cannot be used" in problem and "Connection refused" in problem
            wait_for(lambda: run.canary_in_memory("active"), what="the canary active, in the runner's memory")
            assert run.thread.is_alive()
            time.sleep(1.5)  # retries while the server is down
            postgres.start()
            final = run.final()
        assert final.state == "succeeded", final.reason
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")
    setup.registry.close()
    _nothing_lost(url, setup.fleet, rid, 30)
    said = [r.getMessage() for r in caplog.records if KEPT in r.getMessage()]
    assert len(said) == 1 and "cannot be used" in said[0], said  # said once, not at every retry


def test_a_sqlite_registry_locked_by_another_process_mid_rollout_loses_nothing(setup, caplog):
    path = setup.db.removeprefix("sqlite:///")
    runner_registry = Registry(setup.db, timeout=0.5)  # gives up on a lock after 0.5 s instead of 10 s
    caplog.set_level(logging.WARNING, logger="edgerun.hub.rollout")
    with setup.sim(n=20, seed=23) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        with setup.watch() as w:
            rid = setup.start(w, 2, canary=4, step="100%", bake="0.3s", timeout="60s")
            run = Run(RolloutRunner(runner_registry, w, rid, runner="test:1", tick=0.1))
            wait_for(lambda: any(d.state != "pending" for d in run.runner.devices.values()), what="the canary")
            lock = sqlite3.connect(path, timeout=5, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
            try:
                problem = wait_for(lambda: run.runner.db_error, what="the runner noticing the lock")
                assert "is locked by another process" in problem
                wait_for(lambda: run.canary_in_memory("active"), what="the canary active, in the runner's memory")
                time.sleep(1.5)
                assert run.thread.is_alive()
                assert setup.registry.rollout(rid).stage == 0  # no stage is promoted without its record
            finally:
                lock.execute("COMMIT")
                lock.close()
            final = run.final()
        assert final.state == "succeeded", final.reason
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")
    runner_registry.close()
    _nothing_lost(setup.db, setup.fleet, rid, 20)
    said = [r.getMessage() for r in caplog.records if KEPT in r.getMessage()]
    assert len(said) == 1 and "locked" in said[0], said
