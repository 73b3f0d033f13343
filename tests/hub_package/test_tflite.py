"""TFLite variants made by onnx2tf and measured on LiteRT: the ONNX interface kept, batch 1 and 4, failures skipped."""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgerun.hub import tflite
from edgerun.hub.packager import PackageRequest, package_model
from edgerun.package import ModelPackage
from edgerun.runtime import Runtime

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tensorflow", "onnx2tf", "ai_edge_litert")),
    reason="needs tensorflow, onnx2tf and ai-edge-litert (pip install 'edgerun[hub-tflite]')")

TFLITE = ("tflite-fp32", "tflite-fp16", "tflite-int8", "tflite-int8-dynamic")


def _package(files: dict[str, Path], out: Path, precisions: tuple[str, ...], **kw) -> tuple:
    req = PackageRequest(model=files["model"], name=out.name, version=1, validation=files["val"],
                         calibration=files.get("calib"), out=out, precisions=precisions, formats=("onnx", "tflite"),
                         backends=("onnxruntime", "litert"), repeats=10, **kw)
    report = package_model(req)
    return report, out, {v.id: v for v in report.variants}, files


@pytest.fixture(scope="module")
def digits_tflite(digits_files, tmp_path_factory):
    return _package(digits_files, tmp_path_factory.mktemp("tfl") / "digits", ("fp32", "fp16", "int8"))


@pytest.fixture(scope="module")
def cnn_tflite(cnn_files, tmp_path_factory):
    return _package(cnn_files, tmp_path_factory.mktemp("tfl") / "cnn", ("fp32", "int8"))


@pytest.fixture(params=["digits", "cnn"])
def packaged(request):
    return request.getfixturevalue(f"{request.param}_tflite")


def _onnx_outputs(model: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0]


