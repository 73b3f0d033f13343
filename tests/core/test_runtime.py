"""The in-process Runtime: load, infer, metadata, version swaps, unload; and ``edgerun run``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgerun.errors import ModelNotFound
from edgerun.runtime import Runtime
from edgerun.tensors import TensorSpec


def test_load_infer_unload(runtime: Runtime, digits_package, digits_input: np.ndarray) -> None:
    model = runtime.load(digits_package.root)
    assert (model.name, model.version, model.backend) == ("digits", 1, "onnxruntime")
    probs = runtime.infer("digits", {"input": digits_input})["probabilities"]
    assert probs.shape == (2, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, digits_package.samples[0].expected["probabilities"], atol=1e-4)
    assert [m.name for m in runtime.models()] == ["digits"]
    runtime.unload("digits")
    assert model.wait_closed(5), "unloading must close the session"
    with pytest.raises(ModelNotFound, match="unknown model 'digits'"):
        runtime.infer("digits", {"input": digits_input})


def test_model_metadata(runtime: Runtime, digits_package) -> None:
    runtime.load(digits_package.root)
    m = runtime.model("digits")
    assert m.inputs == [TensorSpec("input", "FP32", (-1, 64))]
    assert m.outputs == [TensorSpec("probabilities", "FP32", (-1, 10))]
    d = m.describe()
    assert d["variant"] == "onnx-fp32" and d["format"] == "onnx" and d["device"] == "CPU"
    assert d["sha256"] == digits_package.variant("onnx-fp32").files[0].sha256


def test_batch_of_any_size(runtime: Runtime, digits_package) -> None:
    runtime.load(digits_package.root)
    for n in (1, 7, 64):
        assert runtime.infer("digits", {"input": np.zeros((n, 64), np.float32)})["probabilities"].shape == (n, 10)


def test_version_swap_keeps_serving(runtime: Runtime, digits_package, package_copy,
                                    digits_input: np.ndarray) -> None:
    v1 = runtime.load(digits_package.root)
    v2_root = package_copy(lambda d: d.update(version=2), name="digits-v2")
    errors: list[BaseException] = []
    served: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                runtime.infer("digits", {"input": digits_input})
                served.append(runtime.model("digits").version)
            except BaseException as exc:  # any failure during the swap is a dropped request
                errors.append(exc)

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition() and not errors and time.monotonic() < deadline:
            time.sleep(0.001)

    t = threading.Thread(target=client)
    t.start()
    try:
        wait_for(lambda: len(served) >= 3)
        v2 = runtime.prepare(v2_root)
        assert runtime.model("digits") is v1, "prepare must not start serving the new version"
        retired = runtime.activate(v2)
        assert retired == [v1]
        wait_for(lambda: served.count(2) >= 5)
    finally:
        stop.set()
        t.join(10)
    assert errors == []
    assert 1 in served and served[-1] == 2
    assert runtime.model("digits").version == 2
    assert v1.wait_closed(5), "the old version is closed once its requests are done"
    with pytest.raises(ModelNotFound, match="no version 1"):
        runtime.model("digits", 1)


def test_keep_other_versions_serves_both(runtime: Runtime, digits_package, package_copy,
                                         digits_input: np.ndarray) -> None:
    runtime.load(digits_package.root)
    runtime.load(package_copy(lambda d: d.update(version=2), name="digits-v2"), keep_other_versions=True)
    assert [m.version for m in runtime.models()] == [1, 2]
    assert runtime.model("digits").version == 2
    a = runtime.infer("digits", {"input": digits_input}, version=1)["probabilities"]
    b = runtime.infer("digits", {"input": digits_input}, version=2)["probabilities"]
    np.testing.assert_allclose(a, b, atol=1e-6)
    runtime.unload("digits", 2)
    assert runtime.model("digits").version == 1


def test_run_command_prints_outputs(cli, digits_package, digits_input: np.ndarray, tmp_path: Path) -> None:
    x = tmp_path / "x.npy"
    np.save(x, digits_input)
    save = tmp_path / "out.npz"
    rc, out, err = cli("run", digits_package.root, "--input", f"input={x}", "--profile", "generic-x86_64",
                       "--save", save)
    assert rc == 0, err
    assert "digits v1: onnx-fp32 on onnxruntime" in out
    assert "probabilities float32 [2, 10]" in out
    saved = np.load(save)["probabilities"]
    np.testing.assert_allclose(saved, digits_package.samples[0].expected["probabilities"], atol=1e-4)


def test_run_command_with_a_bad_input_file_or_name(cli, digits_package, tmp_path: Path) -> None:
    rc, _, err = cli("run", digits_package.root, "--input", f"input={tmp_path / 'missing.npy'}")
    assert rc == 66 and "missing.npy" in err
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 64), np.float32))
    rc, _, err = cli("run", digits_package.root, "--input", f"pixels={x}", "--profile", "generic-x86_64")
    assert rc == 65 and "unknown input(s) ['pixels']" in err
    rc, _, err = cli("run", digits_package.root, "--input", str(x))
    assert rc == 2 and "NAME=file.npy" in err
