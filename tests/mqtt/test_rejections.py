"""Every bad release is refused with a clear event while the active version keeps serving."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace

import pytest

from edgerun.package import ModelPackage, Sample, file_entry, save_package
from edgerun.testing.blobs import BlobServer
from mqtt_helpers import Device, Hub, Watcher, make_package


@pytest.fixture(scope="module")
def setup(tmp_path_factory, broker, keydir):
    """One device serving v2 of digits, shared by every case (each case publishes one bad release)."""
    tmp = tmp_path_factory.mktemp("rejections")
    fleet = f"r{uuid.uuid4().hex[:8]}"
    hub = Hub(broker, fleet, keydir)
    watcher = Watcher(broker, fleet)
    dev = Device(tmp / "dev", broker, fleet, keydir, "dev1").start()
    for v in (1, 2):
        hub.release(make_package(tmp / f"good{v}", v))
        dev.wait_version(v)
    with BlobServer(tmp / "blobs") as blobs:
        yield hub, watcher, dev, tmp, blobs
    dev.kill()
    watcher.close()


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _first_file(m: dict) -> dict:
    return m["variants"][0]["files"][0]


def bad_signature(hub, pkg, ctx):
    hub.release(pkg, after_sign=lambda m: m["signature"].update(value=_flip(m["signature"]["value"])))


def unknown_key(hub, pkg, ctx):
    hub.release(pkg, key=ctx["rogue_key"], key_id="rogue")


def tampered_field(hub, pkg, ctx):
    hub.release(pkg, after_sign=lambda m: m["variants"][0].update(accuracy=0.999))


def tampered_chunk(hub, pkg, ctx):
    data = bytearray((pkg.root / "model.onnx").read_bytes()[:64 << 10])
    data[100] ^= 0xFF

    def corrupt(m):  # after the good chunks, before the manifest
        hub.chunk(_first_file(m)["sha256"], 0, bytes(data))
    hub.release(pkg, edit=corrupt)


def wrong_size(hub, pkg, ctx):
    hub.release(pkg, edit=lambda m: _first_file(m).update(size=_first_file(m)["size"] + 7))


def truncated_file(hub, pkg, ctx):
    f = pkg.variants[0].files[0]
    data = (pkg.root / f.path).read_bytes()
    (ctx["blobs"].root / f.sha256).write_bytes(data[: len(data) // 2])
    hub.release(pkg, mqtt=False, url_base=ctx["blobs"].url)


def downgrade(hub, pkg, ctx):
    hub.release(make_package(ctx["tmp"] / f"old-{uuid.uuid4().hex[:6]}", 1, seed=77))


def malformed_json(hub, pkg, ctx):
    hub.raw("releases/digits", b'{"schema": "edgerun.release/1", "model": "digits", "version": 3,')


def unknown_format(hub, pkg, ctx):
    hub.release(pkg, edit=lambda m: m["variants"][0].update(format="pytorch"))


def fails_to_load(hub, pkg, ctx):
    (pkg.root / "model.onnx").write_bytes(b"this is not an onnx model " * 100)
    v = replace(pkg.variants[0], files=(file_entry(pkg.root, "model.onnx"),))
    save_package(replace(pkg, variants=[v]), pkg.root)
    hub.release(ModelPackage.load(pkg.root))


def warmup_mismatch(hub, pkg, ctx):
    s = pkg.samples[0]
    wrong = Sample(s.inputs, {k: (v + 0.5) for k, v in s.expected.items()})
    save_package(replace(pkg, samples=[wrong]), pkg.root)
    hub.release(ModelPackage.load(pkg.root))


def too_large(hub, pkg, ctx):
    hub.release(pkg, edit=lambda m: m["variants"][0].update(memory_bytes=1 << 45))


def package_without_name(hub, pkg, ctx):
    hub.release(pkg, edit=lambda m: m["package"].pop("name"))


def expired(hub, pkg, ctx):
    hub.release(pkg, edit=lambda m: m.update(expires="2020-01-01T00:00:00Z"))


CASES = [  # (publish, version the event names, state, words the detail must contain)
    (bad_signature, 3, "rejected", "bad signature"),
    (unknown_key, 3, "rejected", "unknown key 'rogue'"),
    (tampered_field, 3, "rejected", "bad signature"),
    (tampered_chunk, 3, "failed", "sha256"),
    (wrong_size, 3, "failed", "size"),
    (truncated_file, 3, "failed", "truncated"),
    (downgrade, 1, "rejected", "downgrade"),
    (malformed_json, 0, "rejected", "malformed"),  # no version can be read from it
    (unknown_format, 3, "rejected", "no installed backend loads format 'pytorch'"),
    (fails_to_load, 3, "failed", "did not load"),
    (warmup_mismatch, 3, "failed", "differs from the expected output"),
    (too_large, 3, "rejected", "too large"),
    (expired, 3, "rejected", "expired"),
    (package_without_name, 3, "rejected", "its 'package' has no 'name'"),
]


@pytest.mark.parametrize("publish,version,state,words", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_release_is_refused_and_the_old_version_keeps_serving(setup, rogue_key, publish, version, state,
                                                                    words):
    hub, watcher, dev, tmp, blobs = setup
    since = len(watcher.events)
    pkg = make_package(tmp / f"{publish.__name__}", 3, seed=hash(publish.__name__) % 1000 + 10)
    publish(hub, pkg, {"rogue_key": rogue_key, "tmp": tmp, "blobs": blobs})
    event = watcher.event(version, ("rejected", "failed", "active"), since=since)
    assert event["state"] == state, event
    assert words in event["detail"], event["detail"]
    assert dev.versions() == [2]
    r = dev.infer()
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    def reported():
        u = watcher.status["dev1"].get("updates", {}).get("digits", {})
        return u.get("state") == state and words in (u.get("error") or "") and watcher.status["dev1"]
    status = watcher.wait_for(reported, what=f"status {state}: {words}")
    assert [m["version"] for m in status["models"]] == [2]
