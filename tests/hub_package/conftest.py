"""Real models and data for the packaging tests: the digits MLP and a small MobileNet-like CNN, packaged once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnn import mobilenet_onnx, structured_images

SMALL_CNN = dict(size=32, stem=16, blocks=((32, 2), (64, 2), (64, 1)))


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> dict[str, Path]:
    """digits MLP as ONNX, validation .npz with labels, calibration .npz (training rows)."""
    from edgerun.testing.models import digits_data, mlp_onnx, sklearn_weights, train_digits_mlp

    root = tmp_path_factory.mktemp("digits-src")
    x_train, _, x_val, y_val = digits_data()
    model = mlp_onnx(sklearn_weights(train_digits_mlp()), root / "digits.onnx")
    np.savez(root / "val.npz", input=x_val, labels=y_val)
    np.savez(root / "calib.npz", input=x_train[:200])
    return {"model": model, "val": root / "val.npz", "calib": root / "calib.npz", "root": root}


@pytest.fixture(scope="session")
def digits_packaged(digits_files, tmp_path_factory):
    """The digits model packaged with fp32, fp16, int8 and 50% pruning (ONNX, on onnxruntime): (report, package dir)."""
    from edgerun.hub.packager import PackageRequest, package_model

    out = tmp_path_factory.mktemp("digits-pkg") / "digits"
    req = PackageRequest(model=digits_files["model"], name="digits", version=3, validation=digits_files["val"],
                         calibration=digits_files["calib"], out=out, precisions=("fp32", "fp16", "int8"),
                         formats=("onnx",), backends=("onnxruntime",), prune=0.5, repeats=30)
    return package_model(req), out


@pytest.fixture(scope="session")
def cnn_files(tmp_path_factory) -> dict[str, Path]:
    """A small CNN (9k parameters, 3x32x32), unlabelled validation images and a calibration set."""
    root = tmp_path_factory.mktemp("cnn-src")
    model = mobilenet_onnx(root / "cnn.onnx", head_images=structured_images(200, 32, seed=1), **SMALL_CNN)
    np.savez(root / "val.npz", image=structured_images(200, 32, seed=5))
    np.savez(root / "calib.npz", image=structured_images(64, 32, seed=6))
    return {"model": model, "val": root / "val.npz", "calib": root / "calib.npz", "root": root}
