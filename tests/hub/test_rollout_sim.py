"""Staged rollouts over simulated fleets: promotion, the failure gate, time-outs, pause, bad input, a hub crash.

The staged rollout and the abort at the first gate also run with the registry on PostgreSQL (the watcher and
the runner write there), when a server runs on 127.0.0.1:5432.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from edgerun.contract import State, Status
from edgerun.hub.rollout import Plan, RolloutError, RolloutRunner, request, start_rollout
from edgerun.hub.select import SelectorError
from edgerun.mqtt import Broker, Connection
from edgerun.testing.mosquitto import find_mosquitto
from rollout_helpers import CLI, all_on, wait_for

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

REGISTRIES = pytest.mark.parametrize("setup", ["sqlite", "postgresql"], indirect=True)


@REGISTRIES
def test_a_staged_rollout_reaches_every_device_stage_after_stage(setup):
    with setup.sim(n=200, seed=1) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        final, progress = setup.rollout(2, canary=5, step="50%", bake="0.3s", max_failures="10%", timeout="30s")
        assert final.state == "succeeded", final.reason
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")
    devices = setup.registry.rollout_devices(final.id)
    assert [sum(1 for d in devices if d.stage == s) for s in range(3)] == [5, 100, 95]
    for s in (1, 2):  # no device of a stage was published before the stage before it had finished and baked
        done = max(d.finished_at for d in devices if d.stage == s - 1)
        assert min(d.published_at for d in devices if d.stage == s) >= done + 0.3
    assert {d.state for d in devices} == {"active"}
    assert progress[-1].rollout.state == "succeeded"
    log = [m for _, m in setup.registry.rollout_log(final.id)]
    assert any("stage 1:" in m and "baking" in m for m in log) and "succeeded" in log[-1]


@REGISTRIES
def test_injected_failures_abort_at_the_first_gate_and_the_canary_rolls_back(setup):
    with setup.sim(n=100, seed=3, fail_mode="spread") as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        fleet.fail_rate = 0.2  # from now on exactly one update in five fails: two in a canary of 10
        setup.upload(2)
        final, _ = setup.rollout(2, canary=10, step="25%", bake="0.3s", max_failures="10%", timeout="30s")
        assert final.state == "aborted" and "finished device(s) failed" in final.reason, final.reason
        devices = {d.device: d for d in setup.registry.rollout_devices(final.id)}
        assert {d.stage for d in devices.values() if d.state != "pending"} == {0}  # stopped at the first gate
        assert all(d.state in ("reverted", "pending") for d in devices.values()), \
            {d.device: d.state for d in devices.values()}
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere again")
        canary = [d for d in devices.values() if d.stage == 0]
        assert len(canary) == 10 and sum(fleet.will_fail(d.device, 2) for d in canary) == 2
        log = [m for _, m in setup.registry.rollout_log(final.id)]
        assert not any("stage 2 starts" in m for m in log), log
    with Connection(Broker(port=setup.broker.port), persistent=False) as c:
        left = c.collect([setup.topics.releases_filter("+")], quiet=0.5)
    assert not any(left.values()), "the per-device releases of the canary were not put back"


def test_an_abort_brings_back_devices_whose_version_the_hub_had_not_heard_to_the_fleet_release(setup):
    """A device whose status had not reached the hub when the rollout started has no version recorded before
    it; with its own release cleared it follows the fleet's release again, and the abort waits for that."""
    with setup.sim(n=10, seed=3, fail_mode="spread") as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        fleet.fail_rate = 0.2
        setup.upload(2)
        with setup.watch() as w:
            rid = setup.start(w, 2, canary=10, bake="0.3s", max_failures="10%", timeout="30s")
            names = [d.device for d in setup.registry.rollout_devices(rid)]
            setup.registry.set_rollout_devices(rid, [(n, {"before_version": None}) for n in names])
            final = RolloutRunner(setup.registry, w, rid, runner="test:1", tick=0.1).run()
        assert final.state == "aborted", final.reason
        devices = setup.registry.rollout_devices(rid)
        assert {d.state for d in devices} == {"reverted"}, {d.device: (d.state, d.detail) for d in devices}
        assert all("the fleet's release names v1" in d.detail and d.before_version == 1 for d in devices)
        assert all_on(fleet, 1)


