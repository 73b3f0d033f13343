"""Encrypted local packages: Runtime.load and `edgerun serve --model` decrypt into memory with the device key, on every
built-in backend; a backend that cannot load from memory is never given one, and `explain` says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgerun.devicekey import create_key_file
from edgerun.hub.encrypt import encrypt_package
from edgerun.runtime import Runtime
from edgerun.testing.marked import FORMATS, marked_package, scan_open_files, scan_tree
from edgerun.testing.mosquitto import free_port
from edgerun.testing.processes import terminate

X = np.random.default_rng(3).random((1, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "device.key"
    return path, create_key_file(path)


@pytest.fixture(scope="module", params=list(FORMATS))
def packages(request, tmp_path_factory, key):
    """(format, clear package, the same package encrypted to the device key)."""
    fmt = request.param
    if fmt == "openvino":
        pytest.importorskip("openvino")
    if fmt == "tflite":
        pytest.importorskip("ai_edge_litert")
    root = tmp_path_factory.mktemp(f"local-{fmt}")
    clear = marked_package(root / "clear", fmt, 1)
    return fmt, clear, encrypt_package(clear, [key[1].recipient], root / "encrypted")


def test_an_encrypted_package_loads_from_memory_and_answers_as_the_clear_one(packages, key):
    fmt, clear, encrypted = packages
    assert sorted(p.name for p in encrypted.root.iterdir()) == sorted(
        ["edgerun.toml"] + [f.path for f in encrypted.variants[0].files])
    assert scan_tree([encrypted.root]) == []  # the package holds ciphertext only
    with Runtime(device_key=key[0]) as rt:
        plain = rt.load(clear).run({"input": X})["probabilities"]
        rt.unload(clear.name)
        m = rt.load(encrypted)  # verifies the ciphertext's sha256, decrypts, loads, runs the warm-up sample
        assert m.backend == FORMATS[fmt]
        np.testing.assert_allclose(m.run({"input": X})["probabilities"], plain, atol=1e-6)
        assert scan_open_files(os.getpid()) == []


def test_without_the_key_every_encrypted_variant_is_dropped_with_the_reason(packages, tmp_path):
    _, _, encrypted = packages
    other = tmp_path / "other.key"
    create_key_file(other)
    for key_file, reason in ((tmp_path / "absent.key", f"this device's key cannot be used: device key "
                                                       f"{tmp_path / 'absent.key'} does not exist"),
                             (other, "encrypted for other keys")):
        with Runtime(device_key=key_file) as rt:
            c = rt.explain(encrypted)
            assert c.chosen is None
            assert all(reason in cand.reason or "cannot load" in cand.reason for cand in c.candidates)
            assert any(reason in cand.reason for cand in c.candidates)


def test_explain_shows_why_an_encrypted_variant_is_not_loaded(packages, tmp_path):
    fmt, _, encrypted = packages
    r = subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
                        "explain", str(encrypted.root)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "250", "EDGERUN_DEVICE_KEY_FILE": str(tmp_path / "none.key")})
    assert r.returncode == 69
    out = " ".join(r.stdout.split())
    assert "encrypted, and this device's key cannot be used" in out
    if fmt == "onnx":  # openvino reads onnx, but not from memory
        assert "encrypted, and openvino cannot load onnx models from memory" in out


def test_a_backend_that_cannot_load_from_memory_is_not_given_an_encrypted_variant(packages, key):
    fmt, _, encrypted = packages
    if fmt != "onnx":
        pytest.skip("one format is enough for the plugin rule")
    from edgerun.hookspecs import hookimpl
    from edgerun_onnxruntime import OnnxRuntimeBackend

    class DiskOnly(OnnxRuntimeBackend):
        name = "disk-only"
        memory_formats = frozenset()

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(DiskOnly)

    with Runtime(device_key=key[0], profile="generic-x86_64") as rt:
        rt.pm.register(Plugin(), name="disk-only")
        rt._backends = None
        c = rt.explain(encrypted)
        verdicts = {cand.backend: (cand.kept, cand.reason) for cand in c.candidates}
        assert verdicts["disk-only"] == (False, "encrypted, and disk-only cannot load onnx models from memory "
                                                "(encrypted variants are never decrypted to disk)")
        assert c.chosen is not None and c.chosen.backend == "onnxruntime"


def test_serve_model_decrypts_with_the_configured_key_and_writes_no_clear_byte(packages, key, tmp_path):
    fmt, clear, encrypted = packages
    with Runtime(device_key=key[0]) as rt:
        expected = rt.load(clear).run({"input": X})["probabilities"]
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    state = tmp_path / "state"
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
                             "serve", "--model", str(encrypted.root), "--port", str(port), "--state-dir", str(state)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "EDGERUN_DEVICE_KEY_FILE": str(key[0]), "TMPDIR": str(tmpdir)})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    if http.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.2)
            r = http.post("/v2/models/digits/infer", json={"inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": X.ravel().tolist()}]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(1, 10), expected, atol=1e-5)
            assert scan_open_files(proc.pid) == []
    finally:
        terminate(proc, 15)
    assert scan_tree([tmpdir, encrypted.root]) == []
    assert scan_tree([Path("/tmp")], skip=[clear.root], newer_than=started) == []


RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import psutil
    from edgerun.runtime import Runtime
    rt = Runtime(device_key=sys.argv[2], profile="generic-x86_64")
    rss = []
    for i in range(20):
        m = rt.load(sys.argv[1])
        rt.unload(m.name)
        m.wait_closed(10)
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    print(json.dumps(rss))
""")


def test_rss_stays_flat_over_20_encrypted_load_and_unload_cycles(packages, key, tmp_path):
    fmt, _, _ = packages
    clear = marked_package(tmp_path / "clear", fmt, 1, hidden=16384)  # about 4.7 MB of weights
    encrypted = encrypt_package(clear, [key[1].recipient], tmp_path / "encrypted")
    size = encrypted.variants[0].size
    # glibc's fixed mmap threshold: a freed buffer of a model's size goes back to the system at once instead of
    # staying in a heap arena, so RSS shows what is held, not the allocator's policy of the moment
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(encrypted.root), str(key[0])], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert r.returncode == 0, r.stderr[-3000:]
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    growth = rss[-1] - rss[4]
    # A decrypted copy kept per cycle would add 15 model sizes (70 MB) between cycles 5 and 20; allocator and
    # backend caches settle within the first cycles. Two model sizes of slack leave room for that noise only.
    assert growth < 2 * size, f"RSS grew by {growth >> 20} MiB over 15 cycles of a {size >> 20} MiB model: {rss}"
