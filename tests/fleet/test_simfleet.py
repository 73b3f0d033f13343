"""The simulated fleet as a hub sees it: plain paho clients watching ``edgerun/v1/{fleet}/devices/#``."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgerun.contract import Event, State, Status, Topics
from edgerun.hub.publish import build_manifest, encode
from edgerun.manifest import load_private_key, sign
from edgerun.package import ModelPackage
from edgerun.testing.fleet import PROFILES, SimFleet
from edgerun.testing.models import tiny_package

MODEL = "m"
FAST = (0.01, 0.03)  # step delays of the small fleets
BIG = 1000


# --- a hub: packages, signed releases, a watcher -------------------------------------------------

class Hub:
    """Publishes retained releases with a plain paho client."""

    def __init__(self, port: int, fleet: str, keydir: Path):
        self.topics = Topics(fleet)
        self.key = load_private_key(keydir / "hub-test.key")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hub-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def signed(self, pkg: ModelPackage, key: Any = None, key_id: str = "hub-test", created: str | None = None) -> dict:
        """A signed manifest; another ``created`` makes another publish (digest) of the same release."""
        unsigned = build_manifest(pkg)
        if created:
            unsigned["created"] = created
        return sign(unsigned, key or self.key, key_id)

    def publish(self, manifest: dict | bytes, model: str = MODEL, device: str | None = None) -> None:
        payload = manifest if isinstance(manifest, bytes) else encode(manifest)
        info = self.client.publish(self.topics.release(model, device), payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()  # wakes the network thread, which then ends
        self.client.loop_stop()


class Watcher:
    """Every device's state, status and events, as a hub subscribed to ``devices/#`` receives them."""

    def __init__(self, port: int, fleet: str):
        self.topics = Topics(fleet)
        self.state: dict[str, State] = {}
        self.status: dict[str, Status] = {}
        self.events: list[tuple[float, str, Event]] = []  # (time received, device, event)
        self.retained: set[str] = set()  # topics that arrived with the retain flag
        self.bad: list[str] = []  # topics whose payload did not parse
        self._lock = threading.RLock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *a: c.subscribe(f"{self.topics.prefix}/devices/#", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        ref = self.topics.parse(msg.topic)
        if ref is None or ref.kind not in ("state", "status", "events"):
            return
        with self._lock:
            if msg.retain:
                self.retained.add(msg.topic)
            if ref.kind == "state" and (s := State.from_payload(msg.payload)):
                self.state[ref.device] = s
            elif ref.kind == "status" and (st := Status.from_payload(msg.payload)):
                self.status[ref.device] = st
            elif ref.kind == "events" and (e := Event.from_payload(msg.payload)):
                self.events.append((time.monotonic(), ref.device, e))
            else:
                self.bad.append(msg.topic)

    def wait_for(self, pred: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
        """Poll ``pred`` (under the lock) every 50 ms: a thousand devices' messages never wait for a scan."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    def final(self, version: int, since: int = 0, model: str = MODEL) -> dict[str, Event]:
        """Device -> its last final event for ``version`` (from the ``since``-th event on)."""
        with self._lock:
            return {d: e for _, d, e in self.events[since:] if e.model == model and e.version == version
                    and e.state in ("active", "failed", "rejected", "retired")}

    def wait_final(self, version: int, devices: int, since: int = 0, timeout: float = 20) -> dict[str, Event]:
        return self.wait_for(lambda: len(got := self.final(version, since)) >= devices and got, timeout,
                             f"{devices} devices final on v{version}")

    def states(self, device: str, since: int = 0) -> list[tuple[int, str]]:
        with self._lock:
            return [(e.version, e.state) for _, d, e in self.events[since:] if d == device]

    def close(self) -> None:
        self.client.disconnect()  # wakes the network thread, which then ends
        self.client.loop_stop()


def retained(port: int, fleet: str, expect: int, timeout: float = 15) -> dict[str, dict[str, bytes]]:
    """What a hub connecting now gets: kind (state, status) -> device -> retained payload."""
    topics, got, lock = Topics(fleet), {"state": {}, "status": {}}, threading.Lock()

    def on_message(client, userdata, msg) -> None:
        ref = topics.parse(msg.topic)
        if msg.retain and ref is not None and ref.kind in got:
            with lock:
                got[ref.kind][ref.device] = msg.payload

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:8]}")
    c.on_connect = lambda cl, *a: cl.subscribe(f"{topics.prefix}/devices/#", qos=1)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + timeout
    while min(map(len, got.values())) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # nothing more is coming
    c.disconnect()
    c.loop_stop()
    return got


@pytest.fixture
def hub(broker, fleet_name, keydir) -> Iterator[Hub]:
    h = Hub(broker.port, fleet_name, keydir)
    yield h
    h.close()


@pytest.fixture
def watcher(broker, fleet_name) -> Iterator[Watcher]:
    w = Watcher(broker.port, fleet_name)
    yield w
    w.close()


@pytest.fixture
def small(broker, fleet_name, keydir, watcher) -> Iterator[Callable[..., SimFleet]]:
    """Start a small in-process fleet (fast steps); it is stopped after the test."""
    made: list[SimFleet] = []

    def make(n: int = 6, **kw: Any) -> SimFleet:
        f = SimFleet(broker.port, fleet_name, keydir, n, step_delay=kw.pop("step_delay", FAST), **kw).start()
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


def released(hub: Hub, watcher: Watcher, fleet: SimFleet, pkg: ModelPackage) -> dict:
    """Publish ``pkg`` fleet-wide and wait until every device answered it."""
    signed = hub.signed(pkg)
    since = len(watcher.events)
    hub.publish(signed)
    watcher.wait_final(pkg.version, len(fleet.devices), since)
    return signed


# --- a thousand devices in their own process ----------------------------------------------------

@dataclass
class BigFleet:
    name: str
    proc: subprocess.Popen
    ps: psutil.Process
    watcher: Watcher
    ready: dict
    predicted: SimFleet  # never started, no devices: the same seed and fail rate say who fails


def cpu(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def peak_rss(ps: psutil.Process) -> int:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{ps.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return ps.memory_info().rss


@pytest.fixture(scope="module")
def big(broker, keydir, tmp_path_factory, measured) -> Iterator[BigFleet]:
    name = f"b{uuid.uuid4().hex[:8]}"
    watcher = Watcher(broker.port, name)
    args = ["--port", str(broker.port), "--fleet", name, "--trusted-keys", str(keydir), "--devices", str(BIG),
            "--fail-rate", "0.2", "--seed", "1"]
    err = open(tmp_path_factory.mktemp("bigfleet") / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.testing.fleet", *args], stdout=subprocess.PIPE,
                            stderr=err, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if not line:
            err.seek(0)
            pytest.fail(f"the fleet process did not get ready: {err.read()[-2000:]}")
        ps = psutil.Process(proc.pid)
        measured["connect_seconds"] = json.loads(line)["seconds"]
        watcher.wait_for(lambda: len(watcher.status) >= BIG and len(watcher.state) >= BIG, 20, "1000 births")
        c0 = cpu(ps)
        time.sleep(3.0)
        measured["idle_cpu_cores"] = round((cpu(ps) - c0) / 3.0, 4)
        yield BigFleet(name, proc, ps, watcher, json.loads(line),
                       SimFleet(broker.port, name, keydir, 0, fail_rate=0.2, seed=1))
        measured["peak_rss_mb"] = round(peak_rss(ps) / 2 ** 20, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        watcher.close()
        err.close()


def test_a_thousand_devices_come_online_with_retained_state_and_status(broker, big, measured):
    assert big.ready == {"ready": True, "devices": BIG, "seconds": big.ready["seconds"]}
    got = retained(broker.port, big.name, BIG)
    states, statuses = got["state"], got["status"]
    names = {f"sim-{i:04d}" for i in range(BIG)}
    assert set(states) == set(statuses) == names
    for device, payload in states.items():
        s = State.from_payload(payload)
        assert s is not None and s.online and s.session >= 1, (device, payload)
    parsed = {d: Status.from_payload(p) for d, p in statuses.items()}
    assert all(st is not None and st.device == d and st.fleet == big.name for d, st in parsed.items())
    assert {st.profile for st in parsed.values()} == set(PROFILES)
    assert {st.tags["site"] for st in parsed.values()} == {"ams", "fra", "lis", "waw"}
    assert 50 < sum(st.tags["ring"] == "canary" for st in parsed.values()) < 150
    assert all(st.memory["rss_bytes"] > 0 and st.backends for st in parsed.values())
    assert not big.watcher.bad
    assert big.ready["seconds"] < 30
    measured["connected"] = BIG


def test_a_fleet_release_reaches_all_thousand_and_the_predicted_ones_fail(tmp_path, broker, keydir, big, measured):
    hub = Hub(broker.port, big.name, keydir)
    w = big.watcher
    since = len(w.events)
    c0, t0 = cpu(big.ps), time.monotonic()
    try:
        hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1)))
        final = w.wait_final(1, BIG, since, timeout=40)
    finally:
        hub.close()
    took = time.monotonic() - t0
    measured["release_seconds"] = round(took, 2)
    measured["release_cpu_cores"] = round((cpu(big.ps) - c0) / took, 3)
    predicted = {d for i in range(BIG) if big.predicted.will_fail(d := f"sim-{i:04d}", 1)}
    failed = {d for d, e in final.items() if e.state == "failed"}
    assert failed == predicted and 100 < len(failed) < 300
    assert {e.state for d, e in final.items() if d not in predicted} == {"active"}
    assert all("simulated failure" in final[d].detail for d in failed)
    ok, bad = sorted(set(final) - failed)[0], sorted(failed)[0]
    steps = ["queued", "downloading", "verifying", "staged", "warming"]
    assert [s for _, s in w.states(ok, since)] == steps + ["active"]
    assert [s for _, s in w.states(bad, since)] == steps + ["failed"]
    w.wait_for(lambda: all(st.updates.get(MODEL) and st.updates[MODEL].state in ("active", "failed")
                           for st in w.status.values()), 10, "final statuses")
    for d, st in w.status.items():
        assert [(m.name, m.version) for m in st.models] == ([] if d in failed else [(MODEL, 1)])
        assert st.update is not None and st.update.state == ("failed" if d in failed else "active")
        assert (st.update.error is not None) == (d in failed)
    measured["failed_as_predicted"] = len(failed)


# --- behaviour, on small in-process fleets -----------------------------------------------------

def test_one_thread_drives_every_client_and_counts_sum_up(small):
    before = threading.active_count()
    fleet = small(200)
    assert threading.active_count() - before == 1
    c = fleet.counts()
    assert c["devices"] == c["online"] == c["ready"] == 200 and c["active"] == {}
    assert fleet.messages_sent >= 400  # a birth state and a status each
    assert all(d.session == 1 for d in fleet.devices.values())


def test_device_release_overrides_the_fleet_release_for_that_device_only(tmp_path, hub, watcher, small):
    fleet = small(8)
    released(hub, watcher, fleet, tiny_package(tmp_path / "v1", 1))
    since = len(watcher.events)
    hub.publish(hub.signed(tiny_package(tmp_path / "v2", 2)), device="sim-0003")
    assert watcher.wait_final(2, 1, since)["sim-0003"].state == "active"
    time.sleep(0.3)
    assert {d for _, d, _e in watcher.events[since:]} == {"sim-0003"}
    assert {d: dev.active for d, dev in fleet.devices.items() if dev.active != {MODEL: 1}} == {"sim-0003": {MODEL: 2}}
    st = watcher.wait_for(lambda: (s := watcher.status.get("sim-0003")) and s.model(MODEL).version == 2 and s,
                          what="status v2")
    assert st.updates[MODEL].state == "active" and "v1 kept for rollback" in st.updates[MODEL].detail


def test_retained_override_wins_over_the_fleet_release_at_start(broker, fleet_name, keydir, tmp_path, hub, watcher,
                                                               small):
    hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1)))
    hub.publish(hub.signed(tiny_package(tmp_path / "v2", 2)), device="sim-0002")
    fleet = small(4)  # both retained before the devices connect: the settle second sees both
    watcher.wait_final(1, 3)
    assert watcher.wait_final(2, 1)["sim-0002"].state == "active"
    assert watcher.states("sim-0002") == [(2, s) for s in ("queued", "downloading", "verifying", "staged", "warming",
                                                            "active")]
    assert {d: dev.active[MODEL] for d, dev in fleet.devices.items()} == \
        {"sim-0000": 1, "sim-0001": 1, "sim-0002": 2, "sim-0003": 1}


def test_clearing_the_override_rolls_the_device_back_to_the_fleet_version(tmp_path, hub, watcher, small):
    fleet = small(4)
    released(hub, watcher, fleet, tiny_package(tmp_path / "v1", 1))
    hub.publish(hub.signed(tiny_package(tmp_path / "v2", 2)), device="sim-0001")
    watcher.wait_final(2, 1)
    since = len(watcher.events)
    hub.publish(b"", device="sim-0001")  # the canary is withdrawn: the fleet's v1 applies again
    watcher.wait_for(lambda: (1, "active") in watcher.states("sim-0001", since), what="v1 active again")
    assert watcher.states("sim-0001", since) == [(1, "staged"), (1, "warming"), (1, "active")]
    assert "rolls back" in next(e for _, d, e in watcher.events[since:] if e.state == "staged").detail
    assert fleet.devices["sim-0001"].active == {MODEL: 1}
    time.sleep(0.3)
    assert {d for _, d, _e in watcher.events[since:]} == {"sim-0001"}


def test_unsigned_tampered_and_unknown_key_releases_are_rejected_once(tmp_path, hub, watcher, small, rogue_keydir):
    fleet = small(4)
    released(hub, watcher, fleet, tiny_package(tmp_path / "v1", 1))
    pkg = tiny_package(tmp_path / "v2", 2)
    tampered = hub.signed(pkg)
    tampered["variants"][0]["accuracy"] = 0.999
    unsigned = build_manifest(pkg)
    rogue = hub.signed(pkg, load_private_key(rogue_keydir / "rogue.key"), "rogue")
    since = len(watcher.events)
    for device, manifest in (("sim-0000", tampered), ("sim-0001", unsigned), ("sim-0002", rogue)):
        hub.publish(manifest, device=device)
    got = watcher.wait_final(2, 3, since)
    assert {d: e.state for d, e in got.items()} == dict.fromkeys(["sim-0000", "sim-0001", "sim-0002"], "rejected")
    assert "bad signature" in got["sim-0000"].detail
    assert "unsigned manifest" in got["sim-0001"].detail
    assert "unknown key 'rogue'" in got["sim-0002"].detail
    assert all(fleet.devices[d].active == {MODEL: 1} for d in got)
    st = watcher.wait_for(lambda: (s := watcher.status.get("sim-0000")) and s.update.state == "rejected" and s,
                          what="rejected status")
    assert st.update.error == got["sim-0000"].detail and st.model(MODEL).version == 1

    fleet.set_offline("sim-0000")  # the retained bad release comes again after the reconnect: no second event
    fleet.set_online("sim-0000")
    watcher.wait_for(lambda: (s := watcher.state.get("sim-0000")) and s.online and s.session == 2, what="online")
    time.sleep(1.5)  # the settle second, then the release would be acted on
    assert [s for _, s in watcher.states("sim-0000", since)] == ["rejected"]


def test_kept_version_rolls_back_and_an_older_one_is_a_downgrade(tmp_path, hub, watcher, small):
    fleet = small(2)
    signed = {v: released(hub, watcher, fleet, tiny_package(tmp_path / f"v{v}", v)) for v in (1, 2, 3)}
    since = len(watcher.events)
    hub.publish(signed[2])  # the kept previous version named again: an explicit roll-back
    watcher.wait_final(2, 2, since)
    assert watcher.states("sim-0000", since) == [(2, "staged"), (2, "warming"), (2, "active")]
    since = len(watcher.events)
    hub.publish(signed[1])  # a release these devices already handled: nothing
    time.sleep(0.4)
    assert watcher.events[since:] == []
    hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1), created="2030-01-01T00:00:00Z"))
    got = watcher.wait_final(1, 2, since)  # v1 was pruned when v3 came: an ordinary downgrade
    assert {e.state for e in got.values()} == {"rejected"}
    assert "downgrade: v1 is not newer than the active v2" in got["sim-0001"].detail
    assert all(d.active == {MODEL: 2} for d in fleet.devices.values())


def test_a_newer_release_supersedes_the_update_in_progress(tmp_path, hub, watcher, small):
    fleet = small(4, step_delay=(0.3, 0.3))
    hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1)))
    watcher.wait_for(lambda: len({d for _, d, e in watcher.events if e.state == "queued"}) == 4, what="v1 queued")
    hub.publish(hub.signed(tiny_package(tmp_path / "v2", 2)))
    got = watcher.wait_final(2, 4)
    assert {e.state for e in got.values()} == {"active"}
    for d in fleet.devices:
        v1 = [s for v, s in watcher.states(d) if v == 1]
        assert v1 in (["queued", "failed"], ["queued", "downloading", "failed"]), (d, v1)
    assert all("superseded" in e.detail for e in watcher.final(1).values())
    assert all(d.active == {MODEL: 2} for d in fleet.devices.values())


def test_empty_fleet_release_retires_the_model(tmp_path, hub, watcher, small):
    fleet = small(3)
    released(hub, watcher, fleet, tiny_package(tmp_path / "v1", 1))
    since = len(watcher.events)
    hub.publish(b"")
    got = watcher.wait_final(1, 3, since)
    assert {e.state for e in got.values()} == {"retired"}
    watcher.wait_for(lambda: all(not st.models and st.update.state == "retired" for st in watcher.status.values()),
                     what="statuses without the model")
    assert all(d.active == {} for d in fleet.devices.values())


def test_silent_and_always_failing_devices(tmp_path, hub, watcher, small):
    fleet = small(6, silent_devices={"sim-0001"}, fail_devices={"sim-0002"})
    since = len(watcher.events)
    hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1)))
    got = watcher.wait_final(1, 5, since)
    time.sleep(0.5)
    assert "sim-0001" not in {d for _, d, _e in watcher.events[since:]}  # a hub waiting for it times out
    assert {d for d, e in got.items() if e.state == "failed"} == {"sim-0002"}
    assert fleet.devices["sim-0002"].active == {}
    fleet.fail_devices.add("sim-0003")  # at runtime
    assert fleet.will_fail("sim-0003", 2) and not fleet.will_fail("sim-0004", 2)
    since = len(watcher.events)
    hub.publish(hub.signed(tiny_package(tmp_path / "v2", 2)))
    got = watcher.wait_final(2, 5, since)
    assert {d for d, e in got.items() if e.state == "failed"} == {"sim-0002", "sim-0003"}
    assert fleet.devices["sim-0003"].active == {MODEL: 1}
    assert "v1 keeps serving" in got["sim-0003"].detail


def test_spread_failures_fail_exactly_their_share_in_the_order_updates_end(tmp_path, hub, watcher, small):
    fleet = small(20, fail_rate=0.2, fail_mode="spread", step_delay=(0.05, 0.2))
    since = len(watcher.events)
    hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1)))
    got = watcher.wait_final(1, 20, since)
    ended = sorted((e.ts, d) for _, d, e in watcher.events[since:] if e.state in ("active", "failed"))
    failed = [d for _, d in ended if got[d].state == "failed"]
    assert len(failed) == 4  # 20% of 20, exactly
    assert [i for i, (_, d) in enumerate(ended, 1) if d in failed] == [5, 10, 15, 20]
    assert {d for d in fleet.devices if fleet.will_fail(d, 1)} == set(failed)
    with pytest.raises(ValueError, match="fail_mode 'sometimes'"):
        SimFleet(1, "f", None, 0, fail_mode="sometimes")


def test_set_offline_leaves_the_retained_offline_state_of_the_same_session(broker, fleet_name, tmp_path, hub,
                                                                          watcher, small):
    fleet = small(3)
    dev = "sim-0002"
    session = watcher.wait_for(lambda: (s := watcher.state.get(dev)) and s.online and s.session, what="online")
    fleet.set_offline(dev)
    s = watcher.wait_for(lambda: (s := watcher.state.get(dev)) and not s.online and s, timeout=10, what="last will")
    assert s.session == session == fleet.devices[dev].session
    late = State.from_payload(retained(broker.port, fleet_name, 3)["state"][dev])
    assert late is not None and not late.online and late.session == session
    hub.publish(hub.signed(tiny_package(tmp_path / "v1", 1)))  # published while it is away
    watcher.wait_final(1, 2)
    fleet.set_online(dev)
    s = watcher.wait_for(lambda: (s := watcher.state.get(dev)) and s.online and s, what="back online")
    assert s.session > session
    assert watcher.wait_final(1, 3)[dev].state == "active"


def test_clean_stop_publishes_every_offline_state(broker, fleet_name, keydir, watcher):
    fleet = SimFleet(broker.port, fleet_name, keydir, 20).start()
    fleet.stop()
    states = {d: State.from_payload(p) for d, p in retained(broker.port, fleet_name, 20)["state"].items()}
    assert len(states) == 20 and all(s is not None and not s.online and s.session == 1 for s in states.values())
    assert all(st.session == 1 for st in watcher.status.values()) and len(watcher.status) == 20


def test_command_line_runs_until_sigterm_then_says_offline(broker, fleet_name, keydir):
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.testing.fleet", "--port", str(broker.port), "--fleet",
                             fleet_name, "--trusted-keys", str(keydir), "--devices", "30", "--prefix", "cli"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGERUN_LOG_LEVEL": "WARNING"})
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] is True and ready["devices"] == 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    states = retained(broker.port, fleet_name, 30)["state"]
    assert set(states) == {f"cli-{i:04d}" for i in range(30)}
    assert all(not State.from_payload(p).online for p in states.values())
