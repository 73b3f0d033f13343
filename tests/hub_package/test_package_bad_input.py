"""Bad input to ``edgerun hub package``: each gets a clear error before any work, or a skip with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgerun.errors import PackageError
from edgerun.hub.packager import PackageRequest, Progress, package_model
from edgerun.hub.tflite import INT4_REASON
from edgerun.package import ModelPackage


def _req(files, out, **kw) -> PackageRequest:
    base = dict(model=files["model"], name="digits", version=1, validation=files["val"], out=out,
                precisions=("fp32",), formats=("onnx",), backends=("onnxruntime",), repeats=10)
    return PackageRequest(**{**base, **kw})


def _edgerun(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=300, cwd=cwd)


def test_a_file_that_is_not_onnx_is_refused(digits_files, tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(PackageError, match="not an ONNX model"):
        package_model(_req(digits_files, tmp_path / "out", model=junk))
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(b"TFL3")
    with pytest.raises(PackageError, match=r"expected an ONNX model \(\.onnx\)"):
        package_model(_req(digits_files, tmp_path / "out", model=tflite))
    assert not (tmp_path / "out").exists()


def test_validation_names_and_shapes_must_match_the_model(digits_files, tmp_path):
    x = np.zeros((5, 64), np.float32)
    np.savez(tmp_path / "names.npz", pixels=x, labels=np.zeros(5, np.int64))
    with pytest.raises(PackageError, match=r"lacks model input\(s\) \['input'\].*unknown array\(s\) \['pixels'\]"):
        package_model(_req(digits_files, tmp_path / "out", validation=tmp_path / "names.npz"))
    np.savez(tmp_path / "shape.npz", input=np.zeros((5, 8, 8), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(PackageError, match=r"'input' has shape \[5, 8, 8\], the model needs \[N, 64\]"):
        package_model(_req(digits_files, tmp_path / "out", validation=tmp_path / "shape.npz"))
    np.savez(tmp_path / "labels.npz", input=x, labels=np.zeros(4, np.int64))
    with pytest.raises(PackageError, match=r"'labels' must be 5 integer class ids"):
        package_model(_req(digits_files, tmp_path / "out", validation=tmp_path / "labels.npz"))


def test_accuracy_without_labels_is_refused(digits_files, tmp_path):
    np.savez(tmp_path / "nolabels.npz", input=np.zeros((5, 64), np.float32))
    with pytest.raises(PackageError, match="--metric accuracy needs an integer array named 'labels'"):
        package_model(_req(digits_files, tmp_path / "out", validation=tmp_path / "nolabels.npz", metric="accuracy"))


def test_an_empty_calibration_set_is_refused(digits_files, tmp_path):
    np.savez(tmp_path / "empty.npz", input=np.zeros((0, 64), np.float32))
    with pytest.raises(PackageError, match="calibration set is empty"):
        package_model(_req(digits_files, tmp_path / "out", precisions=("fp32", "int8"),
                           calibration=tmp_path / "empty.npz"))


def test_calibration_data_of_the_wrong_shape_is_refused_from_the_command_line(digits_files, tmp_path):
    np.savez(tmp_path / "calib.npz", input=np.zeros((20, 8, 8), np.float32))  # images, the model takes [N, 64]
    out = tmp_path / "out"
    r = _edgerun("hub", "package", str(digits_files["model"]), "--name", "digits", "--version", "1",
                 "--validation", str(digits_files["val"]), "--calibration", str(tmp_path / "calib.npz"),
                 "--out", str(out), "--precisions", "fp32,int8", "--formats", "onnx", "--backends", "onnxruntime")
    assert r.returncode == 65, r.stderr
    assert "calibration data" in r.stderr and "shape [20, 8, 8]" in r.stderr and "[N, 64]" in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))  # nothing half-written


def test_unknown_precision_or_format_is_refused(digits_files, tmp_path):
    with pytest.raises(PackageError, match="--precisions: unknown \\['int3'\\]"):
        package_model(_req(digits_files, tmp_path / "out", precisions=("fp32", "int3")))
    with pytest.raises(PackageError, match="--formats: unknown \\['coreml'\\]"):
        package_model(_req(digits_files, tmp_path / "out", formats=("coreml",)))


def test_existing_out_is_refused_unless_force(digits_files, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("someone's work")
    r = _edgerun("hub", "package", str(digits_files["model"]), "--name", "digits", "--version", "1",
                 "--validation", str(digits_files["val"]), "--out", str(out), "--precisions", "fp32",
                 "--formats", "onnx", "--backends", "onnxruntime")
    assert r.returncode == 65
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "someone's work"
    r = _edgerun("hub", "package", str(digits_files["model"]), "--name", "digits", "--version", "1",
                 "--validation", str(digits_files["val"]), "--out", out.name, "--precisions", "fp32,int4,int8",
                 "--formats", "onnx,tflite", "--backends", "onnxruntime", "--repeats", "10", "--force",
                 cwd=tmp_path)  # a relative --out
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists()
    assert "onnx-fp32" in r.stdout and "peak memory" in r.stdout  # the summary table
    assert "skipped" in r.stdout and "no int4 TFLite" in r.stdout  # tflite-int4
    # onnx2tf's and TensorFlow's own output stays out of the CLI
    assert not any(noise in r.stdout + r.stderr for noise in ("absl", "oneDNN", "Saved artifact", "fully_quantize"))
    assert ModelPackage.load(out).variant("onnx-fp32").accuracy > 0.9


class _Recorder(Progress):
    """The progress callbacks the CLI's bar receives."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.steps: list[str] = []

    def total(self, n: int) -> None:
        self.totals.append(n)

    def step(self, message: str) -> None:
        self.steps.append(message)


def test_a_precision_the_tools_cannot_make_is_skipped_and_the_others_are_made(digits_files, tmp_path):
    bar = _Recorder()
    report = package_model(_req(digits_files, tmp_path / "out", precisions=("fp32", "int8", "int4"),
                                formats=("onnx", "tflite")), bar)
    assert bar.totals and len(bar.steps) == bar.totals[-1]  # the bar ends full, skipped variants included
    assert "measuring onnx-int4 on onnxruntime" in bar.steps
    assert not any(m.startswith("measuring tflite") for m in bar.steps)
    by = {v.id: v for v in report.variants}
    assert by["tflite-int4"].status == "skipped" and by["tflite-int4"].reason == INT4_REASON
    # converted (or skipped without the hub-tflite extra), not measured: litert is not among the backends
    assert all(by[v].status in ("dropped", "skipped") for v in ("tflite-fp32", "tflite-int8", "tflite-int8-dynamic"))
    assert by["onnx-int4"].status != "skipped" and by["onnx-int4"].results["onnxruntime"].accuracy > 0.9
    assert by["onnx-fp32"].status == "kept"


def test_without_the_hub_extra_the_command_says_what_to_install(digits_files, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "onnx.py").write_text("raise ImportError('onnx is not installed (test)')\n")
    r = _edgerun("hub", "package", str(digits_files["model"]), "--name", "d", "--version", "1",
                 "--validation", str(digits_files["val"]), "--out", str(tmp_path / "o"),
                 env={"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 69
    assert "pip install 'edgerun[hub]'" in r.stderr and "onnx" in r.stderr
    r = _edgerun("--help", env={"PYTHONPATH": str(blocker)})
    assert r.returncode == 0 and "hub" in r.stdout
