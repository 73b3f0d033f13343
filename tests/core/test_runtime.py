"""The in-process Runtime: load, infer, metadata, version swaps, unload; and ``edgerun run``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgerun.errors import ModelNotFound, ModelNotReady
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


class _CountingSession:
    """A session that fails loudly if it runs after close, and counts closes."""

    def __init__(self) -> None:
        self.closed = 0
        self.late_runs = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started_closed = self.closed
        time.sleep(0)  # give another thread the GIL mid-run
        if started_closed or self.closed:  # run on, or closed under, a running request
            self.late_runs += 1
        return {"y": inputs["x"]}

    def close(self) -> None:
        self.closed += 1

    @property
    def device(self) -> str:
        return "CPU"


def test_retire_racing_many_runs_never_runs_a_closed_session_and_closes_once() -> None:
    """In-flight accounting is lock-free; a run and retire() racing must still resolve one way or the other."""
    from edgerun.errors import Retired
    from edgerun.package import ModelPackage, Variant
    from edgerun.runtime import LoadedModel

    spec = [TensorSpec("x", "FP32", (-1, 1))]
    pkg = ModelPackage(name="m", version=1, inputs=spec, outputs=[TensorSpec("y", "FP32", (-1, 1))],
                       variants=[Variant("v", "onnx", "fp32", ())])
    x = {"x": np.zeros((1, 1), np.float32)}
    for _ in range(30):
        session = _CountingSession()
        model = LoadedModel(pkg, pkg.variants[0], "fake", session, 0, 0.0)  # type: ignore[arg-type]
        go = threading.Barrier(5)

        def runner() -> None:
            go.wait()
            for _ in range(300):
                try:
                    model.run(x)
                except Retired:  # retired: the runner backs out, as Runtime.infer would look again
                    return

        threads = [threading.Thread(target=runner) for _ in range(4)]
        for t in threads:
            t.start()
        go.wait()
        time.sleep(0.001)
        model.retire()
        for t in threads:
            t.join(10)
        assert model.wait_closed(5), "the retired model never closed"
        assert session.late_runs == 0, "a session was closed before or during a run"
        assert session.closed == 1
        assert model.inflight == 0
        with pytest.raises(ModelNotReady, match="model 'm' version 1 was replaced or unloaded"):
            model.run(x)
