"""Small real models with a recognisable byte pattern in their weights, and scans for that pattern.

The hidden layer's biases of a 64-256-10 MLP are a fixed ramp of floats: their bytes appear in the clear model file
of every format (ONNX, OpenVINO IR's .bin, .tflite) and nowhere else, so finding them in a file means a clear model
was written there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from edgerun.package import ModelPackage, Sample, Variant, file_entry, save_package
from edgerun.tensors import TensorSpec

HIDDEN = 256


def marker_bias(hidden: int) -> np.ndarray:
    return (0.123456 + np.arange(hidden) * 1e-4).astype(np.float32)


MARKER = marker_bias(64).tobytes()  # 256 bytes a scan looks for
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert"}


def marked_weights(seed: int = 0, hidden: int = HIDDEN) -> list[tuple[np.ndarray, np.ndarray]]:
    from edgerun.testing.models import random_mlp_weights

    weights = random_mlp_weights([64, hidden, 10], seed=seed)
    weights[0] = (weights[0][0], marker_bias(hidden))
    return weights


def marked_package(root: Path, fmt: str, version: int, *, name: str = "digits", seed: int = 0,
                   hidden: int = HIDDEN) -> ModelPackage:
    """A one-variant package of the marked MLP (64-``hidden``-10, about ``hidden`` KiB) in ``fmt`` (onnx, openvino
    or tflite), with a warm-up sample whose expected output comes from onnxruntime on the ONNX model."""
    import onnxruntime as ort

    from edgerun.testing.models import mlp_onnx

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weights = marked_weights(seed, hidden)
    src = mlp_onnx(weights, root / ("model.onnx" if fmt == "onnx" else ".source.onnx"))
    x = np.random.default_rng(seed).random((1, 64), dtype=np.float32)
    y = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    if fmt == "onnx":
        files = [file_entry(root, "model.onnx")]
    elif fmt == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(src)), str(root / "model.xml"), compress_to_fp16=False)
        files = [file_entry(root, "model.xml"), file_entry(root, "model.bin")]
    elif fmt == "tflite":
        from edgerun.testing.tflite import mlp_tflite

        mlp_tflite(weights, root / "model.tflite")
        files = [file_entry(root, "model.tflite")]
    else:
        raise ValueError(f"no marked model in format {fmt!r}")
    if fmt != "onnx":
        src.unlink()
    pkg = ModelPackage(name=name, version=version, inputs=[TensorSpec("input", "FP32", (-1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
                       variants=[Variant(f"{fmt}-fp32", fmt, "fp32", tuple(files), accuracy=0.9, atol=1e-4)],
                       samples=[Sample({"input": x}, {"probabilities": y})])
    save_package(pkg, root)
    out = ModelPackage.load(root)
    if not any(MARKER in (root / f.path).read_bytes() for f in out.variants[0].files):
        raise AssertionError(f"the {fmt} model does not hold the marker: a scan for it would prove nothing")
    return out


def holds_marker(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether the file at ``path`` holds the marker anywhere (read in chunks that overlap by the marker's length)."""
    tail = b""
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                if MARKER in tail + block:
                    return True
                tail = block[-len(MARKER):]
    except OSError:
        return False
    return False


def scan_tree(roots: Iterable[Path], *, skip: Iterable[Path] = (), newer_than: float | None = None) -> list[str]:
    """Every regular file under ``roots`` (not under ``skip``; modified after ``newer_than``) holding the marker."""
    skip = [Path(s).resolve() for s in skip]
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath).resolve()
            if any(here == s or s in here.parents for s in skip):
                dirnames[:] = []
                continue
            for name in filenames:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not p.is_file() or p.is_symlink() or (newer_than is not None and st.st_mtime < newer_than):
                    continue
                if holds_marker(p):
                    found.append(str(p))
    return found


def scan_open_files(pid: int) -> list[str]:
    """Every regular file the process ``pid`` has open (deleted ones and memfds included) that holds the marker."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(fd)
            if not Path(fd).is_file():  # sockets, pipes, devices
                continue
        except OSError:
            continue
        if holds_marker(fd):
            found.append(target)
    return found
