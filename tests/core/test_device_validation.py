"""A device checks a quantized variant on the package's validation sample before serving it, and takes the next
choice when this CPU's kernels disagree with what the hub measured."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgerun.errors import VariantRejected
from edgerun.package import ModelPackage, Validation, file_entry, save_package
from edgerun.profiles import Profile
from edgerun.runtime import Runtime
from edgerun.testing.models import digits_data, mlp_onnx, random_mlp_weights


def _package(digits_package: ModelPackage, root: Path, *, bad_int8: bool) -> ModelPackage:
    """The digits package with a validation sample, its int8 variant recorded as more accurate (so it is chosen
    first) and agreeing with fp32 on the whole sample at the hub; with ``bad_int8`` its file answers otherwise."""
    shutil.copytree(digits_package.root, root)
    pkg = ModelPackage.load(root)
    _, _, x_val, _ = digits_data()
    import onnxruntime as ort

    fp32 = pkg.variant("onnx-fp32")
    ref = ort.InferenceSession(str(root / fp32.main_file.path), providers=["CPUExecutionProvider"])
    x = x_val[:64]
    pkg.validation = Validation({"input": x}, np.argmax(ref.run(None, {"input": x})[0], axis=1))
    int8 = pkg.variant("onnx-int8")
    if bad_int8:  # a real int8 model whose answers are not fp32's, as kernels that saturate would give
        from onnxruntime.quantization import QuantType, quantize_dynamic

        other = mlp_onnx(random_mlp_weights([64, 64, 10], seed=11), root / "other.fp32.onnx")
        quantize_dynamic(str(other), str(root / int8.main_file.path), weight_type=QuantType.QInt8)
        other.unlink()
    int8 = dataclasses.replace(int8, files=(file_entry(root, int8.main_file.path),), accuracy=0.99, atol=10.0,
                               info={"validation": {"agreement": 1.0, "samples": 64}})
    pkg.variants = [dataclasses.replace(fp32, accuracy=0.95), int8]
    save_package(pkg, root)
    return ModelPackage.load(root)


@pytest.fixture
def ort_first() -> Profile:
    return Profile(name="ort-first", prefer=("onnxruntime",))


def test_a_quantized_variant_that_agrees_here_is_served_and_says_so(digits_package, tmp_path, ort_first):
    pkg = _package(digits_package, tmp_path / "good", bad_int8=False)
    with Runtime(profile=ort_first) as rt:
        m = rt.load(pkg.root)
        assert m.variant.id == "onnx-int8"
        assert m.validation["samples"] == 64 and m.validation["agreement"] >= 0.97
        assert m.describe()["validation"] == m.validation


def test_a_quantized_variant_that_disagrees_here_is_set_aside_for_the_next_choice(digits_package, tmp_path,
                                                                                  ort_first):
    pkg = _package(digits_package, tmp_path / "bad", bad_int8=True)
    with Runtime(profile=ort_first) as rt:
        m = rt.load(pkg.root)
        assert m.variant.id == "onnx-fp32"  # the int8 one was tried first, then set aside
        explained = rt.explain(pkg.root)
        aside = [c for c in explained.candidates if c.variant.id == "onnx-int8"]
        assert aside and all(not c.kept and c.reason.startswith("failed this device's validation") for c in aside)
        assert "agrees with fp32 on" in aside[0].reason and "the hub measured 100%" in aside[0].reason
        np.testing.assert_allclose(rt.infer("digits", {"input": pkg.validation.inputs["input"][:2]})["probabilities"],
                                   pkg.samples[0].expected["probabilities"], atol=1e-4)
        with pytest.raises(VariantRejected, match="this CPU's int8 kernels give other answers"):
            rt.prepare(pkg.root, variant="onnx-int8", backend="onnxruntime")  # asked for by name: no fallback
    only_int8 = tmp_path / "only-int8"
    shutil.copytree(pkg.root, only_int8)
    solo = ModelPackage.load(only_int8)
    solo.variants = [solo.variant("onnx-int8")]
    save_package(solo, only_int8)
    with Runtime(profile=ort_first) as rt, pytest.raises(VariantRejected):
        rt.load(only_int8)  # nothing else on disk (a staged update): the caller fetches the next variant


def test_an_int8_variant_made_for_other_cpus_is_not_chosen_here(digits_package, tmp_path, ort_first):
    from edgerun.device import detect

    pkg = _package(digits_package, tmp_path / "targets", bad_int8=False)
    here = detect().cpu_class
    others = [c for c in ("x86-vnni", "x86", "arm64") if c != here]
    int8 = dataclasses.replace(pkg.variant("onnx-int8"), info={"int8": {"targets": others},
                                                               "validation": {"agreement": 1.0}})
    pkg.variants = [pkg.variant("onnx-fp32"), int8]
    save_package(pkg, pkg.root)
    with Runtime(profile=ort_first) as rt:
        c = rt.explain(pkg.root)
        dropped = [x for x in c.candidates if x.variant.id == "onnx-int8"]
        assert dropped and all(not x.kept and f"not this one ({here})" in x.reason for x in dropped)
        assert rt.load(pkg.root).variant.id == "onnx-fp32"
