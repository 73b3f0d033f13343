"""An encrypted release on every backend: enrolled with `hub keys add`, published with `hub publish --encrypt-for`
over a real Mosquitto, activated and served, and no clear model byte is ever in the device's files: its state_dir,
its temp directory, /tmp or any file it holds open, during the update and after."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgerun.runtime import Runtime
from edgerun.testing.marked import FORMATS, marked_package, scan_open_files, scan_tree
from mqtt_helpers import MODEL


class Scanner:
    """Scans the device's files for the marker every 0.2 s while an update runs."""

    def __init__(self, pid: int, dirs: list[Path]):
        self.pid, self.dirs = pid, dirs
        self.found: set[str] = set()
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.found.update(scan_tree(self.dirs))
            self.found.update(scan_open_files(self.pid))
            self.scans += 1
            self._stop.wait(0.2)

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join()
        return self.found


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_encrypted_release_is_served_and_its_clear_bytes_touch_no_file(fmt, tmp_path, hub, watcher,
                                                                          device_factory, keydir):
    if fmt == "openvino":
        pytest.importorskip("openvino")
    if fmt == "tflite":
        pytest.importorskip("ai_edge_litert")
    started = time.time()
    clear = marked_package(tmp_path / "hub" / "pkg", fmt, 1)
    with Runtime(profile="generic-x86_64") as rt:
        x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
        expected = rt.load(clear).run({"input": x})["probabilities"]
    dev = device_factory("dev1")
    tmpdir = dev.workdir / "tmp"
    tmpdir.mkdir(parents=True)
    dev.start(env={"TMPDIR": str(tmpdir)})
    recipient = watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("recipient"), what="the device key")
    assert recipient.startswith("age1") and (dev.state_dir / "device.key").stat().st_mode & 0o777 == 0o600

    r = hub.cli("keys", "add", "dev1", recipient, "--fleet", hub.fleet)
    assert r.returncode == 0, r.stderr
    scanner = Scanner(dev.proc.pid, [dev.state_dir, tmpdir])
    r = hub.cli("publish", str(clear.root), "--fleet", hub.fleet, "--key", str(keydir / "hub-test.key"),
                "--encrypt-for", "dev1", "--chunk-size", str(16 << 10))
    assert r.returncode == 0, r.stderr
    event = watcher.event(1, ("active", "failed", "rejected"), timeout=60)
    found = scanner.stop()
    assert event["state"] == "active", event
    assert scanner.scans >= 2
    assert found == set(), f"clear model bytes in {found}"
    verifying = next(e for e in watcher.events if e["state"] == "verifying")
    assert "every encrypted segment" in verifying["detail"]

    r = dev.infer()
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(1, 10), expected, atol=1e-5)
    stored = sorted(p.name for p in (dev.state_dir / "models" / MODEL / "1").iterdir())
    assert stored == sorted(["edgerun.toml", "manifest.json"] + [f.path + ".age" for f in clear.variants[0].files])
    manifest = json.loads((dev.state_dir / "models" / MODEL / "1" / "manifest.json").read_text())
    files = manifest["variants"][0]["files"]
    assert all(f["encryption"]["scheme"] == "age" and len(f["encryption"]["recipients"]) == 1 for f in files)
    assert list((dev.state_dir / "partial").iterdir()) == []
    assert scan_tree([dev.state_dir, tmpdir]) == []
    assert scan_open_files(dev.proc.pid) == []
    assert scan_tree([Path("/tmp")], skip=[tmp_path / "hub"], newer_than=started) == []

    r = hub.cli("status", "--fleet", hub.fleet)  # brings the device's status into the registry
    r = hub.cli("keys", "list", "--fleet", hub.fleet, "--json")
    assert r.returncode == 0, r.stderr
    assert [(k["device"], k["recipient"], k["reported"]) for k in json.loads(r.stdout)] == [("dev1", recipient,
                                                                                             "same")]

    dev.stop()  # a restart reloads the encrypted version from the store, decrypting it again in memory
    dev.start(env={"TMPDIR": str(tmpdir)})
    dev.wait_version(1)
    assert dev.infer().status_code == 200
    assert scan_open_files(dev.proc.pid) == []
