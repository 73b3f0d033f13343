"""Publishing a release reaches a running device, which swaps without failing a request."""

from __future__ import annotations

import json
import threading
import time

from edgerun.testing.blobs import BlobServer
from mqtt_helpers import make_package


def test_publish_then_device_serves_it_and_hub_status_shows_it(tmp_path, hub, watcher, device_factory, keydir):
    dev = device_factory().start()
    assert dev.versions() == []
    pkg = make_package(tmp_path / "v1", 1)
    r = hub.cli("publish", str(pkg.root), "--fleet", hub.fleet, "--key", str(keydir / "hub-test.key"))
    assert r.returncode == 0, r.stderr
    assert "published digits v1" in r.stdout
    dev.wait_version(1)
    assert dev.infer().status_code == 200
    states = [e["state"] for e in watcher.events if e["version"] == 1]
    assert states == ["queued", "downloading", "verifying", "staged", "warming", "active"]

    watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("update", {}).get("state") == "active",
                     what="status active")
    r = hub.cli("status", "--fleet", hub.fleet, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["device"] for row in rows] == ["dev1"]
    row = rows[0]
    assert row["online"] is True
    assert [(m["name"], m["version"], m["variant"]) for m in row["models"]] == [("digits", 1, "onnx-fp32")]
    available = {b["name"] for b in watcher.status["dev1"]["backends"] if b["available"]}
    assert row["models"][0]["backend"] in available
    assert row["update"]["state"] == "active"
    table = hub.cli("status", "--fleet", hub.fleet)
    assert "dev1" in table.stdout and "digits" in table.stdout and "onnx-fp32" in table.stdout


def test_no_request_fails_during_the_swap(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1, hidden=256))
    dev.wait_version(1)
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def load():
        import httpx
        with httpx.Client(base_url=f"http://127.0.0.1:{dev.port}", timeout=10) as c:
            x = [0.5] * 64
            while not stop.is_set():
                try:
                    r = c.post("/v2/models/digits/infer",
                               json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]})
                    results.append((r.status_code, r.json().get("model_version", "")))
                except Exception as exc:  # a connection error is a failed request too
                    results.append((0, repr(exc)))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    hub.release(make_package(tmp_path / "v2", 2, hidden=256))
    watcher.event(2, ("active", "failed", "rejected"))
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    served = {v for _, v in results}
    assert served == {"1", "2"}, served
    assert dev.versions() == [2]


def test_http_url_transfer_with_a_device_release(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    pkg = make_package(tmp_path / "v1", 1)
    blobs = tmp_path / "blobs"
    with BlobServer(blobs) as server:
        blobs.mkdir(exist_ok=True)
        (blobs / pkg.variants[0].files[0].sha256).write_bytes((pkg.root / "model.onnx").read_bytes())
        hub.release(pkg, device="dev1", mqtt=False, url_base=server.url)
        dev.wait_version(1)
    assert dev.infer().status_code == 200


def test_device_offline_during_publish_converges_when_back(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    dev.stop()
    watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") is False, what="offline")
    hub.release(make_package(tmp_path / "v2", 2))
    dev.start()
    dev.wait_version(2)
    watcher.event(2, ("active",))


def test_last_will_marks_a_killed_device_offline(hub, watcher, device_factory):
    dev = device_factory().start()
    session = watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") and
                               watcher.state["dev1"]["session"], what="online")
    dev.kill()
    state = watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") is False and watcher.state["dev1"],
                             timeout=15, what="last will")
    assert state["session"] == session
    dev.start()
    state = watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") and watcher.state["dev1"],
                             what="back online")
    assert state["session"] > session


def test_retire_stops_serving_the_model(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    r = hub.cli("retire", "digits", "--fleet", hub.fleet, "--purge-blobs")
    assert r.returncode == 0, r.stderr
    watcher.event(1, ("retired",))
    assert dev.versions() == []
    assert "deleted 1 blob" in r.stdout


def test_withdrawn_canary_release_returns_the_device_to_the_fleet_version(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    hub.release(make_package(tmp_path / "v2", 2), device="dev1")
    dev.wait_version(2)
    since = len(watcher.events)
    r = hub.cli("retire", "digits", "--fleet", hub.fleet, "--device", "dev1")
    assert r.returncode == 0, r.stderr
    watcher.event(1, ("active",), since=since)
    dev.wait_version(1)
    assert "downloading" not in [e["state"] for e in watcher.events[since:]]  # v1 was kept on disk
    dev.kill()
    dev.start()
    time.sleep(2.0)  # the retained fleet release arrives again: nothing to do
    assert dev.versions() == [1]


def test_gc_deletes_only_blobs_no_release_refers_to(tmp_path, hub):
    old = make_package(tmp_path / "v1", 1)
    new = make_package(tmp_path / "v2", 2)
    hub.release(old)
    hub.release(new)
    dry = hub.cli("gc", "--fleet", hub.fleet, "--dry-run")
    old_sha, new_sha = old.variants[0].files[0].sha256, new.variants[0].files[0].sha256
    assert old_sha in dry.stdout and new_sha not in dry.stdout
    r = hub.cli("gc", "--fleet", hub.fleet)
    assert r.returncode == 0 and "deleted 1 blob" in r.stdout, r.stdout + r.stderr
    with hub.client() as c:
        left = c.collect([f"edgerun/v1/{hub.fleet}/blobs/#"], quiet=0.5)
    assert {t.split("/")[-2] for t in left} == {new_sha}
