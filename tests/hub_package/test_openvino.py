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
