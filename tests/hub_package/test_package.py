"""``edgerun hub package`` on real models: what the package records is what a device measures and loads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

from edgerun.errors import ModelLoadError, NoVariantFits
from edgerun.hub.packager import REPORT_FILE, PackageRequest, VariantReport, package_model
from edgerun.hub.tflite import INT4_REASON, MISSING_REASON
from edgerun.package import ModelPackage, file_entry, package_to_dict, save_package
from edgerun.runtime import Runtime
from edgerun.testing.models import mlp_onnx, random_mlp_weights


def _by_id(report):
    return {v.id: v for v in report.variants}


def test_package_loads_and_every_variant_passes_its_warmup_check(digits_packaged):
    report, out = digits_packaged
    pkg = ModelPackage.load(out)
    assert pkg.name == "digits" and pkg.version == 3
    assert [v.id for v in pkg.variants] == [v.id for v in report.kept]
    assert "onnx-fp32" in [v.id for v in pkg.variants]
    assert pkg.samples and all(s.expected for s in pkg.samples)
    rt = Runtime(threads=1)
    for v in pkg.variants:
        pkg.verify(v)  # sha256 and size recorded for the files that were written
        assert v.measured["onnxruntime"].latency_ms > 0 and v.measured["onnxruntime"].memory_bytes > 0
        assert v.memory_bytes == max(m.memory_bytes for m in v.measured.values())
        model = rt.prepare(out, variant=v.id, backend="onnxruntime")  # warm-up compares with fp32's outputs
        model.retire()


def test_recorded_accuracy_is_the_accuracy_a_user_measures(digits_packaged, digits_files):
    report, out = digits_packaged
    pkg = ModelPackage.load(out)
    with np.load(digits_files["val"]) as z:
        x, y = z["input"], z["labels"]
    for v in pkg.variants:  # one example per run, as the device serves (dynamic int8 depends on the batch)
        sess = ort.InferenceSession(str(out / v.main_file.path), providers=["CPUExecutionProvider"])
        top = [int(np.argmax(sess.run(None, {"input": x[i:i + 1]})[0])) for i in range(len(x))]
        acc = float(np.mean(np.array(top) == y))
        assert v.accuracy == pytest.approx(acc, abs=1e-4), v.id
        assert v.measured["onnxruntime"].accuracy == pytest.approx(acc, abs=1e-4)
    assert pkg.variant("onnx-fp32").accuracy > 0.9


def test_every_planned_variant_has_a_verdict_consistent_with_its_measurements(digits_packaged):
    report, out = digits_packaged
    variants = _by_id(report)
    assert set(variants) >= {"onnx-fp32", "onnx-fp16", "onnx-int8-qdq", "onnx-int8-dynamic"}
    fp32 = variants["onnx-fp32"]
    assert fp32.status == "kept"
    for v in report.variants:
        assert v.status in ("kept", "dropped", "skipped") and v.reason, v
        if v.status == "kept" and v is not fp32:
            drop = fp32.score("accuracy") - v.score("accuracy")
            assert drop <= 0.01 + 1e-9, f"{v.id} kept {100 * drop:.2f} points below fp32"
            better_somewhere = any(r.latency_ms < fp32.results[b].latency_ms or r.memory_bytes < fp32.results[b].memory_bytes
                                   for b, r in v.ok_results().items())
            assert better_somewhere or v.score("accuracy") > fp32.score("accuracy"), f"{v.id} kept though dominated"
    # int8: one method per format, chosen by measured speed
    qdq, dyn = variants["onnx-int8-qdq"], variants["onnx-int8-dynamic"]
    both_ok = all(x.status != "skipped" and not x.reason.startswith("accuracy") for x in (qdq, dyn))
    if both_ok:
        loser = qdq if qdq.reason.startswith(f"{dyn.id} is") else dyn
        winner = dyn if loser is qdq else qdq
        assert loser.status == "dropped"
        if loser.reason.startswith(f"{winner.id} is faster on onnxruntime"):
            assert winner.results["onnxruntime"].latency_ms < loser.results["onnxruntime"].latency_ms
        else:  # within the measured error: the lighter one
            assert loser.reason.startswith(f"{winner.id} is as fast (within the measured error or 15%)")
    # the report on disk says the same
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert {v["id"]: v["status"] for v in on_disk["variants"]} == {v.id: v.status for v in report.variants}


def test_pruning_shrinks_the_compressed_file_and_its_accuracy_is_measured(digits_packaged):
    report, _ = digits_packaged
    by = _by_id(report)
    pruned, fp32 = by["onnx-fp32-pruned50"], by["onnx-fp32"]
    assert pruned.status in ("kept", "dropped") and pruned.reason
    assert pruned.note.startswith("50% of MatMul/Gemm/Conv weights zeroed")
    assert pruned.size == pytest.approx(fp32.size, rel=0.01)  # dense storage: the file is as big
    assert pruned.compressed_size < 0.75 * fp32.compressed_size  # the zeros compress
    assert 0.5 < pruned.score("accuracy") <= 1
    assert pruned.results["onnxruntime"].agreement < 1.0  # zeroing half the weights changes some answers


def test_summary_table_shows_every_variant_with_its_verdict_and_reason(digits_packaged):
    from rich.console import Console

    from edgerun.cli.hub_package import summary_table

    report, _ = digits_packaged
    missing = MISSING_REASON.format("tensorflow")
    tflite = [VariantReport("tflite-fp32", "tflite", "fp32", "convert", status="skipped", reason=missing),
              VariantReport("tflite-int4", "tflite", "int4", "weights", status="skipped", reason=INT4_REASON)]
    console = Console(width=3000, record=True, color_system=None)
    console.print(summary_table(dataclasses.replace(report, variants=[*report.variants, *tflite])))
    lines = console.export_text().splitlines()
    for v in report.variants:
        row = next(ln for ln in lines if ln.count("│") > 2 and ln.split("│")[1].strip() == v.id)
        assert v.status in row, (v.id, row)
        if v.status != "kept":
            assert v.reason in row, (v.id, row)
        if v.note:
            assert v.note in row
    assert any("dropped" in ln for ln in lines)  # the digits MLP always loses a variant (one int8 method per format)
    tflite_rows = [ln for ln in lines if ln.count("│") > 2 and ln.split("│")[1].strip() == "tflite-*"]
    assert len(tflite_rows) == 2  # skipped TFLite variants: one row per reason
    assert missing in tflite_rows[0] and INT4_REASON in tflite_rows[1]  # brackets and all: edgerun[hub-tflite]


def test_int4_on_the_digits_mlp_is_matmulnbits_and_keeps_its_accuracy(digits_files, tmp_path):
    import onnx

    from edgerun.hub.quantize import load_onnx, make_int4, weight_profile

    dst = tmp_path / "int4.onnx"
    n = make_int4(digits_files["model"], dst, weight_profile(load_onnx(digits_files["model"])))
    ops = [node.op_type for node in onnx.load(str(dst)).graph.node]
    assert n == 2 and ops.count("MatMulNBits") == 2 and "Gemm" not in ops and "MatMul" not in ops
    assert dst.stat().st_size < 0.3 * digits_files["model"].stat().st_size
    with np.load(digits_files["val"]) as z:
        x, y = z["input"], z["labels"]
    accs = []
    for path in (digits_files["model"], dst):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        accs.append(float(np.mean(np.argmax(sess.run(None, {"input": x})[0], axis=1) == y)))
    assert accs[1] >= accs[0] - 0.01, accs


def test_int8_static_is_qdq_with_per_channel_weights(digits_files, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgerun.hub.packager import load_dataset
    from edgerun.hub.quantize import interface, load_onnx, make_int8_static

    inputs, _ = interface(load_onnx(digits_files["model"]))
    calib, _ = load_dataset(digits_files["calib"], inputs, "calibration")
    make_int8_static(digits_files["model"], tmp_path / "qdq.onnx", calib)
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    ops = [node.op_type for node in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dq = [node for node in model.graph.node if node.op_type == "DequantizeLinear"
                 and inits.get(node.input[0]) is not None and inits[node.input[0]].dtype == np.int8]
    assert len(weight_dq) == 2  # both Gemm weights, int8
    assert all(inits[node.input[1]].size > 1 for node in weight_dq)  # a scale per output channel


def test_fp16_variant_keeps_fp32_inputs_and_outputs(digits_files, tmp_path):
    from edgerun.hub.quantize import make_fp16

    make_fp16(digits_files["model"], tmp_path / "fp16.onnx")
    sess = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)"]
    assert (tmp_path / "fp16.onnx").stat().st_size < 0.6 * digits_files["model"].stat().st_size


def test_a_wrong_model_fails_the_warmup_check(digits_packaged, tmp_path):
    _, out = digits_packaged
    pkg = ModelPackage.load(out)
    v = max(pkg.variants, key=lambda v: v.atol)  # the loosest tolerance in the package
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    mlp_onnx(random_mlp_weights([64, 64, 10], seed=7), bad_root / v.main_file.path)
    bad = ModelPackage.from_dict(package_to_dict(pkg))
    bad.variants = [type(v)(**{**v.__dict__, "files": (file_entry(bad_root, v.main_file.path),)})]
    save_package(bad, bad_root)
    with pytest.raises(ModelLoadError, match="differs from the expected output"):
        Runtime(threads=1).prepare(bad_root, variant=v.id, backend="onnxruntime")


def test_device_picks_a_variant_per_memory_budget(digits_packaged):
    _, out = digits_packaged
    rt = Runtime()
    pkg = ModelPackage.load(out)
    big = rt.explain(out, memory_budget="1GiB")
    assert big.chosen is not None
    assert big.chosen.accuracy == max(v.accuracy for v in pkg.variants)
    needs = sorted({c.memory_bytes for c in big.candidates if c.backend == "onnxruntime"})
    assert all(c.memory_measured for c in big.candidates if c.backend == "onnxruntime")
    tight = rt.explain(out, memory_budget=needs[0])
    assert tight.chosen is not None and tight.chosen.memory_bytes == needs[0]
    none = rt.explain(out, memory_budget=needs[0] - 1)
    assert none.chosen is None
    with pytest.raises(NoVariantFits, match="needs"):
        rt.prepare(out, memory_budget=needs[0] - 1)


def test_cnn_int8_method_is_chosen_by_measuring_and_int4_is_skipped(cnn_files, tmp_path):
    out = tmp_path / "cnn"
    req = PackageRequest(model=cnn_files["model"], name="cnn", version=1, validation=cnn_files["val"],
                         calibration=cnn_files["calib"], out=out, precisions=("fp32", "int8", "int4"),
                         formats=("onnx",), backends=("onnxruntime",), max_accuracy_drop=50.0, repeats=30)
    report = package_model(req)
    v = _by_id(report)
    assert report.metric == "agreement"  # no labels in the .npz: scored against fp32's own top-1
    assert v["onnx-int4"].status == "skipped" and "Conv-heavy" in v["onnx-int4"].reason
    qdq, dyn = v["onnx-int8-qdq"], v["onnx-int8-dynamic"]
    winner, loser = (qdq, dyn) if qdq.results["onnxruntime"].latency_ms <= dyn.results["onnxruntime"].latency_ms \
        else (dyn, qdq)
    assert loser.status == "dropped" and loser.reason.startswith(f"{winner.id} is faster")
    pkg = ModelPackage.load(out)
    assert pkg.variant("onnx-fp32").accuracy is None  # no labels: no accuracy is claimed
    assert "agreement" in pkg.description
    for variant in pkg.variants:
        Runtime(threads=1).prepare(out, variant=variant.id, backend="onnxruntime").retire()
