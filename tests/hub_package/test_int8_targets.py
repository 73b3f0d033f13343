"""int8 made for the devices' CPUs: settings from the targets, the layer-by-layer fallback when int8 drops too
much, checks on emulated CPUs without VNNI, and the command line's --targets / --no-emulate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgerun.device import detect
from edgerun.hub import emulate
from edgerun.hub import quantize as q
from edgerun.hub.accuracy import Scorer
from edgerun.hub.packager import REPORT_FILE, PackageRequest, package_model
from edgerun.package import ModelPackage, Variant, file_entry, save_package
from edgerun.runtime import Runtime
from int8_models import bright_gemm, noisy_input_mlp

ALL = ["x86-vnni", "x86", "arm64"]


def _emulation_unavailable() -> str | None:
    why = emulate.cannot_emulate("x86")
    if why:
        return f"x86 without VNNI cannot be emulated here: {why}"
    if detect().cpu_class != "x86-vnni":
        return f"this hub is {detect().cpu_class}, not x86 with VNNI: it checks x86 int8 kernels itself"
    return None


needs_emulation = pytest.mark.skipif(_emulation_unavailable() is not None, reason=_emulation_unavailable() or "")


@pytest.fixture(scope="module")
def bright(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bright")
    model, x, labels = bright_gemm(root)
    np.savez(root / "val.npz", x=x, labels=labels)
    np.savez(root / "calib.npz", x=x[:100])
    return {"model": model, "val": root / "val.npz", "calib": root / "calib.npz", "x": x, "labels": labels,
            "root": root}


def _int8_weight_max(path: Path) -> int:
    """The largest int8 weight magnitude in an ONNX file, read with onnx alone."""
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(i) for i in model.graph.initializer]
    return max(int(np.abs(a.astype(np.int32)).max()) for a in arrays if a.dtype == np.int8)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=600, cwd=cwd)


def test_int8_weights_are_narrowed_only_when_a_target_lacks_vnni(bright, tmp_path):
    calib = {"x": bright["x"][:100]}
    for targets, narrow in ((None, True), (("x86",), True), (("x86-vnni", "arm64"), False)):
        for make in (q.make_int8_static, q.make_int8_dynamic):
            dst = tmp_path / f"{make.__name__}-{'-'.join(targets or ('all',))}.onnx"
            info = make(bright["model"], dst, calib, targets=targets) if make is q.make_int8_static else \
                make(bright["model"], dst, targets=targets)
            assert info["reduce_range"] is narrow and info["targets"] == list(targets or ALL)
            weights = _int8_weight_max(dst)
            assert info["weight_max"] == weights  # what the record says is what the file holds
            assert weights <= q.SAFE_WEIGHT if narrow else weights == 127


def test_openvino_int8_uses_the_overflow_fix_for_x86_and_is_not_made_for_arm(bright, tmp_path):
    import openvino as ov

    from edgerun.hub.makers import BUILTIN
    from edgerun.hub.tools import MakeJob, PrecisionUnavailable

    maker = next(cls() for cls in BUILTIN if cls.id == "openvino-int8-nncf")
    inputs, outputs = q.interface(q.load_onnx(bright["model"]))
    calib = {"x": bright["x"][:100]}
    for targets, narrow in ((("x86-vnni", "x86", "arm64"), True), (("x86-vnni",), False)):
        stage = tmp_path / "-".join(targets)
        stage.mkdir()
        made = maker.make(MakeJob(bright["model"], stage, maker.id, calib, {"x": bright["x"]}, inputs, outputs,
                                  {"int8_targets": targets}))
        info = made.info["int8"]
        assert info["overflow_fix"] is narrow and info["targets"] == [t for t in targets if t != "arm64"]
        model = ov.Core().read_model(str(stage / made.files[0]))
        weights = max(int(np.abs(op.get_data().astype(np.int32)).max()) for op in model.get_ordered_ops()
                      if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "i8")
        assert info["weight_max"] == weights and (weights <= q.SAFE_WEIGHT if narrow else weights == 127)
    stage = tmp_path / "arm"
    stage.mkdir()
    with pytest.raises(PrecisionUnavailable, match="OpenVINO runs int8 on x86-64 CPUs only"):
        maker.make(MakeJob(bright["model"], stage, maker.id, calib, {"x": bright["x"]}, inputs, outputs,
                           {"int8_targets": ("arm64",)}))


def test_int8_that_drops_too_much_keeps_its_sensitive_layer_in_fp32(tmp_path):
    model, val, calib, sensitive = noisy_input_mlp(tmp_path)
    np.savez(tmp_path / "val.npz", **val)
    np.savez(tmp_path / "calib.npz", x=calib)
    plain = tmp_path / "plain.onnx"
    q.make_int8_static(model, plain, {"x": calib})
    scorer = Scorer.for_fp32(model, {"x": val["x"]}, val["labels"], 0.01)
    assert scorer.baseline - scorer.onnx(plain) > 0.5  # plain int8 of this model answers at random
    out = tmp_path / "pkg"
    report = package_model(PackageRequest(model=model, name="noisy", version=1, validation=tmp_path / "val.npz",
                                          calibration=tmp_path / "calib.npz", out=out, precisions=("fp32", "int8"),
                                          formats=("onnx",), backends=("onnxruntime",), repeats=10, emulate=False))
    by = {v.id: v for v in report.variants}
    assert by["onnx-int8-dynamic"].status == "dropped" and "points below fp32" in by["onnx-int8-dynamic"].reason
    pkg = ModelPackage.load(out)
    fp32, int8 = pkg.variant("onnx-fp32"), pkg.variant("onnx-int8-qdq")
    record = int8.info["int8"]
    assert record["tool"] == "NNCF quantize_with_accuracy_control"
    assert record["excluded"] == [sensitive]  # the package says which layer stayed in fp32
    assert record["plain_score"] < 0.5 and fp32.accuracy - int8.accuracy <= 0.01 + 1e-9
    assert record["overflow_fix"] is True and record["weight_max"] <= q.SAFE_WEIGHT
    # the file is what the record says: the sensitive layer reads a float weight, the others int8 ones
    graph = onnx.load(str(out / int8.main_file.path)).graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    weight = {n.name: n.input[1] for n in graph.node if n.op_type == "Gemm"}
    assert weight[sensitive] in floats and all(w not in floats for name, w in weight.items() if name != sensitive)
    with Runtime(threads=1) as rt:
        rt.load(out, variant="onnx-int8-qdq", backend="onnxruntime")
        top = np.argmax(rt.infer("noisy", {"x": val["x"]})["scores"], axis=1)
    assert np.mean(top == val["labels"]) == pytest.approx(int8.accuracy, abs=0.005)


@needs_emulation
def test_int8_is_checked_on_an_emulated_cpu_without_vnni_and_arm64_is_recorded_unchecked(bright, tmp_path):
    out = tmp_path / "pkg"
    report = package_model(PackageRequest(model=bright["model"], name="bright", version=1, validation=bright["val"],
                                          calibration=bright["calib"], out=out, precisions=("fp32", "int8"),
                                          formats=("onnx",), backends=("onnxruntime",), repeats=10))
    kept = [v for v in ModelPackage.load(out).variants if v.precision == "int8"]
    assert kept, [(v.id, v.status, v.reason) for v in report.variants]
    for v in kept:
        where = {r["cpu"]: r for r in v.info["validated"]}
        assert v.info["int8"]["targets"] == ALL
        assert where["x86-vnni"]["how"] == "this hub" and where["x86-vnni"]["score"] == 1.0
        assert where["x86"]["how"] == "emulated: qemu-x86_64 -cpu Haswell (AVX2 without AVX-512 or VNNI)"
        assert where["x86"]["score"] == 1.0 and where["x86"]["samples"] == 100
        assert where["x86"]["backend"].startswith("onnxruntime ")
        assert where["arm64"]["how"].startswith("not checked: ") and "score" not in where["arm64"]


@needs_emulation
def test_full_range_int8_is_taken_off_the_cpus_whose_kernels_saturate(bright, tmp_path):
    """Made for VNNI only (full 8-bit weights), the model's int8 is right here and wrong on an AVX2 CPU, whose
    VPMADDUBSW saturates, in onnxruntime and OpenVINO alike; the 7-bit weights made for x86 are right on both."""
    scorer = Scorer.for_fp32(bright["model"], {"x": bright["x"]}, bright["labels"], 0.01)
    calib = {"x": bright["x"][:100]}
    made = {"full": q.make_int8_static(bright["model"], tmp_path / "full.onnx", calib, targets=("x86-vnni",)),
            "narrow": q.make_int8_static(bright["model"], tmp_path / "narrow.onnx", calib)}
    assert scorer.onnx(tmp_path / "full.onnx") == 1.0  # fine on this hub's VNNI kernels
    inputs, outputs = q.interface(q.load_onnx(bright["model"]))
    save_package(ModelPackage("bright", 1, inputs, outputs,
                              [Variant(k, "onnx", "int8", (file_entry(tmp_path, f"{k}.onnx"),)) for k in made]),
                 tmp_path)
    backends = [b for b in ("onnxruntime", "openvino") if Runtime().backends[b].check().available]
    infos = {k: {"int8": {**info, "targets": ["x86-vnni", "x86"]}} for k, info in made.items()}  # claimed for both
    notes = emulate.check_targets(tmp_path, [(k, infos[k], backends) for k in made], scorer, detect().cpu_class)
    assert infos["full"]["int8"]["targets"] == ["x86-vnni"]  # x86 taken off: a device of that class never picks it
    assert infos["narrow"]["int8"]["targets"] == ["x86-vnni", "x86"]
    scores = {(k, r["backend"].split()[0]): r["score"] for k in made for r in infos[k]["validated"]}
    assert scores == {**{("full", b): 0.0 for b in backends}, **{("narrow", b): 1.0 for b in backends}}
    assert any(n.startswith("not for x86: 0.0% there with onnxruntime (emulated)") for n in notes["full"])


def test_target_flags_on_the_command_line(bright, tmp_path):
    out = tmp_path / "pkg"
    r = _cli("hub", "package", str(bright["model"]), "--name", "bright", "--version", "1", "--validation",
             str(bright["val"]), "--calibration", str(bright["calib"]), "--out", str(out), "--precisions", "fp32,int8",
             "--formats", "onnx", "--backends", "onnxruntime", "--repeats", "10", "--targets", "raspberry-pi-4",
             "--no-emulate")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / REPORT_FILE).read_text())
    int8 = [v for v in report["variants"] if v["precision"] == "int8"]
    # full 8-bit weights (read back from each file), whichever tool made them: ARM64 kernels do not saturate
    assert int8 and all(v["info"]["int8"]["targets"] == ["arm64"] and v["info"]["int8"]["weight_max"] == 127
                        for v in int8), [v["info"]["int8"] for v in int8]
    host = detect().cpu_class
    kept = [v for v in ModelPackage.load(out).variants if v.precision == "int8"]
    if not kept:  # on this hub's int8 kernels (e.g. AVX2 without VNNI) no int8 variant beat fp32: each says so
        assert all(v["status"] == "dropped" and ("faster" in v["reason"] or "accuracy" in v["reason"])
                   for v in int8), [(v["id"], v["status"], v["reason"]) for v in int8]
    for v in kept:
        unchecked = [rec for rec in v.info["validated"] if rec["cpu"] != host]
        assert unchecked == [{"cpu": "arm64", "how": "not checked: --no-emulate was given"}]
    r = _cli("hub", "package", str(bright["model"]), "--name", "bright", "--version", "1", "--validation",
             str(bright["val"]), "--out", str(tmp_path / "bad"), "--targets", "x86,gameboy")
    assert r.returncode == 65
    assert "--targets: 'gameboy' is neither a CPU class (x86-vnni, x86, arm64) nor a device profile" in \
        " ".join(r.stderr.split())
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))
