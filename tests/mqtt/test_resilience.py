"""Updates survive a broker restart, a lost connection and `kill -9` of the device at every state."""

from __future__ import annotations

import json
import time

import pytest

from edgerun.hub.publish import build_manifest, encode, iter_chunks
from edgerun.manifest import sign
from mqtt_helpers import make_package

CHUNK = 64 << 10


def _publish_partly(hub, pkg, first: int | None = None, start: int = 0, manifest: bool = True) -> int:
    """Chunks [start, first) of the package's file, then (optionally) the signed manifest; returns the count."""
    unsigned = build_manifest(pkg, chunk_size=CHUNK)
    f = unsigned["variants"][0]["files"][0]
    chunks = list(iter_chunks(pkg.root / f["path"], CHUNK))
    with hub.client() as c:
        c.wait([c.publish(hub.topics.blob(f["sha256"], i), block, retain=True) for i, block in chunks[start:first]])
        if manifest:
            c.wait([c.publish(hub.topics.release(pkg.name), encode(sign(unsigned, hub.key, hub.key_id)),
                              retain=True)])
    return len(chunks)


def _progress(watcher) -> float:
    return _downloading(watcher.status.get("dev1") or {})


def _downloading(status: dict) -> float:
    u = status.get("update") or {}
    return (u.get("progress") or 0.0) if u.get("state") == "downloading" and u.get("version") == 2 else 0.0


@pytest.mark.slow
def test_broker_restart_mid_transfer_resumes_without_refetching(tmp_path, broker, hub, watcher, device_factory):
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    big = make_package(tmp_path / "v2", 2, hidden=16000)  # ~4.7 MB, 74 chunks of 64 KiB
    total = _publish_partly(hub, big, first=30)
    before = watcher.wait_for(lambda: _progress(watcher) >= 0.4 and _progress(watcher), what="half downloaded")
    broker.stop()
    time.sleep(1.5)
    restarted = time.monotonic()
    broker.start()
    watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online"), what="device back online")
    watcher.wait_for(lambda: any(t > restarted and _downloading(s) for t, s in watcher.history),
                     what="progress reported after the restart")
    _publish_partly(hub, big, start=30, manifest=False)
    dev.wait_version(2, timeout=60)
    after = [_downloading(s) for t, s in watcher.history if t > restarted and _downloading(s)]
    assert min(after) >= before, (before, after)  # resumed from what was on disk, did not start over
    assert total > 60 and dev.infer().json()["model_version"] == "2"


