"""Rollouts by hand from the command line: pause, resume and list while a hub runs the rollout, and pause and
abort when no hub runs it (the command does the work itself)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from edgerun.hub.rollout import RolloutRunner
from edgerun.testing.mosquitto import find_mosquitto
from rollout_helpers import CLI, all_on, wait_for

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


def _row(listing: str, rid: int) -> str:
    return next(line for line in listing.splitlines() if line.strip("│ ").startswith(f"{rid} "))


def test_pause_resume_and_list_reach_the_hub_that_runs_the_rollout(setup):
    with setup.sim(n=12, seed=31) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        setup.known()
        hub = subprocess.Popen([sys.executable, "-c", CLI, "hub", "rollout", "start", "digits", "2", "--canary", "2",
                                "--step", "100%", "--bake", "4s", "--timeout", "60s", *setup.common], env=setup.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            rid = wait_for(lambda: next((r.id for r in setup.registry.rollouts(setup.fleet)), None), timeout=60,
                           what="the rollout on record")
            paused = setup.cli("rollout", "pause", str(rid))
            assert paused.returncode == 0, paused.stderr
            assert f"rollout {rid} is paused (runner " in paused.stdout  # the running hub took the request
            r = setup.registry.rollout(rid)
            assert r.state == "paused" and r.stage == 0 and r.request is None

            listing = setup.cli("rollout", "list")
            assert listing.returncode == 0 and "paused" in _row(listing.stdout, rid)
            assert "digits" in _row(listing.stdout, rid) and "pending" in _row(listing.stdout, rid)

            wait_for(lambda: [d.state for d in setup.registry.rollout_devices(rid) if d.stage == 0] == ["active"] * 2,
                     what="the canary active")  # devices updating when the pause came finish
            time.sleep(5.5)  # longer than the bake: a running rollout would have started its next stage
            r = setup.registry.rollout(rid)
            assert r.state == "paused" and r.stage == 0
            assert sum(d.state == "pending" for d in setup.registry.rollout_devices(rid)) == 10

            resumed = setup.cli("rollout", "resume", str(rid))
            assert resumed.returncode == 0, resumed.stderr
            assert f"rollout {rid} is running (runner " in resumed.stdout
            out, _ = hub.communicate(timeout=90)
        finally:
            if hub.poll() is None:
                hub.kill()
                hub.wait()
        assert hub.returncode == 0, out
        assert f"rollout {rid} succeeded" in out
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")
    listing = setup.cli("rollout", "list")
    assert "succeeded" in _row(listing.stdout, rid) and "12 active" in _row(listing.stdout, rid)
    log = [m for _, m in setup.registry.rollout_log(rid)]
    assert "pause asked by hand" in log and "paused by hand: no new stage starts" in log
    assert "resume asked by hand" in log and "resumed by hand" in log


def test_pause_and_abort_with_no_hub_running_the_rollout_do_the_work_themselves(setup):
    with setup.sim(n=10, seed=33) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        with setup.watch() as w:
            rid = setup.start(w, 2, canary=3, step="100%", bake="10m", runner="gone:1")
            runner = RolloutRunner(setup.registry, w, rid, runner="gone:1", tick=0.1)
            with setup.running(runner):
                wait_for(lambda: setup.registry.rollout(rid).stage_done_at, what="the canary done, baking")
            # that hub is gone
        setup.registry.update_rollout(rid, heartbeat=time.time() - 60)
        canary = {d.device for d in setup.registry.rollout_devices(rid) if d.stage == 0}
        assert all(fleet.devices[d].active["digits"] == 2 for d in canary)

        paused = setup.cli("rollout", "pause", str(rid))
        assert paused.returncode == 0 and f"rollout {rid} is paused" in paused.stdout, paused.stderr
        r = setup.registry.rollout(rid)
        assert r.state == "paused" and r.request is None and r.runner == "gone:1"
        assert "paused by hand, no runner" in [m for _, m in setup.registry.rollout_log(rid)]

        aborted = setup.cli("rollout", "abort", str(rid))
        assert aborted.returncode == 1, aborted.stdout + aborted.stderr  # 1: the rollout was aborted
        assert f"no hub runs rollout {rid}: running it here" in aborted.stdout
        assert f"rollout {rid} aborted: aborted by hand" in aborted.stdout
        wait_for(lambda: all_on(fleet, 1), what="the canary back on v1")
    devices = {d.device: d for d in setup.registry.rollout_devices(rid)}
    assert {d.state for n, d in devices.items() if n in canary} == {"reverted"}
    assert {d.state for n, d in devices.items() if n not in canary} == {"pending"}
    r = setup.registry.rollout(rid)
    assert r.state == "aborted" and r.runner != "gone:1"  # the command ran it, and the record says so
