"""The hub side: enrolled keys in the registry, what --encrypt-for names, and `hub package --encrypt-for`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgerun import crypto
from edgerun.devicekey import create_key_file
from edgerun.errors import EdgerunError
from edgerun.hub.encrypt import encrypt_package, resolve
from edgerun.hub.registry import Registry
from edgerun.package import ModelPackage
from edgerun.runtime import Runtime
from edgerun.testing.marked import marked_package


def hub(db: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", "hub",
                           *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", "EDGERUN_HUB_DB": db})


@pytest.fixture
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'hub.db'}"


def test_keys_add_list_remove(db):
    a, b = crypto.Identity.generate().recipient, crypto.Identity.generate().recipient
    assert hub(db, "keys", "add", "pi-1", str(a), "--fleet", "lab").returncode == 0
    assert hub(db, "keys", "add", "@fleet", str(b), "--fleet", "lab").returncode == 0
    r = hub(db, "keys", "add", "pi-1", str(b), "--fleet", "lab")  # replaced
    assert r.returncode == 0 and f"enrolled pi-1 in fleet 'lab': {b} (fingerprint {b.fingerprint})" in r.stdout
    rows = json.loads(hub(db, "keys", "list", "--fleet", "lab", "--json").stdout)
    assert [(k["device"], k["recipient"], k["fingerprint"], k["reported"]) for k in rows] == [
        ("@fleet", str(b), b.fingerprint, "-"), ("pi-1", str(b), b.fingerprint, "-")]
    assert json.loads(hub(db, "keys", "list", "--fleet", "other", "--json").stdout) == []
    assert hub(db, "keys", "remove", "pi-1", "--fleet", "lab").returncode == 0
    r = hub(db, "keys", "remove", "pi-1", "--fleet", "lab")
    assert r.returncode == 66 and "no key is enrolled for 'pi-1' in fleet 'lab'" in r.stderr


def test_keys_add_refuses_what_is_not_a_device_or_a_key(db):
    key = crypto.Identity.generate()
    r = hub(db, "keys", "add", "pi/1", str(key.recipient))
    assert r.returncode == 2 and "'pi/1' is not a device id" in r.stderr
    r = hub(db, "keys", "add", "pi-1", str(key))  # the secret half, pasted by mistake
    assert r.returncode == 1 and "that is a secret key" in r.stderr and str(key) not in r.stderr
    r = hub(db, "keys", "add", "pi-1", str(key.recipient)[:-2])
    assert r.returncode == 1 and "not an age recipient (age1..., 62 characters): bad checksum" in r.stderr


def test_encrypt_for_names_resolve_and_unknown_ones_say_how_to_enrol(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'hub.db'}")
    keys = [crypto.Identity.generate().recipient for _ in range(3)]
    for name, r in zip(("pi-1", "pi-2", "@fleet"), keys):
        reg.add_device_key("lab", name, str(r), r.fingerprint)
    assert resolve(["@all"], reg, "lab") == keys[:2]
    assert resolve(["pi-2", "@fleet", str(keys[1])], reg, "lab") == [keys[1], keys[2]]
    with pytest.raises(EdgerunError, match=r"device 'pi-9' has no enrolled key in fleet 'lab' \(edgerun hub keys add"):
        resolve(["pi-9"], reg, "lab")
    with pytest.raises(EdgerunError, match="no device key is enrolled in fleet 'x'"):
        resolve(["@all"], reg, "x")


def test_publish_with_an_unknown_name_sends_nothing(db, tmp_path):
    from edgerun.hub.keys import generate

    generate(tmp_path / "keys", "hub")
    pkg = marked_package(tmp_path / "pkg", "onnx", 1)
    r = hub(db, "publish", str(pkg.root), "--key", str(tmp_path / "keys" / "hub.key"), "--encrypt-for", "pi-9",
            "--port", "1")  # no broker there: the name fails first
    assert r.returncode == 1 and "device 'pi-9' has no enrolled key" in r.stderr


def test_encrypting_a_package_twice_is_refused(tmp_path):
    key = crypto.Identity.generate()
    pkg = encrypt_package(marked_package(tmp_path / "clear", "onnx", 1), [key.recipient], tmp_path / "enc")
    with pytest.raises(EdgerunError, match="are encrypted already"):
        encrypt_package(pkg, [key.recipient], tmp_path / "again")


def test_hub_package_encrypt_for_leaves_no_clear_model(tmp_path):
    from edgerun.testing.models import digits_data, mlp_onnx, sklearn_weights, train_digits_mlp

    key_file = tmp_path / "device.key"
    identity = create_key_file(key_file)
    _, _, x_val, y_val = digits_data()
    model = mlp_onnx(sklearn_weights(train_digits_mlp()), tmp_path / "digits.onnx")
    np.savez(tmp_path / "val.npz", input=x_val[:100], labels=y_val[:100])
    out = tmp_path / "pkg"
    r = hub(f"sqlite:///{tmp_path / 'hub.db'}", "package", str(model), "--name", "digits", "--version", "1",
            "--validation", str(tmp_path / "val.npz"), "--out", str(out), "--precisions", "fp32,int8",
            "--formats", "onnx", "--backends", "onnxruntime", "--repeats", "5", "--no-emulate",
            "--encrypt-for", str(identity.recipient))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no clear model file is left" in " ".join(r.stdout.split())
    pkg = ModelPackage.load(out)
    assert pkg.variants and all(v.encrypted for v in pkg.variants)
    on_disk = {p.name for p in out.iterdir()}
    assert not {n for n in on_disk if n.endswith((".onnx", ".xml", ".bin", ".tflite"))}, on_disk
    with Runtime(device_key=key_file, profile="generic-x86_64") as rt:
        m = rt.load(out)
        assert m.run({"input": x_val[:1]})["probabilities"].shape == (1, 10)
