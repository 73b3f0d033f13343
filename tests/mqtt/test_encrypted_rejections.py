"""Every bad encrypted release is refused with a clear event, nothing of it is staged, and the active version keeps
serving: for another device, a wrong or missing key, a tampered segment or tag, a truncated ciphertext, a clear file
the manifest calls encrypted (and the reverse), a device key others can read."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from edgerun import crypto
from edgerun.hub.encrypt import encrypt_package
from edgerun.package import ModelPackage, file_entry, save_package
from mqtt_helpers import MODEL, Device, Hub, Watcher, make_package


@pytest.fixture(scope="module")
def setup(tmp_path_factory, broker, keydir):
    """One device serving a clear v2, shared by the cases (each publishes one bad v3), and its key."""
    tmp = tmp_path_factory.mktemp("encrypted-rejections")
    fleet = f"e{uuid.uuid4().hex[:8]}"
    hub = Hub(broker, fleet, keydir)
    watcher = Watcher(broker, fleet)
    dev = Device(tmp / "dev", broker, fleet, keydir, "dev1").start()
    for v in (1, 2):
        hub.release(make_package(tmp / f"good{v}", v))
        dev.wait_version(v)
    recipient = crypto.Recipient.parse(watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("recipient"),
                                                        what="the device key"))
    yield hub, watcher, dev, tmp, recipient
    dev.kill()
    watcher.close()


def _encrypted(tmp: Path, name: str, recipients: list[crypto.Recipient], seed: int, version: int = 3) -> ModelPackage:
    clear = make_package(tmp / f"{name}-clear", version, seed=seed, hidden=512)  # 154 kB: three segments
    return encrypt_package(clear, recipients, tmp / name)


def _rewrite(pkg: ModelPackage, change: Callable[[bytearray], bytes | bytearray]) -> ModelPackage:
    """The package with its one file's bytes changed, and signed for as they now are (a hub that signs garbage)."""
    entry = pkg.variants[0].files[0]
    path = pkg.root / entry.path
    path.write_bytes(bytes(change(bytearray(path.read_bytes()))))
    new = replace(entry, sha256=file_entry(pkg.root, entry.path).sha256, size=path.stat().st_size)
    save_package(replace(pkg, variants=[replace(pkg.variants[0], files=(new,))], raw={}), pkg.root)
    return ModelPackage.load(pkg.root)


def _segment(data: bytes, index: int) -> int:
    import io

    return crypto.read_header(io.BytesIO(data)).length + crypto.NONCE + index * crypto.CIPHER_SEGMENT


def _flip(at: Callable[[bytearray], int]) -> Callable[[bytearray], bytearray]:
    def change(data: bytearray) -> bytearray:
        data[at(data)] ^= 0x01
        return data
    return change


def for_another_device(hub, ctx):
    hub.release(_encrypted(ctx["tmp"], "another", [crypto.Identity.generate().recipient], 21))


def wrong_key(hub, ctx):  # the manifest names this device's key, but the file opens only with another one
    pkg = _encrypted(ctx["tmp"], "wrong-key", [crypto.Identity.generate().recipient], 22)
    mine = ctx["recipient"].fingerprint
    hub.release(pkg, edit=lambda m: m["variants"][0]["files"][0]["encryption"].update(recipients=[mine]))


def tampered_segment(hub, ctx):
    pkg = _encrypted(ctx["tmp"], "tampered-segment", [ctx["recipient"]], 23)
    hub.release(_rewrite(pkg, _flip(lambda d: _segment(bytes(d), 0) + 500)))


def tampered_tag(hub, ctx):
    pkg = _encrypted(ctx["tmp"], "tampered-tag", [ctx["recipient"]], 24)
    hub.release(_rewrite(pkg, _flip(lambda d: len(d) - 1)))


def truncated(hub, ctx):
    pkg = _encrypted(ctx["tmp"], "truncated", [ctx["recipient"]], 25)
    hub.release(_rewrite(pkg, lambda d: d[:_segment(bytes(d), 1)]))


