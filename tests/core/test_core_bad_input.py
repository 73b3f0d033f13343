"""Bad packages, files and requests: each is refused with a message that says what is wrong and where."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edgerun.errors import IntegrityError, InvalidInput, ModelLoadError, NoVariantFits, PackageError
from edgerun.package import ModelPackage
from edgerun.runtime import Runtime


def _set_file(data: dict, path: str, content: bytes) -> None:
    """Record ``content``'s real size and sha256 for ``path`` in edgerun.toml data."""
    for variant in data["variants"]:
        for f in variant["files"]:
            if f["path"] == path:
                f["sha256"], f["size"] = hashlib.sha256(content).hexdigest(), len(content)


def test_missing_variant_file(runtime: Runtime, package_copy) -> None:
    root = package_copy()
    (root / "model.int8.onnx").unlink()
    with pytest.raises(IntegrityError) as err:
        runtime.load(root, variant="onnx-int8")
    assert "model.int8.onnx" in str(err.value) and "missing" in str(err.value)
    assert runtime.load(root).variant.id == "onnx-fp32"  # the intact variant still loads


def test_a_format_no_backend_loads_is_dropped_with_the_formats_that_load(runtime: Runtime, package_copy) -> None:
    """Which formats exist is up to the backends installed (a plugin can bring one): the package loads, the
    variant no backend reads is dropped with the reason, and the others serve."""
    root = package_copy(lambda d: d["variants"][1].update(format="pytorch"))
    choice = runtime.explain(ModelPackage.load(root))
    dropped = next(c for c in choice.candidates if c.variant.id == "onnx-int8")
    assert not dropped.kept and "no installed backend loads format 'pytorch'" in dropped.reason
    assert "onnx, openvino, tflite" in dropped.reason
    assert runtime.load(root).variant.id == "onnx-fp32"
    bad = package_copy(lambda d: d["variants"][1].update(format="Py Torch!"), name="bad")
    with pytest.raises(PackageError) as err:
        ModelPackage.load(bad)
    assert str(bad / "edgerun.toml") in str(err.value) and "variants[1].format" in str(err.value)


def test_not_a_package_directory(tmp_path: Path, runtime: Runtime) -> None:
    with pytest.raises(PackageError, match="no edgerun.toml"):
        runtime.load(tmp_path)


def test_corrupt_model_file_with_matching_sha256_is_a_load_error(runtime: Runtime, package_copy) -> None:
    garbage = b"\x00not an onnx model\xff" * 100
    root = package_copy(lambda d: _set_file(d, "model.fp32.onnx", garbage))
    (root / "model.fp32.onnx").write_bytes(garbage)
    with pytest.raises(ModelLoadError) as err:
        runtime.load(root, variant="onnx-fp32")
    assert "model.fp32.onnx" in str(err.value) and "onnxruntime" in str(err.value)
    with pytest.raises(Exception):
        runtime.model("digits")  # nothing half-loaded is serving


def test_sha256_mismatch_names_the_file_and_both_digests(runtime: Runtime, package_copy) -> None:
    root = package_copy()
    path = root / "model.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    recorded = ModelPackage.load(root).variant("onnx-fp32").files[0].sha256
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(IntegrityError) as err:
        runtime.load(root, variant="onnx-fp32")
    msg = str(err.value)
    assert str(path) in msg and recorded in msg and actual in msg


def test_size_mismatch_is_an_integrity_error(runtime: Runtime, package_copy) -> None:
    root = package_copy()
    with open(root / "model.int8.onnx", "ab") as f:
        f.write(b"extra")
    with pytest.raises(IntegrityError, match=r"model\.int8\.onnx: size \d+ bytes, expected \d+"):
        runtime.load(root, variant="onnx-int8")


def test_package_inputs_that_do_not_match_the_model(runtime: Runtime, package_copy) -> None:
    def rename(d: dict) -> None:
        d["inputs"][0]["name"] = "pixels"
        for sample in d["samples"]:
            sample["inputs"]["pixels"] = sample["inputs"].pop("input")

    root = package_copy(rename)
    with pytest.raises(PackageError) as err:
        runtime.load(root)
    msg = str(err.value)
    assert "declares input 'pixels'" in msg and "['input']" in msg


def test_package_shape_that_does_not_match_the_model(runtime: Runtime, package_copy) -> None:
    root = package_copy(lambda d: d["outputs"][0].update(shape=[-1, 12]))
    with pytest.raises(PackageError, match=r"output 'probabilities' has shape \[-1, 12\] in edgerun.toml but "
                                           r"\[-1, 10\] in the model"):
        runtime.load(root, warmup=False)


@pytest.fixture(scope="module")
def loaded(digits_package, bundled_profiles):
    with Runtime(profile=bundled_profiles["generic-x86_64"]) as rt:
        rt.load(digits_package.root)
        yield rt


def test_infer_with_a_wrong_input_name(loaded: Runtime, digits_input: np.ndarray) -> None:
    with pytest.raises(InvalidInput) as err:
        loaded.infer("digits", {"image": digits_input})
    msg = str(err.value)
    assert "missing input(s) ['input']" in msg and "unknown input(s) ['image']" in msg


def test_infer_with_a_wrong_dtype(loaded: Runtime, digits_input: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match=r"input 'input': dtype float64, model expects float32"):
        loaded.infer("digits", {"input": digits_input.astype(np.float64)})


@pytest.mark.parametrize("shape", [(2, 63), (64,), (1, 8, 8)])
def test_infer_with_a_wrong_shape(loaded: Runtime, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInput) as err:
        loaded.infer("digits", {"input": np.zeros(shape, np.float32)})
    assert f"input 'input': shape {list(shape)}, model expects [-1, 64]" in str(err.value)


def test_infer_asking_for_an_unknown_output(loaded: Runtime, digits_input: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match=r"has no output 'logits'; its outputs are \['probabilities'\]"):
        loaded.infer("digits", {"input": digits_input}, outputs=["logits"])


def test_a_bad_request_does_not_stop_serving(loaded: Runtime, digits_input: np.ndarray) -> None:
    with pytest.raises(InvalidInput):
        loaded.infer("digits", {"input": np.zeros((1, 3), np.float32)})
    assert loaded.infer("digits", {"input": digits_input})["probabilities"].shape == (2, 10)


def test_budget_too_small_for_every_variant(runtime: Runtime, measured_digits) -> None:
    with pytest.raises(NoVariantFits) as err:
        runtime.prepare(measured_digits, memory_budget="5MiB")
    msg = str(err.value)
    assert "budget of 5.0 MiB" in msg and "'onnx-int8'" in msg and "needs 12.0 MiB" in msg


def test_warm_up_output_mismatch_refuses_the_model(runtime: Runtime, package_copy) -> None:
    def tamper(d: dict) -> None:
        d["samples"][0]["expected"]["probabilities"] = {"datatype": "FP32", "shape": [2, 10], "data": [0.1] * 20}

    root = package_copy(tamper)
    with pytest.raises(ModelLoadError) as err:
        runtime.load(root, variant="onnx-fp32")
    msg = str(err.value)
    assert "warm-up sample 0" in msg and "'probabilities' differs from the expected output" in msg
    assert "digits" not in [m.name for m in runtime.models()]
