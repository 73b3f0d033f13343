"""The example package the README points at: it verifies, explains and runs as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgerun.package import ModelPackage

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def example() -> ModelPackage:
    return ModelPackage.load(EXAMPLE)


def test_example_files_match_their_recorded_digests(example: ModelPackage) -> None:
    assert {v.id for v in example.variants} == {"onnx-fp32", "onnx-int8"}
    for variant in example.variants:
        example.verify(variant)
        assert variant.accuracy is not None and variant.accuracy > 0.9


def test_explain_example(cli, example: ModelPackage) -> None:
    rc, out, _ = cli("explain", EXAMPLE, "--profile", "generic-x86_64")
    assert rc == 0
    assert sum("onnx-fp32" in line for line in out.splitlines()) >= 1
    assert any("onnx-int8" in line and "kept" in line for line in out.splitlines())
    assert any("onnx-fp32" in line and "chosen" in line for line in out.splitlines())


def test_run_example_with_its_sample_input(cli, example: ModelPackage) -> None:
    x = np.load(EXAMPLE / "sample_input.npy")
    np.testing.assert_array_equal(x, example.samples[0].inputs["input"])
    rc, out, err = cli("run", EXAMPLE, "--input", f"input={EXAMPLE / 'sample_input.npy'}",
                       "--profile", "generic-x86_64")
    assert rc == 0, err
    assert "probabilities float32 [2, 10]" in out


@pytest.mark.parametrize("variant", ["onnx-fp32", "onnx-int8"])
def test_example_accuracy_is_what_the_package_records(example: ModelPackage, cpu_profile, variant: str) -> None:
    """The recorded accuracy is the variant's real top-1 on scikit-learn digits' validation split.

    One image per request: dynamic int8 quantizes activations per batch, so its score moves with the batching.
    """
    from edgerun.runtime import Runtime
    from edgerun.testing.models import accuracy_of, digits_data

    _, _, x_val, y_val = digits_data(seed=0)
    with Runtime(profile=cpu_profile) as rt:
        model = rt.load(EXAMPLE, variant=variant, backend="onnxruntime")
        acc = accuracy_of(lambda xb: rt.infer("digits", {"input": xb})["probabilities"], x_val, y_val, batch=1)
    recorded = model.variant.measured["onnxruntime"].accuracy or model.variant.accuracy
    assert acc > 0.9 and acc == pytest.approx(recorded, abs=1e-4)