def test_the_gate_judges_the_devices_that_finished_once_enough_did_and_at_each_stage_end():
    plan = Plan.parse(canary=10, step="25%", max_failures="10%", min_finished=10)
    assert plan.gate(1, 10, stage_over=True) is None  # one failure in a canary of 10 is allowed
    assert plan.gate(2, 10, stage_over=True) == ("2 of 10 finished device(s) failed, timed out or were rejected: "
                                                 "more than 10%")
    # stage 2 published (260 devices): the share is of those finished, not of those published
    assert plan.gate(3, 14, stage_over=False) is not None
    assert plan.gate(1, 5, stage_over=False) is None  # too few finished to judge a share yet ...
    assert plan.gate(1, 5, stage_over=True) is not None  # ... but a stage is never promoted past its gate
    assert Plan.parse(max_failures="2").gate(3, 3, stage_over=False) is not None  # a count is judged at once
    with pytest.raises(RolloutError, match="--min-finished: expected 1 or more"):
        Plan.parse(min_finished=0)


def test_devices_that_never_answer_time_out_and_count_as_failures(setup):
    silent = {"sim-0003", "sim-0007"}
    with setup.sim(n=10, seed=5) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        fleet.silent_devices |= silent  # two devices hang from now on
        setup.upload(2)
        final, _ = setup.rollout(2, canary=10, bake="0s", max_failures="1", timeout="2s")
    devices = {d.device: d for d in setup.registry.rollout_devices(final.id)}
    assert final.state == "aborted" and "2 of 10" in final.reason, final.reason
    assert {n for n, d in devices.items() if d.detail.startswith("timed_out")} == silent
    assert all(devices[n].state == "reverted" for n in silent)  # they never left v1, and their release names it
    assert fleet.devices["sim-0003"].active["digits"] == 1


def test_a_paused_rollout_starts_no_stage_until_resumed(setup):
    with setup.sim(n=20, seed=7) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        with setup.watch() as w:
            start = start_rollout(setup.registry, w, setup.key, "hub-t", "digits", 2, selector=[],
                                  plan=Plan.parse(canary=2, step="100%", bake="0.2s"), runner="test:1")
            runner = RolloutRunner(setup.registry, w, start.rollout.id, runner="test:1", tick=0.1)
            with setup.running(runner) as thread:
                request(setup.registry, start.rollout.id, "pause")
                wait_for(lambda: setup.registry.rollout(start.rollout.id).state == "paused", what="paused")
                time.sleep(1.5)  # the canary finishes and bakes, but the next stage waits
                devices = setup.registry.rollout_devices(start.rollout.id)
                assert len(devices) == 20
                assert sum(1 for d in devices if d.state == "pending") >= 18, [d.state for d in devices]
                request(setup.registry, start.rollout.id, "resume")
                thread.join(30)
        assert setup.registry.rollout(start.rollout.id).state == "succeeded"
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")


def test_bad_rollouts_are_refused_with_a_clear_message(setup):
    with setup.sim(n=5, seed=9) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        with setup.watch() as w:
            def start(version, selector=()):
                return start_rollout(setup.registry, w, setup.key, "hub-t", "digits", version, selector=list(selector),
                                     plan=Plan(), runner="test:1")

            with pytest.raises(RolloutError, match=r"no release of digits v7 .* \(its versions: v1\); upload it first"):
                start(7)
            with pytest.raises(RolloutError, match=r"no model 'digitz' in the registry .* \(models released: "
                                                   r"digits\); upload it first"):
                start_rollout(setup.registry, w, setup.key, "hub-t", "digitz", 1, selector=[], plan=Plan(),
                              runner="test:1")
            setup.upload(2)
            with pytest.raises(RolloutError, match="no device of fleet .* matches tag:site=mars"):
                start(2, ["tag:site=mars"])
            with pytest.raises(SelectorError, match="expected tag:NAME=VALUE"):
                start(2, ["site=berlin"])
            first = start(2)
            with pytest.raises(RolloutError, match=f"rollout {first.rollout.id} of digits v2 is already running"):
                start(2)
    for args, code, says in ((["digitz", "1"], 65, "no model 'digitz'"),
                             (["digits", "9"], 65, "no release of digits v9"),
                             (["digits", "2", "--select", "site=x"], 65, "expected tag:NAME=VALUE")):
        r = setup.cli("rollout", "start", *args)
        assert r.returncode == code and says in r.stderr, (args, r.returncode, r.stderr)
    assert [r.state for r in setup.registry.rollouts(setup.fleet)] == ["running"]  # only the first, nothing more
    with pytest.raises(RolloutError, match="--step: expected a count or a percentage"):
        Plan.parse(step="a quarter")
    with pytest.raises(RolloutError, match="expected a duration"):
        Plan.parse(bake="soon")


