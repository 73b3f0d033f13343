"""Every shipped backend on the same digits model: metadata, outputs, dynamic batch, Runtime, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgerun import Runtime
from edgerun.backend import LoadOptions
from edgerun.errors import ModelLoadError
from edgerun.package import ModelPackage, Variant, file_entry, save_package

from backend_helpers import TFLITE_DIR, backend, reference_run


def test_metadata_names_datatypes_and_dynamic_shapes(case):
    with backend(case.backend).load(case.path, LoadOptions(threads=1)) as sess:
        assert [s.to_dict() for s in sess.inputs] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert [s.to_dict() for s in sess.outputs] == [{"name": "probabilities", "datatype": "FP32",
                                                        "shape": [-1, 10]}]
        assert sess.device == "CPU"


@pytest.mark.parametrize("batch", [1, 7])
def test_outputs_match_onnxruntime_at_batch_sizes(case, digits_x, batch):
    x = np.ascontiguousarray(digits_x[:batch])
    want = reference_run(case.reference, x)
    with backend(case.backend).load(case.path, LoadOptions(threads=1)) as sess:
        got = sess.run({"input": x})
        assert set(got) == {"probabilities"}
        assert got["probabilities"].shape == (batch, 10)
        assert got["probabilities"].dtype == np.float32
        np.testing.assert_allclose(got["probabilities"], want, rtol=1e-4, atol=1e-5)
        # results are copies: another run (other batch size, other data) leaves them untouched
        first = got["probabilities"].copy()
        sess.run({"input": np.zeros((3, 64), np.float32)})
        np.testing.assert_array_equal(got["probabilities"], first)


def test_batch_size_can_change_between_runs(case, digits_x):
    want = reference_run(case.reference, digits_x)
    with backend(case.backend).load(case.path, LoadOptions(threads=1)) as sess:
        for batch in (1, 7, 2, 7, 1):
            got = sess.run({"input": np.ascontiguousarray(digits_x[:batch])})["probabilities"]
            np.testing.assert_allclose(got, want[:batch], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,suffix", [("onnxruntime", ".onnx"), ("openvino", ".onnx"), ("openvino", ".xml"),
                                         ("litert", ".tflite")])
def test_corrupt_model_file_gives_model_load_error(tmp_path, name, suffix):
    b = backend(name)
    bad = tmp_path / f"broken{suffix}"
    bad.write_bytes(b"\x08\x07this is not a model" * 50)
    if suffix == ".xml":
        bad.with_suffix(".bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError) as err:
        b.load(bad, LoadOptions())
    msg = str(err.value)
    assert msg.startswith(f"{name} cannot load {bad}"), msg
    assert "Exception from src" not in msg and len(msg) < 600


def test_openvino_ir_without_its_bin_file_says_so(digits_ir, tmp_path):
    xml = tmp_path / "lonely.xml"
    xml.write_bytes(digits_ir.read_bytes())
    with pytest.raises(ModelLoadError, match=r"weights file lonely\.bin is not beside it"):
        backend("openvino").load(xml, LoadOptions())


def test_openvino_lists_devices_and_rejects_unknown_hint(digits_onnx):
    b = backend("openvino")
    devices = b.devices()
    assert "CPU" in devices and devices[-1] == "AUTO"
    with pytest.raises(ModelLoadError, match="performance_hint"):
        b.load(digits_onnx, LoadOptions(extra={"performance_hint": "FASTEST"}))


def test_openvino_names_a_device_that_is_not_here(digits_onnx):
    b = backend("openvino")
    missing = next(d for d in ("NPU", "GPU", "GPU.3") if d not in b.devices())
    with pytest.raises(ModelLoadError) as err:
        b.load(digits_onnx, LoadOptions(device=missing))
    assert str(err.value) == (f"openvino cannot load {digits_onnx} on {missing}: no such device here "
                              f"(devices: {', '.join(b.devices())})")
    with b.load(digits_onnx, LoadOptions(device="AUTO")) as sess:
        assert sess.device == "AUTO"
        assert sess.run({"input": np.zeros((1, 64), np.float32)})["probabilities"].shape == (1, 10)


def test_onnxruntime_falls_back_to_cpu_when_the_build_lacks_a_requested_provider(digits_onnx, digits_x):
    """The Jetson profile asks for CUDA first; a CPU-only onnxruntime build still runs the model, on the CPU."""
    import onnxruntime as ort

    b = backend("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    assert "CPU" in b.devices() and "CUDA" not in b.devices()
    jetson = LoadOptions(threads=1, extra={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    for options in (jetson, LoadOptions(device="CUDA", threads=1)):
        with b.load(digits_onnx, options) as sess:
            assert sess.device == "CPU"
            got = sess.run({"input": digits_x})["probabilities"]
            np.testing.assert_allclose(got, reference_run(digits_onnx, digits_x), rtol=1e-4, atol=1e-5)


def test_openvino_runs_from_many_threads(digits_onnx, digits_x):
    from concurrent.futures import ThreadPoolExecutor

    want = reference_run(digits_onnx, digits_x)
    with backend("openvino").load(digits_onnx, LoadOptions(threads=1)) as sess:
        def one(i: int) -> bool:
            b = 1 + i % 7
            got = sess.run({"input": np.ascontiguousarray(digits_x[:b])})["probabilities"]
            return np.allclose(got, want[:b], rtol=1e-4, atol=1e-5)

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(one, range(200)))


def test_openvino_keeps_the_graph_output_name_when_the_graph_ends_in_identity(tmp_path, digits_x):
    """OpenVINO folds a trailing Identity; the output must still be named as the graph names it."""
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    path = mlp_onnx(random_mlp_weights([64, 32, 10]), tmp_path / "identity.onnx", softmax=False)
    with backend("openvino").load(path, LoadOptions(threads=1)) as sess:
        assert [o.name for o in sess.outputs] == ["probabilities"]
        got = sess.run({"input": digits_x[:3]})
    assert list(got) == ["probabilities"]
    np.testing.assert_allclose(got["probabilities"], reference_run(path, digits_x[:3]), rtol=1e-4, atol=1e-5)


def _string_package(root: Path) -> ModelPackage:
    import onnx
    from onnx import TensorProto, helper

    from edgerun.tensors import TensorSpec

    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["same"])], "strings",
                              [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
                              [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch"])])
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "strings.onnx"))
    pkg = ModelPackage(name="strings", version=1, inputs=[TensorSpec("text", "BYTES", (-1,))],
                       outputs=[TensorSpec("same", "BYTES", (-1,))],
                       variants=[Variant("onnx", "onnx", "fp32", (file_entry(root, "strings.onnx"),))])
    save_package(pkg, root)
    return ModelPackage.load(root)


def test_a_string_model_goes_to_onnxruntime_even_where_openvino_comes_first(tmp_path):
    """OpenVINO aborts the process after running string tensors: the choice must route around it."""
    from edgerun.profiles import Profile

    backend("openvino")
    pkg = _string_package(tmp_path / "strings")
    with Runtime(profile=Profile(name="openvino-first", prefer=("openvino", "onnxruntime"))) as rt:
        choice = rt.explain(pkg)
        dropped = next(c for c in choice.candidates if c.backend == "openvino")
        assert not dropped.kept
        assert dropped.reason == "openvino cannot run BYTES tensors: text (BYTES), same (BYTES)"
        model = rt.load(pkg.root)
        assert model.backend == "onnxruntime"
        out = rt.infer("strings", {"text": np.array(["héllo", "edge"], dtype=object)})["same"]
    assert out.tolist() == ["héllo", "edge"]
    with pytest.raises(ModelLoadError, match=r"does not take string tensors \(text, same\); use onnxruntime"):
        backend("openvino").load(pkg.root / "strings.onnx", LoadOptions())


def test_litert_runs_from_many_threads(digits_x):
    from concurrent.futures import ThreadPoolExecutor

    want = reference_run(TFLITE_DIR / "digits_fp32.onnx", digits_x)
    with backend("litert").load(TFLITE_DIR / "digits_fp32.tflite", LoadOptions(threads=1)) as sess:
        def one(i: int) -> bool:
            b = 1 + i % 7
            got = sess.run({"input": np.ascontiguousarray(digits_x[:b])})["probabilities"]
            return np.allclose(got, want[:b], rtol=1e-4, atol=1e-5)

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(one, range(200)))


def test_litert_quantized_tensors_keep_their_int8_datatype():
    with backend("litert").load(TFLITE_DIR / "digits_int8_io.tflite", LoadOptions(threads=1)) as sess:
        assert [(s.name, s.datatype, s.shape) for s in sess.inputs] == [("input", "INT8", (-1, 64))]
        assert [(s.name, s.datatype, s.shape) for s in sess.outputs] == [("probabilities", "INT8", (-1, 10))]
        out = sess.run({"input": np.zeros((2, 64), np.int8)})["probabilities"]
        assert out.dtype == np.int8 and out.shape == (2, 10)


def test_runtime_picks_litert_for_the_tflite_package_and_scores_like_recorded():
    from edgerun.testing.models import accuracy_of, digits_data

    backend("litert")
    _, _, x_val, y_val = digits_data()
    with Runtime(threads=1) as rt:
        model = rt.load(TFLITE_DIR)
        assert model.backend == "litert" and model.variant.id == "tflite-fp32"
        acc = accuracy_of(lambda xb: rt.infer("digits-tflite", {"input": xb})["probabilities"], x_val, y_val)
        assert acc == pytest.approx(model.variant.accuracy, abs=1e-4)
        int8 = rt.load(TFLITE_DIR, variant="tflite-int8")
        assert int8.variant.precision == "int8"
        acc8 = accuracy_of(lambda xb: rt.infer("digits-tflite", {"input": xb})["probabilities"], x_val, y_val)
        assert acc8 == pytest.approx(int8.variant.accuracy, abs=1e-4)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_runtime_runs_the_onnx_variant_on_each_onnx_backend(digits_package, digits_x, name):
    backend(name)
    want = reference_run(digits_package.path_of(digits_package.variant("onnx-fp32").main_file), digits_x)
    with Runtime(threads=1) as rt:
        model = rt.load(digits_package.root, variant="onnx-fp32", backend=name)
        assert model.backend == name
        got = rt.infer(digits_package.name, {"input": digits_x})["probabilities"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_runtime_picks_openvino_for_an_ir_package(digits_package, digits_ir, tmp_path, digits_x):
    backend("openvino")
    root = tmp_path / "digits-ir"
    root.mkdir()
    for f in (digits_ir, digits_ir.with_suffix(".bin")):
        (root / f.name).write_bytes(f.read_bytes())
    src = digits_package.variant("onnx-fp32")
    variant = Variant("ir-fp32", "openvino", "fp32", (file_entry(root, "digits.xml"), file_entry(root, "digits.bin")),
                      accuracy=src.accuracy, atol=1e-4)
    pkg = ModelPackage(name="digits-ir", version=1, inputs=digits_package.inputs, outputs=digits_package.outputs,
                       variants=[variant], samples=digits_package.samples)
    save_package(pkg, root)
    want = reference_run(digits_package.path_of(src.main_file), digits_x)
    with Runtime(threads=1) as rt:
        model = rt.load(root)
        assert (model.backend, model.variant.id) == ("openvino", "ir-fp32")
        got = rt.infer("digits-ir", {"input": digits_x})["probabilities"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_runtime_reports_corrupt_tflite_variant_as_load_error(tmp_path):
    backend("litert")
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "model.tflite").write_bytes(b"TFL3 but not really a flatbuffer" * 10)
    pkg = ModelPackage.load(TFLITE_DIR)
    variant = Variant("tflite-fp32", "tflite", "fp32", (file_entry(root, "model.tflite"),))
    save_package(ModelPackage(name="broken", version=1, inputs=pkg.inputs, outputs=pkg.outputs, variants=[variant]),
                 root)
    with Runtime(threads=1) as rt, pytest.raises(ModelLoadError, match=r"litert cannot load .*model\.tflite"):
        rt.load(root)


def test_examples_tflite_files_are_small():
    for f in Path(TFLITE_DIR).glob("*.tflite"):
        assert f.stat().st_size < 100_000, f