@pytest.mark.slow
def test_device_restart_mid_transfer_keeps_the_chunks_on_disk(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    big = make_package(tmp_path / "v2", 2, hidden=16000)
    _publish_partly(hub, big, first=35)
    before = watcher.wait_for(lambda: _progress(watcher) >= 0.45 and _progress(watcher), what="half downloaded")
    dev.kill()
    sidecar = next((dev.state_dir / "partial").glob("*.chunks"))
    assert sum(sidecar.read_bytes()) >= 16, "received chunks are recorded beside the partial file"
    watcher.status.pop("dev1", None)
    dev.start()
    assert dev.versions() == [1]
    first = watcher.wait_for(lambda: _progress(watcher), what="download resumed")
    assert first >= before * 0.7, (before, first)
    _publish_partly(hub, big, start=35, manifest=False)
    dev.wait_version(2, timeout=60)


def test_a_download_with_no_new_chunk_for_stall_timeout_fails_as_stalled_and_v1_serves(tmp_path, hub, watcher,
                                                                                        device_factory):
    dev = device_factory().start(env={"EDGERUN_MQTT_STALL_TIMEOUT": "2"})  # [mqtt] stall_timeout, from the environment
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    big = make_package(tmp_path / "v2", 2, hidden=4000)
    total = _publish_partly(hub, big, first=3)  # three chunks, then nothing: the rest was never uploaded
    started = time.monotonic()
    failed = watcher.event(2, ("failed",), timeout=30)
    assert time.monotonic() - started < 20  # not the default of 600 s
    assert "download: no chunk of model.onnx for 2s" in failed["detail"] and f"(3 of {total} received)" in \
        failed["detail"], failed["detail"]
    assert dev.versions() == [1] and dev.infer().status_code == 200


def _wait_for_pointer(dev, version: int, timeout: float = 30) -> None:
    path = dev.state_dir / "models" / "digits" / "active"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and json.loads(path.read_text())["version"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"the pointer never named v{version}")


STATES = [  # state the device is killed in → the version it serves once the update is resolved
    ("queued", 2), ("downloading", 2), ("verifying", 2), ("staged", 1), ("warming", 1),
    ("pointer", 2),  # the pointer names v2 but `active` is not journaled yet
    ("active", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("state,final", STATES, ids=[s for s, _ in STATES])
def test_kill_9_in_each_update_state_comes_back_consistent(tmp_path, hub, watcher, device_factory, testhooks, state,
                                                           final):
    dev = device_factory()
    dev.start(env={**testhooks, "EDGERUN_TESTHOOKS_PAUSE_AT": f"{state}:2", "EDGERUN_TESTHOOKS_PAUSE_SECONDS": "60"})
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    hub.release(make_package(tmp_path / "v2", 2))
    if state == "pointer":
        watcher.event(2, ("warming",))
        _wait_for_pointer(dev, 2)
    else:
        watcher.event(2, (state,))
    dev.kill()
    since = len(watcher.events)
    dev.start()
    served = dev.versions()  # what restore brought back before serving: one complete version
    assert served in ([1], [2]), served
    r = dev.infer()
    assert r.status_code == 200 and r.json()["model_version"] in {str(served[0]), str(final)}  # may finish meanwhile
    if final == 1:
        assert watcher.event(2, ("rolled_back",), since=since)["detail"].startswith("the device restarted")
    elif state == "pointer":
        assert "activated just before a restart" in watcher.event(2, ("active",), since=since)["detail"]
    else:
        dev.wait_version(2)
    time.sleep(1.0)  # the retained release arrives again after the restart: it must not flip anything
    assert dev.versions() == [final]
    assert dev.infer().json()["model_version"] == str(final)
    versions_on_disk = sorted(int(p.name) for p in (dev.state_dir / "models" / "digits").iterdir() if p.name.isdigit())
    assert final in versions_on_disk and set(versions_on_disk) <= {1, 2}


def test_an_active_version_that_no_longer_loads_rolls_back_to_the_previous_one(tmp_path, hub, watcher,
                                                                               device_factory):
    dev = device_factory().start()
    for v in (1, 2):
        hub.release(make_package(tmp_path / f"v{v}", v))
        dev.wait_version(v)
        watcher.event(v, ("active",))
    dev.stop()
    model = dev.state_dir / "models" / "digits" / "2" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # the disk lost part of the active version
    since = len(watcher.events)
    dev.start()
    assert dev.versions() == [1]  # restored before serving: the previous good version
    assert dev.infer().json()["model_version"] == "1"
    event = watcher.event(2, ("rolled_back",), since=since)
    assert "failed to load at startup" in event["detail"] and "rolled back to v1" in event["detail"], event
    assert json.loads((dev.state_dir / "models" / "digits" / "active").read_text())["version"] == 1


def test_a_download_superseded_by_the_release_already_served_is_not_resumed_after_a_restart(
        tmp_path, hub, watcher, device_factory):
    """A rollout aborted while a device downloads: its own release is cleared, the fleet's (served) applies."""
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    big = make_package(tmp_path / "v2", 2, hidden=16000)
    unsigned = build_manifest(big, chunk_size=CHUNK)
    f = unsigned["variants"][0]["files"][0]
    with hub.client() as c:  # a third of the chunks, then the device's own release of v2
        c.wait([c.publish(hub.topics.blob(f["sha256"], i), block, retain=True)
                for i, block in list(iter_chunks(big.root / f["path"], CHUNK))[:25]])
        c.wait([c.publish(hub.topics.release("digits", "dev1"), encode(sign(unsigned, hub.key, hub.key_id)),
                          retain=True)])
    watcher.wait_for(lambda: _progress(watcher) > 0.1, what="v2 downloading")
    hub.raw("devices/dev1/releases/digits", b"")  # withdrawn: the fleet's v1, which the device serves, applies
    assert "superseded" in watcher.event(2, ("failed",))["detail"]
    dev.stop()
    dev.start()
    time.sleep(2.0)  # restore, connect, settle: nothing may bring v2 back
    assert dev.versions() == [1]
    assert "resuming the update" not in dev.log.read_text()
    assert not [e for e in watcher.events if e["version"] == 2 and e["state"] in ("queued", "active")][1:], \
        "v2 was started again after the restart"