def test_devices_on_an_older_contract_are_skipped_for_a_release_they_would_refuse(setup):
    old = {"old-11": "1.1", "old-10": None}  # None: a status without "contract", as 1.0 devices send it
    with setup.sim(n=4, seed=13) as fleet, \
            Connection(Broker(port=setup.broker.port), persistent=False) as c:
        for name, contract in old.items():
            data = Status(name, setup.fleet, 1, "raspberry-pi-4", contract=contract or "1.0").to_dict()
            if contract is None:
                del data["contract"]
            c.wait([c.publish(setup.topics.state(name), State(True, 1).to_payload(), retain=True),
                    c.publish(setup.topics.status(name), json.dumps(data).encode(), retain=True)])
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2, edit=lambda m: m["variants"][0].update(info={"made": "by the test"}))  # a 1.2 member
        setup.upload(3)  # nothing 1.2 added
        with setup.watch() as w:
            start = start_rollout(setup.registry, w, setup.key, "hub-t", "digits", 2, selector=[], plan=Plan(),
                                  runner="test:1")
            skipped = dict(start.skipped)
            assert set(skipped) == set(old)
            assert skipped["old-11"].startswith("speaks contract 1.1; this release needs 1.2")
            assert skipped["old-10"].startswith("speaks contract 1.0; this release needs 1.2")
            assert len(setup.registry.rollout_devices(start.rollout.id)) == 4
            request(setup.registry, start.rollout.id, "abort")
            setup.registry.update_rollout(start.rollout.id, state="aborted", request=None)
            with pytest.raises(RolloutError, match="no selected device can take digits v2: old-1"):
                start_rollout(setup.registry, w, setup.key, "hub-t", "digits", 2, selector=["devices=old-*"],
                              plan=Plan(), runner="test:1")
            start = start_rollout(setup.registry, w, setup.key, "hub-t", "digits", 3, selector=["devices=old-*"],
                                  plan=Plan(), runner="test:1")
            assert not start.skipped  # a release they can take goes to them as before
    rows = {r["device"]: r["contract"] for r in json.loads(setup.cli("status", "--offline", "--json").stdout)}
    assert rows["old-11"] == "1.1" and rows["old-10"] == "1.0" and rows["sim-0000"] == "1.4"


def test_a_hub_killed_mid_rollout_loses_nothing_and_resume_finishes_it(setup):
    with setup.sim(n=30, seed=11) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        setup.upload(2)
        setup.known()
        env, common = setup.env(), setup.common
        hub = subprocess.Popen([sys.executable, "-c", CLI, "hub", "rollout", "start", "digits", "2", "--canary", "3",
                                "--step", "50%", "--bake", "2s", *common], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: any("baking" in m for _, m in setup.registry.rollout_log(1)), timeout=60,
                     what="the canary baking")
            hub.send_signal(signal.SIGKILL)
            hub.wait()
        finally:
            hub.kill()
        r = setup.registry.rollout(1)
        assert r.state == "running" and r.stage == 0
        refused = subprocess.run([sys.executable, "-c", CLI, "hub", "rollout", "resume", "1", *common], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 69 and "is being run by" in refused.stderr and "--force" in refused.stderr
        resumed = subprocess.run([sys.executable, "-c", CLI, "hub", "rollout", "resume", "1", "--force", *common],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "succeeded" in resumed.stdout
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")
    devices = setup.registry.rollout_devices(1)
    assert {d.state for d in devices} == {"active"} and len(devices) == 30
    status = json.loads(subprocess.run([sys.executable, "-c", CLI, "hub", "rollout", "status", "1", "--json", *common],
                                       env=env, capture_output=True, text=True, timeout=60).stdout)
    assert status["rollout"]["state"] == "succeeded"
    assert any("run by" in m for _, m in status["log"][1:])  # the resuming hub took it over, on the record
