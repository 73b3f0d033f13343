"""Staged rollouts on real `edgerun serve` devices: stages, the fleet release moved at the end, roll-back."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from mqtt_helpers import make_package


def _registry(hub):
    from edgerun.hub.registry import Registry

    return Registry(hub.db)


def _devices(device_factory, n: int, tags: dict[str, str] | None = None):
    devs = []
    for i in range(n):
        d = device_factory(f"dev{i + 1}")
        if tags:
            d.config.write_text(d.config.read_text() + "tags = {" + ", ".join(f'{k} = "{v}"' for k, v in tags.items())
                                + "}\n")
        devs.append(d.start())
    return devs


def test_a_rollout_updates_stage_by_stage_then_moves_the_fleet_release(tmp_path, hub, watcher, device_factory,
                                                                       keydir):
    devs = _devices(device_factory, 3)
    key = str(keydir / "hub-test.key")
    assert hub.cli("publish", str(make_package(tmp_path / "v1", 1).root), "--fleet", hub.fleet, "--key",
                   key).returncode == 0
    for d in devs:
        d.wait_version(1)
    r = hub.cli("upload", str(make_package(tmp_path / "v2", 2).root), "--fleet", hub.fleet, "--key", key)
    assert r.returncode == 0 and "no device sees it yet" in r.stdout, r.stdout + r.stderr
    time.sleep(1.0)
    assert all(d.versions() == [1] for d in devs), "an uploaded release reached a device"

    r = hub.cli("rollout", "start", "digits", "2", "--fleet", hub.fleet, "--key", key, "--canary", "1",
                "--step", "1", "--bake", "0.5s", "--timeout", "60s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout
    for d in devs:
        d.wait_version(2)
    firsts = sorted((e["ts"], e["state"]) for e in watcher.events if e["version"] == 2 and e["state"] == "queued")
    assert len(firsts) == 3  # one device at a time: each stage waited for the one before
    actives = sorted(e["ts"] for e in watcher.events if e["version"] == 2 and e["state"] == "active")
    assert actives[0] <= firsts[1][0] and actives[1] <= firsts[2][0], (firsts, actives)

    with hub.client() as c:
        retained = c.collect([hub.topics.releases_filter(), hub.topics.releases_filter("+")], quiet=0.5)
    assert json.loads(retained[hub.topics.release("digits")])["version"] == 2  # the fleet's release moved
    assert not any(p for t, p in retained.items() if "/devices/" in t), "per-device releases were left behind"

    status = json.loads(hub.cli("rollout", "status", "--fleet", hub.fleet, "--json").stdout)
    assert status["rollout"]["state"] == "succeeded"
    assert [d["state"] for d in status["devices"]] == ["active"] * 3
    assert [d["stage"] for d in status["devices"]] == [0, 1, 2]
    rels = json.loads(hub.cli("releases", "digits", "--fleet", hub.fleet, "--json").stdout)
    assert [(r["version"], r["source"]) for r in rels] == [(1, "publish"), (2, "upload"), (2, "rollout")]
    assert all(r["key_id"] == "hub-test" and r["variants"][0]["files"][0]["sha256"] for r in rels)
    history = hub.cli("history", "digits", "--fleet", hub.fleet)
    assert history.returncode == 0 and "succeeded" in history.stdout, history.stdout


def test_aborting_by_hand_rolls_the_updated_devices_back(tmp_path, hub, watcher, device_factory, keydir):
    devs = _devices(device_factory, 2, tags={"site": "lab"})
    key = str(keydir / "hub-test.key")
    assert hub.cli("publish", str(make_package(tmp_path / "v1", 1).root), "--fleet", hub.fleet, "--key",
                   key).returncode == 0
    for d in devs:
        d.wait_version(1)
    assert hub.cli("upload", str(make_package(tmp_path / "v2", 2).root), "--fleet", hub.fleet, "--key",
                   key).returncode == 0
    cmd = [sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", "hub", "rollout",
           "start", "digits", "2", "--fleet", hub.fleet, "--key", key, "--select", "tag:site=lab", "--canary", "1",
           "--step", "100%", "--bake", "120s", "--host", "127.0.0.1", "--port", str(hub.broker.port)]
    runner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**__import__("os").environ, "EDGERUN_HUB_DB": hub.db})
    try:
        watcher.event(2, ("active",), timeout=60)  # the canary runs v2 and the stage bakes
        served = {d.name: d.versions() for d in devs}
        assert sorted(served.values()) == [[1], [2]], served
        r = hub.cli("rollout", "abort", "1", "--fleet", hub.fleet)
        assert r.returncode == 0, r.stdout + r.stderr
        out, _ = runner.communicate(timeout=60)
        assert runner.returncode == 1 and "aborted" in out, out
    finally:
        runner.kill()
    for d in devs:
        d.wait_version(1)  # the canary is back on its kept version; the other never moved
    canary = next(n for n, v in served.items() if v == [2])
    back = [e for e in watcher.events if e["version"] == 1 and e["state"] == "staged" and "rolls back" in e["detail"]]
    assert len(back) == 1, "the canary did not switch back to its kept version (explicit roll-back, no download)"
    status = json.loads(hub.cli("rollout", "status", "1", "--fleet", hub.fleet, "--json").stdout)
    states = {d["device"]: d["state"] for d in status["devices"]}
    assert states == {canary: "reverted", next(n for n in served if n != canary): "pending"}, states
    assert status["rollout"]["state"] == "aborted" and "by hand" in status["rollout"]["reason"]
    with hub.client() as c:
        retained = c.collect([hub.topics.releases_filter("+")], quiet=0.5)
    assert not any(retained.values()), "the canary's per-device release was not restored"