def _cnn_onnx(path: Path, norm: bool = False) -> Path:
    """Conv 3x3 on an NCHW [N, 1, 8, 8] input, (GroupNormalization,) ReLU, global pool, Gemm, Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(8, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(8, np.float32), "bias"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 10)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["pixels", "w"], ["conv"], pads=[1, 1, 1, 1])]
    if norm:  # an op onnx2tf has no converter for (onnxruntime runs it)
        nodes.append(helper.make_node("GroupNormalization", ["conv", "scale", "bias"], ["normed"], num_groups=2))
    nodes += [helper.make_node("Relu", ["normed" if norm else "conv"], ["relu"]),
              helper.make_node("GlobalAveragePool", ["relu"], ["gap"]), helper.make_node("Flatten", ["gap"], ["feat"]),
              helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(nodes, "cnn",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
                              inits[:1] + (inits[1:3] if norm else []) + inits[3:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21 if norm else 17)])
    model.ir_version = 10 if norm else 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_every_tflite_variant_is_made_by_onnx2tf_and_measured_on_litert(digits_tflite):
    version = importlib.metadata.version("onnx2tf")  # importing onnx2tf here would import TensorFlow
    report, out, by, _ = digits_tflite
    for vid in TFLITE:
        v = by[vid]
        assert v.status in ("kept", "dropped") and v.files == [f"{vid}.tflite"], (vid, v.status, v.reason)
        r = v.results["litert"]
        assert list(v.results) == ["litert"] and r.error is None and r.latency_ms > 0 and r.accuracy > 0.9
        assert v.note.startswith(f"onnx2tf {version}: ")
        assert v.info["tflite"]["onnx2tf"] == version and v.info["tflite"]["nchw_inputs"] == []
    assert by["tflite-int8"].info["tflite"]["calibration_rows"] == 200  # every calibration row
    # the int8 ones record their scheme and the CPUs they are for, like the ONNX and OpenVINO int8 variants
    for vid, activations in (("tflite-int8", "int8 asymmetric per tensor"), ("tflite-int8-dynamic", "int8 at run time")):
        record = by[vid].info["int8"]
        assert record["targets"] == ["x86-vnni", "x86", "arm64"] and record["activations"] == activations
        assert record["weights"] == "int8 symmetric" and record["per_channel"] is True
        assert record["tool"] == f"onnx2tf {version} (TensorFlow Lite converter)"
    assert "int8" not in by["tflite-fp32"].info
    assert "calibrated on 200 rows, float32 inputs and outputs" in by["tflite-int8"].note
    assert by["tflite-int8-dynamic"].info["tflite"]["quantization"] == "dynamic-range int8"
    assert not any("litert" in v.results for v in report.variants if v.format == "onnx")
    kept = {v.id for v in report.kept}
    assert {f.name for f in out.iterdir()} == {f"{vid}.{'tflite' if vid.startswith('tflite') else 'onnx'}"
                                              for vid in kept} | {"edgerun.toml", "packaging-report.json"}


def test_tflite_fp32_reproduces_onnxruntime(packaged):
    _, _, by, _ = packaged
    fp32 = by["tflite-fp32"].results["litert"]
    assert fp32.max_deviation <= 1e-4 and fp32.agreement == 1.0
    assert by["tflite-fp32"].info["tflite"]["fp32_max_deviation"] <= 1e-4


def test_int8_is_within_the_bound_or_dropped_with_what_it_measured(packaged):
    report, _, by, _ = packaged
    metric, bound = report.metric, 0.01
    ref = by["onnx-fp32"].score(metric)
    int8 = [by["tflite-int8"], by["tflite-int8-dynamic"]]
    for v in int8:
        drop = ref - v.score(metric)
        if v.status == "kept":
            assert drop <= bound + 1e-9, (v.id, drop)
        elif drop > bound + 1e-9:
            assert v.reason.startswith(f"{metric} {100 * v.score(metric):.2f}% is"), v.reason
    # the two int8 methods compete on litert, like ONNX's on onnxruntime
    assert sum(v.status == "kept" for v in int8) <= 1
    within = [v for v in int8 if not v.reason.startswith(metric)]
    if len(within) == 2:
        a, b = within
        loser, winner = (a, b) if a.reason.startswith(f"{b.id} ") else (b, a)
        assert loser.status == "dropped" and loser.reason.startswith(f"{winner.id} ") and " on litert (" in loser.reason


def test_a_kept_tflite_variant_loads_on_litert_and_infers_a_batch_of_1_and_of_4(packaged):
    report, out, _, files = packaged
    pkg = ModelPackage.load(out)
    kept = [v for v in pkg.variants if v.format == "tflite"]
    assert kept, [(v.id, v.status, v.reason) for v in report.variants]
    with np.load(files["val"]) as z:
        rows = {s.name: z[s.name][:4] for s in pkg.inputs}
    want = _onnx_outputs(files["model"], rows)
    for v in kept:
        with Runtime(threads=1) as rt:
            model = rt.load(out, variant=v.id, backend="litert")  # verified and warmed up on the fp32 samples
            assert model.backend == "litert" and model.inputs == pkg.inputs and model.outputs == pkg.outputs
            for n in (1, 4, 1):
                got = rt.infer(pkg.name, {k: a[:n] for k, a in rows.items()})[pkg.outputs[0].name]
                np.testing.assert_allclose(got, want[:n], atol=max(v.atol, 1e-4), rtol=1e-3)


def test_the_makers_keep_the_onnx_interface_from_one_onnx2tf_run(tmp_path, monkeypatch):
    from edgerun.backend import LoadOptions
    from edgerun.hub.quantize import interface, load_onnx
    from edgerun.hub.tools import MakeJob

    model = _cnn_onnx(tmp_path / "cnn.onnx")
    inputs, outputs = interface(load_onnx(model))
    assert inputs[0].shape == (-1, 1, 8, 8)
    rng = np.random.default_rng(1)
    val = {"pixels": rng.random((8, 1, 8, 8), dtype=np.float32)}
    calib = {"pixels": rng.random((32, 1, 8, 8), dtype=np.float32)}
    stage = tmp_path / "stage"
    stage.mkdir()
    runs = []
    monkeypatch.setattr(tflite, "convert", lambda job, run=tflite.convert: runs.append(job.source) or run(job))
    monkeypatch.chdir(tmp_path)
    made = {m.id: m.make(MakeJob(model, stage, m.id, calib, val, inputs, outputs))
            for m in (cls() for cls in tflite.BUILTIN[:4])}
    assert len(runs) == 1  # one conversion made all four
    assert sorted(p.name for p in stage.iterdir()) == sorted(f"{vid}.tflite" for vid in TFLITE)  # nothing partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "stage"]  # nothing in the current directory
    assert made["tflite-int8"].info["tflite"]["nchw_inputs"] == ["pixels"]
    assert made["tflite-int8"].info["tflite"]["calibration_rows"] == 32
    litert = Runtime(threads=1).backends["litert"]
    want = _onnx_outputs(model, val)
    for vid in TFLITE:
        with litert.load(stage / f"{vid}.tflite", LoadOptions(threads=1)) as sess:
            assert sess.inputs == inputs and sess.outputs == outputs, vid  # names, dtypes, NCHW, batch -1
            for n in (1, 4):
                got = sess.run({"pixels": val["pixels"][:n]})["probabilities"]
                assert got.shape == (n, 10)
                np.testing.assert_allclose(got, want[:n], atol=1e-4 if vid == "tflite-fp32" else 0.05)
    work = next(iter(tflite._conversions.values())).work
    assert work.is_dir()
    del val, calib, made
    gc.collect()
    assert not work.exists() and not tflite._conversions  # the work dir goes with the job's data


def _groupnorm_model(tmp_path: Path) -> Path:
    ops = Path(importlib.util.find_spec("onnx2tf").origin).parent / "ops"  # without importing TensorFlow
    if (ops / "GroupNormalization.py").exists():
        pytest.skip("this onnx2tf converts GroupNormalization: the test needs an op it lacks")
    model = _cnn_onnx(tmp_path / "gn.onnx", norm=True)
    np.savez(tmp_path / "val.npz", pixels=np.random.default_rng(2).random((20, 1, 8, 8), dtype=np.float32))
    return model


def test_by_default_an_op_onnx2tf_cannot_convert_skips_the_tflite_variants_with_its_reason(tmp_path, monkeypatch):
    model = _groupnorm_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    report = package_model(PackageRequest(model=model, name="gn", version=1, validation=tmp_path / "val.npz",
                                          out=tmp_path / "gn", precisions=("fp32", "fp16"),
                                          backends=("onnxruntime", "litert"), repeats=10))  # the default formats
    by = {v.id: v for v in report.variants}
    reason = f"onnx2tf {importlib.metadata.version('onnx2tf')} cannot convert op GroupNormalization (not implemented)"
    assert all(by[vid].status == "skipped" and by[vid].reason == reason for vid in ("tflite-fp32", "tflite-fp16"))
    assert by["onnx-fp32"].status == "kept" and by["onnx-fp16"].status != "skipped"
    out = tmp_path / "gn"
    assert not any(p.suffix == ".tflite" or p.name.startswith(".") for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gn", "gn.onnx", "val.npz"]


def test_tflite_asked_for_by_name_that_cannot_be_converted_is_an_error(tmp_path):
    model = _groupnorm_model(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", "hub",
                        "package", str(model), "--name", "gn", "--version", "1", "--validation",
                        str(tmp_path / "val.npz"), "--out", str(tmp_path / "gn"), "--precisions", "fp32,fp16",
                        "--formats", "onnx,tflite", "--backends", "onnxruntime,litert", "--repeats", "10"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 65, r.stderr
    said = " ".join(r.stderr.split())
    assert (f"--formats tflite: no tflite variant could be made (onnx2tf {importlib.metadata.version('onnx2tf')} "
            f"cannot convert op GroupNormalization (not implemented)); leave tflite out of --formats") in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gn.onnx", "val.npz"]  # no package, nothing half-written


def test_without_tensorflow_tflite_is_left_out_or_refused_naming_the_extra(digits_files, tmp_path, monkeypatch):
    from edgerun.hub.tools import ConverterMissing

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorflow", "onnx2tf") else real(name, *a))
    asked = dict(model=digits_files["model"], name="d", version=1, validation=digits_files["val"],
                 out=tmp_path / "d", precisions=("fp32",), backends=("onnxruntime",), repeats=5)
    report = package_model(PackageRequest(**asked))  # the default formats: tflite only when its converter is here
    assert not any(v.format == "tflite" for v in report.variants)
    assert any(n.startswith("tflite variants not made: tensorflow, onnx2tf not installed") and
               "pip install 'edgerun[hub-tflite]'" in n for n in report.notes), report.notes
    assert {v.id for v in report.kept} == {"onnx-fp32"}
    with pytest.raises(ConverterMissing, match=r"--formats tflite: tensorflow, onnx2tf not installed: .*"
                                               r"pip install 'edgerun\[hub-tflite\]'") as exc:
        package_model(PackageRequest(**{**asked, "out": tmp_path / "e"}, formats=("onnx", "tflite")))
    assert exc.value.exit_code == 69 and not (tmp_path / "e").exists()
