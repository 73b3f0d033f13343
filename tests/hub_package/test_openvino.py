"""OpenVINO IR variants: converted, NNCF-compressed, measured on the OpenVINO backend when it is available."""

from __future__ import annotations

import pytest

from edgerun.hub.packager import PackageRequest, package_model
from edgerun.package import ModelPackage
from edgerun.runtime import Runtime

pytest.importorskip("openvino")


def test_openvino_ir_variants_are_made_and_measured(digits_files, tmp_path):
    rt = Runtime()
    ov = rt.backends.get("openvino")
    if ov is None or not ov.availability().available:
        pytest.skip("no OpenVINO backend plugin here")
    out = tmp_path / "ov"
    report = package_model(PackageRequest(
        model=digits_files["model"], name="digits", version=1, validation=digits_files["val"],
        calibration=digits_files["calib"], out=out, precisions=("fp32", "int8", "int4"), formats=("openvino",),
        backends=("onnxruntime", "openvino"), repeats=20))
    by = {v.id: v for v in report.variants}
    for vid in ("openvino-fp32", "openvino-int8-nncf", "openvino-int8-weights", "openvino-int4"):
        v = by[vid]
        assert v.status in ("kept", "dropped"), (vid, v.reason)
        r = v.results["openvino"]
        assert r.error is None and r.latency_ms > 0 and r.accuracy > 0.85, (vid, r)
    nncf, weights = by["openvino-int8-nncf"], by["openvino-int8-weights"]
    assert [x.status for x in (nncf, weights)].count("dropped") >= 1  # one int8 method per format
    pkg = ModelPackage.load(out)
    for v in pkg.variants:
        assert v.format in ("openvino", "onnx")
        if v.format == "openvino":
            assert [f.path.rsplit(".", 1)[1] for f in v.files] == ["xml", "bin"]
            assert set(v.measured) == {"openvino"}
            Runtime(threads=1).prepare(out, variant=v.id, backend="openvino").retire()


def _openvino_here() -> None:
    ov = Runtime().backends.get("openvino")
    if ov is None or not ov.availability().available:
        pytest.skip("no OpenVINO backend plugin here")


def test_fp16_variant_loads_on_onnxruntime_and_openvino_with_the_models_output_names(digits_files, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgerun.hub.quantize import interface, load_onnx, make_fp16
    from edgerun.package import Sample, Variant, file_entry, save_package

    _openvino_here()
    root = tmp_path / "pkg"
    root.mkdir()
    make_fp16(digits_files["model"], root / "onnx-fp16.onnx")
    inputs, outputs = interface(load_onnx(digits_files["model"]))
    with np.load(digits_files["val"]) as z:
        x, y = z["input"], z["labels"]
    fp32 = ort.InferenceSession(str(digits_files["model"]), providers=["CPUExecutionProvider"])
    sample = Sample({"input": x[:2]}, {"probabilities": fp32.run(None, {"input": x[:2]})[0]})
    save_package(ModelPackage("digits", 1, inputs, outputs, [Variant(
        "onnx-fp16", "onnx", "fp16", (file_entry(root, "onnx-fp16.onnx"),), atol=1e-2)], [sample]), root)
    rt = Runtime(threads=1)
    for backend in ("onnxruntime", "openvino"):
        model = rt.prepare(root, variant="onnx-fp16", backend=backend)  # declared outputs and warm-up checked
        try:
            assert [o.name for o in model.outputs] == ["probabilities"], backend
            top = np.argmax(model.run({"input": x})["probabilities"], axis=1)
            assert np.mean(top == y) > 0.95, backend
        finally:
            model.retire()


def test_nncf_variants_hold_quantized_weights(digits_files, tmp_path):
    from edgerun.hub.packager import load_dataset
    from edgerun.hub.quantize import interface, load_onnx, make_openvino, weight_profile

    pytest.importorskip("nncf")
    model = load_onnx(digits_files["model"])
    inputs, _ = interface(model)
    calib, _ = load_dataset(digits_files["calib"], inputs, "calibration")
    types = {}
    for precision, method in (("fp32", "convert"), ("int8", "nncf"), ("int8", "weights"), ("int4", "weights")):
        xml = tmp_path / f"{precision}-{method}" / "model.xml"
        xml.parent.mkdir()
        make_openvino(digits_files["model"], xml, precision, method, calib, weight_profile(model))
        text = xml.read_text()
        types[(precision, method)] = {t for t in ("u4", "i4", "u8", "i8") if f'element_type="{t}"' in text}
        types[(precision, method)] |= {"FakeQuantize"} if 'type="FakeQuantize"' in text else set()
    assert types[("fp32", "convert")] == set()
    assert "FakeQuantize" in types[("int8", "nncf")]  # quantized activations and weights, calibrated
    assert types[("int8", "weights")] & {"u8", "i8"} and not types[("int8", "weights")] & {"u4", "i4"}
    assert types[("int4", "weights")] & {"u4", "i4"}
