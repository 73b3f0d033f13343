"""fp16 of a model whose output feeds another output, and a description that names only what measured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgerun.hub.packager import PackageRequest, package_model
from edgerun.package import ModelPackage
from edgerun.runtime import Runtime


def test_fp16_of_chained_outputs_runs_and_the_description_names_what_measured(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "chained",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(5, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    x = rng.normal(size=(60, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, labels=np.argmax(x @ w, axis=1))
    if not Runtime().backends["litert"].check().available:
        pytest.skip("needs the litert backend: an available backend that measures nothing here")
    # litert is available and asked for, but loads no ONNX: it measures nothing, so the description must not name it
    report = package_model(PackageRequest(model=tmp_path / "m.onnx", name="chained", version=1,
                                          validation=tmp_path / "val.npz", out=tmp_path / "pkg",
                                          precisions=("fp32", "fp16"), formats=("onnx",),
                                          backends=("onnxruntime", "litert"), repeats=10))
    fp16 = next(v for v in report.variants if v.id == "onnx-fp16")
    assert fp16.results["onnxruntime"].error is None, fp16.results  # onnxruntime loads and runs it
    assert fp16.results["onnxruntime"].accuracy == 1.0
    with Runtime() as rt:
        m = rt.prepare(tmp_path / "pkg", variant="onnx-fp32", backend="onnxruntime")
        out = m.run({"x": x[:3]})
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert report.backends == ["onnxruntime", "litert"]
    description = ModelPackage.load(tmp_path / "pkg").description
    assert "onnxruntime (onnx-fp32" in description and "litert" not in description
