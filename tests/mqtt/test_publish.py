"""Publishing a release reaches a running device, which swaps without failing a request."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from edgerun.hub.publish import build_manifest, publish_blobs
from edgerun.package import ModelPackage, Variant, file_entry, save_package
from edgerun.testing.blobs import BlobServer
from edgerun.testing.models import mlp_onnx, random_mlp_weights
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
    watcher.event(1, ("active",))  # the swap happens before `active` is journaled and published
    states = [e["state"] for e in watcher.events if e["version"] == 1]
    assert states == ["queued", "downloading", "verifying", "staged", "warming", "active"]
    # docs/contract.md, exactly: what outside hubs parse
    assert all(set(e) == {"model", "version", "state", "detail", "ts"} for e in watcher.events), watcher.events
    assert set(watcher.state["dev1"]) == {"online", "session", "ts"} and watcher.state["dev1"]["online"] is True

    status = watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("update", {}).get("state") == "active"
                              and watcher.status["dev1"], what="status active")
    assert {"profile", "backends", "models", "update"} <= set(status)
    assert status["contract"] == "1.4" and status["tags"] == {}  # tags came in 1.1
    assert status["recipient"].startswith("age1")  # 1.3: the device's key, made at its first start
    assert status["memory"]["rss_bytes"] > 10 << 20 and status["memory"]["available_bytes"] > 0
    assert {"state", "version", "progress", "error"} <= set(status["update"]) and status["update"]["version"] == 1
    assert {"name", "version", "variant", "backend", "sha256", "memory_bytes"} <= set(status["models"][0])
    assert status["models"][0]["sha256"] == pkg.variants[0].files[0].sha256
    assert all({"name", "available", "reason"} <= set(b) for b in status["backends"])
    r = hub.cli("status", "--fleet", hub.fleet, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["device"] for row in rows] == ["dev1"]
    row = rows[0]
    assert row["online"] is True and row["contract"] == "1.4"
    assert [(m["name"], m["version"], m["variant"]) for m in row["models"]] == [("digits", 1, "onnx-fp32")]
    available = {b["name"] for b in watcher.status["dev1"]["backends"] if b["available"]}
    assert row["models"][0]["backend"] in available
    assert row["update"]["state"] == "active"
    table = hub.cli("status", "--fleet", hub.fleet)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(line for line in lines if "device" in line and "online" in line)
    columns = ["device", "online", "profile", "models", "versions", "variant", "backend", "update"]
    assert [header.index(c) for c in columns] == sorted(header.index(c) for c in columns), header
    row = next(line for line in lines if "dev1" in line)
    assert all(w in row for w in ("yes", status["profile"], "digits", "onnx-fp32", "v1: active")), row


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


def test_http_transfer_resumes_with_range_after_the_connection_drops(tmp_path, hub, watcher, device_factory, keydir):
    dev = device_factory().start()
    pkg = make_package(tmp_path / "v1", 1, hidden=2000)  # ~0.5 MB
    f = pkg.variants[0].files[0]
    with BlobServer(tmp_path / "blobs") as server:
        server.drop(2, after=f.size // 3)  # the first two answers end mid-file
        r = hub.cli("publish", str(pkg.root), "--fleet", hub.fleet, "--device", "dev1", "--key",
                    str(keydir / "hub-test.key"), "--url-base", server.url, "--blob-dir", str(server.root),
                    "--no-mqtt-chunks")
        assert r.returncode == 0, r.stderr
        dev.wait_version(1)
        ranges = [rng for name, rng in server.requests if name == f.sha256]
        sent = server.bytes_sent
    assert len(ranges) == 3 and ranges[0] is None, ranges
    starts = [int(rng.removeprefix("bytes=").rstrip("-")) for rng in ranges[1:]]
    assert 0 < starts[0] < starts[1] < f.size, ranges  # each attempt went on from what was on disk
    assert sent < f.size * 1.2, (sent, f.size)  # nothing fetched twice (but what a dropped answer lost)
    assert dev.infer().status_code == 200
    with hub.client() as c:  # --no-mqtt-chunks: nothing but the manifest on the broker
        assert not c.collect([f"edgerun/v1/{hub.fleet}/blobs/#"], quiet=0.3)


def test_https_download_trusts_the_fleet_ca_and_refuses_an_unknown_one_at_once(tmp_path):
    from edgerun.agent.transfer import TransferError, download_verify, http_fetch
    from edgerun.testing.tls import make_test_ca

    ca = make_test_ca(tmp_path / "tls")
    blob = bytes(range(256)) * 4096  # 1 MiB
    with BlobServer(tmp_path / "blobs", tls=(tmp_path / "tls/server.pem", tmp_path / "tls/server.key")) as server:
        (server.root / "f").write_bytes(blob)
        url = f"{server.url}/f"
        assert url.startswith("https://")
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="certificate does not verify .*set mqtt.ca_file"):
            http_fetch(url, tmp_path / "a", len(blob), progress=lambda n: None, cancelled=lambda: False)
        assert time.monotonic() - t0 < 5, "a certificate that does not verify was retried"
        assert not (tmp_path / "a").exists() or (tmp_path / "a").stat().st_size == 0
        http_fetch(url, tmp_path / "b", len(blob), progress=lambda n: None, cancelled=lambda: False,
                   verify=download_verify(ca))
    assert (tmp_path / "b").read_bytes() == blob
    with pytest.raises(TransferError, match="cannot use mqtt.ca_file"):
        download_verify(tmp_path / "no-such-ca.pem")


def test_device_with_the_fleet_ca_updates_from_an_https_blob_server(tmp_path, hub, device_factory, keydir):
    from edgerun.testing.tls import make_test_ca

    ca = make_test_ca(tmp_path / "tls")
    dev = device_factory()
    dev.config.write_text(dev.config.read_text() + f'ca_file = "{ca}"\n')  # [mqtt] is the last table
    dev.start()
    pkg = make_package(tmp_path / "v1", 1)
    with BlobServer(tmp_path / "blobs", tls=(tmp_path / "tls/server.pem", tmp_path / "tls/server.key")) as server:
        r = hub.cli("publish", str(pkg.root), "--fleet", hub.fleet, "--device", "dev1", "--key",
                    str(keydir / "hub-test.key"), "--url-base", server.url, "--blob-dir", str(server.root),
                    "--no-mqtt-chunks")
        assert r.returncode == 0, r.stderr
        dev.wait_version(1)
        assert [name for name, _ in server.requests] == [pkg.variants[0].files[0].sha256]
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
    with hub.client() as c:  # the retained chunks and the release are gone from the broker
        assert not c.collect([f"edgerun/v1/{hub.fleet}/blobs/#", f"edgerun/v1/{hub.fleet}/releases/#"], quiet=0.5)
    assert not (dev.state_dir / "models" / "digits").exists()


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


def test_device_fetches_only_the_variant_that_fits_its_memory(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    root = tmp_path / "v1"
    pkg = make_package(root, 1)
    mlp_onnx(random_mlp_weights([64, 512, 10], seed=99), root / "big.onnx")
    big = Variant("onnx-big", "onnx", "fp32", (file_entry(root, "big.onnx"),), accuracy=0.99, memory_bytes=1 << 45)
    save_package(replace(pkg, variants=[*pkg.variants, big]), root)
    pkg = ModelPackage.load(root)
    with hub.client() as c:  # only the small variant's chunks exist: waiting for the other would never end
        publish_blobs(c, hub.topics, pkg, build_manifest(pkg, chunk_size=64 << 10, variants=["onnx-fp32"]))
    signed = hub.release(pkg, chunks=False)
    assert [v["id"] for v in signed["variants"]] == ["onnx-fp32", "onnx-big"]
    dev.wait_version(1)
    assert "onnx-fp32" in watcher.event(1, ("downloading",))["detail"]
    watcher.event(1, ("active",))
    assert sorted(p.name for p in (dev.state_dir / "models" / "digits" / "1").iterdir()) == \
        ["edgerun.toml", "manifest.json", "model.onnx"]
    assert not list((dev.state_dir / "partial").iterdir())
    status = watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("models") and watcher.status["dev1"],
                              what="status with the model")
    assert [m["variant"] for m in status["models"]] == ["onnx-fp32"]


def test_hub_rolls_back_by_publishing_the_kept_version_again(tmp_path, hub, watcher, device_factory):
    dev = device_factory().start()
    pkgs = {v: make_package(tmp_path / f"v{v}", v) for v in (1, 2, 3)}
    for v in (1, 2, 3):
        hub.release(pkgs[v])
        dev.wait_version(v)
        watcher.event(v, ("active",))
    store = dev.state_dir / "models" / "digits"
    assert sorted(p.name for p in store.iterdir() if p.name.isdigit()) == ["2", "3"]  # previous kept, older pruned
    assert json.loads((store / "active").read_text())["previous"] == 2

    since = len(watcher.events)
    hub.release(pkgs[2])  # a signed manifest naming the kept version again: the contract's explicit roll-back
    assert "rolls back" in watcher.event(2, ("staged",), since=since)["detail"]
    watcher.event(2, ("active",), since=since)
    dev.wait_version(2)
    assert "downloading" not in [e["state"] for e in watcher.events[since:]]  # served from the store
    assert dev.infer().json()["model_version"] == "2"
    assert json.loads((store / "active").read_text())["version"] == 2

    since = len(watcher.events)
    hub.release(pkgs[1])  # v1 was pruned: an ordinary downgrade
    event = watcher.event(1, ("rejected", "failed", "active"), since=since)
    assert event["state"] == "rejected" and "downgrade" in event["detail"], event
    assert dev.versions() == [2]


def test_unload_first_installs_a_version_that_fits_only_once_the_old_one_is_gone(tmp_path, hub, watcher,
                                                                                  device_factory):
    dev = device_factory(memory_budget="64MiB")
    dev.config.write_text(dev.config.read_text() + "unload_first = true\n")  # [mqtt] is the last table
    dev.start()
    hub.release(make_package(tmp_path / "v1", 1, hidden=4000))
    dev.wait_version(1)
    status = watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("models") and watcher.status["dev1"],
                              what="status with the model")
    old_memory = status["models"][0]["memory_bytes"]
    assert old_memory > 1000, status["models"]
    need = (64 << 20) + old_memory // 2  # over the budget beside v1, within it once v1 is unloaded
    hub.release(make_package(tmp_path / "v2", 2, hidden=4000),
                edit=lambda m: m["variants"][0].update(memory_bytes=need))
    event = watcher.event(2, ("active", "failed", "rejected"))
    assert event["state"] == "active", event
    dev.wait_version(2)
    assert dev.infer().json()["model_version"] == "2"
    assert "unloading digits v1 before loading v2" in dev.log.read_text()
    dev.kill()  # after a restart the installed v2 is served again, not rolled back for its size
    since = len(watcher.events)
    dev.start()
    assert dev.versions() == [2]
    time.sleep(1.5)
    assert [e["state"] for e in watcher.events[since:]] == []