def clear_but_called_encrypted(hub, ctx):
    pkg = _encrypted(ctx["tmp"], "called-encrypted", [ctx["recipient"]], 26)
    clear = ctx["tmp"] / "called-encrypted-clear" / "model.onnx"
    hub.release(_rewrite(pkg, lambda d: clear.read_bytes()))


def encrypted_but_called_clear(hub, ctx):
    clear = make_package(ctx["tmp"] / "called-clear", 3, seed=27, hidden=512)
    path = clear.root / "model.onnx"
    with open(path, "rb") as src:
        import io

        out = io.BytesIO()
        crypto.encrypt_stream(src, out, [ctx["recipient"]])
    path.write_bytes(out.getvalue())
    v = replace(clear.variants[0], files=(file_entry(clear.root, "model.onnx"),))
    save_package(replace(clear, variants=[v], raw={}), clear.root)
    hub.release(ModelPackage.load(clear.root))


CASES = [  # (publish, state, words the detail must contain)
    (for_another_device, "rejected", "encrypted for other keys"),
    (wrong_key, "failed", "no key of this device opens the file"),
    (tampered_segment, "failed", "segment 0 (plaintext bytes 0-65535) does not authenticate"),
    (tampered_tag, "failed", "segment 2 (plaintext bytes 131072-"),
    (truncated, "failed", "truncated: the file ends after segment 0 (plaintext bytes 0-65535), which is not its last"),
    (clear_but_called_encrypted, "failed", "not an age file"),
    (encrypted_but_called_clear, "failed", "model.onnx: the file is age-encrypted but the manifest says it is clear"),
]


def _nothing_staged(dev: Device) -> None:
    models = dev.state_dir / "models" / MODEL
    assert sorted(p.name for p in models.iterdir()) == ["1", "2", "active"]
    assert list((dev.state_dir / "partial").iterdir()) == []


@pytest.mark.parametrize("publish,state,words", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_bad_encrypted_release_is_refused_and_the_old_version_keeps_serving(setup, publish, state, words):
    hub, watcher, dev, tmp, recipient = setup
    since = len(watcher.events)
    publish(hub, {"tmp": tmp / publish.__name__, "recipient": recipient})
    event = watcher.event(3, ("rejected", "failed", "active"), since=since)
    assert event["state"] == state, event
    assert words in event["detail"], event["detail"]
    assert dev.versions() == [2]
    r = dev.infer()
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    _nothing_staged(dev)


@pytest.mark.parametrize("problem", ["missing", "loose"])
def test_without_a_usable_key_an_encrypted_release_is_rejected_and_the_clear_one_serves(problem, tmp_path, hub,
                                                                                       watcher, device_factory):
    dev = device_factory("dev2")
    key_file = dev.state_dir / "device.key"
    if problem == "missing":  # a configured key file is never made
        key_file = tmp_path / "etc" / "device.key"
        dev.config.write_text(f'device_key_file = "{key_file}"\n' + dev.config.read_text())
        expected = f"device key {key_file} does not exist"
    else:
        crypto_key = __import__("edgerun.devicekey", fromlist=["create_key_file"]).create_key_file(key_file)
        assert crypto_key
        os.chmod(key_file, 0o644)
        expected = f"device key {key_file} has mode 0644"
    dev.start()
    hub.release(make_package(tmp_path / "v1", 1))
    dev.wait_version(1)
    hub.release(_encrypted(tmp_path, "v2", [crypto.Identity.generate().recipient], 31, version=2))
    event = watcher.event(2, ("rejected", "failed", "active"))
    assert event["state"] == "rejected" and "this device's key cannot be used" in event["detail"], event
    assert expected in event["detail"], event["detail"]
    assert dev.versions() == [1] and dev.infer().status_code == 200
    assert sorted(p.name for p in (dev.state_dir / "models" / MODEL).iterdir()) == ["1", "active"]
    assert expected in dev.log.read_text()  # said at start-up too
    if problem == "loose":
        assert (watcher.status.get("dev2") or {}).get("recipient") is None
    shutil.rmtree(tmp_path / "v2", ignore_errors=True)
