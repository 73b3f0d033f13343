"""PyTorch and TensorFlow models given to ``edgerun hub package``: converted to ONNX by their framework's own
exporter, packaged, and the package computes what the framework does; bad input gets a clear error and leaves
nothing behind."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgerun.errors import PackageError
from edgerun.hub.packager import REPORT_FILE, PackageRequest, package_model
from edgerun.package import ModelPackage


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_torch = pytest.mark.skipif(bool(_missing("torch")), reason="torch is not installed (edgerun[hub-torch])")
needs_torch_export = pytest.mark.skipif(
    bool(_missing("torch", "onnxscript")),
    reason=f"{', '.join(_missing('torch', 'onnxscript'))} not installed: the torch.export-based exporter needs torch "
           f"and onnxscript (edgerun[hub-torch])")
needs_tf = pytest.mark.skipif(
    bool(_missing("tensorflow", "tf2onnx")),
    reason=f"{', '.join(_missing('tensorflow', 'tf2onnx'))} not installed (edgerun[hub-tf])")

MODELS = '''
"""Digits models for the packaging tests."""

import torch
from torch import nn

WEIGHTS = {weights!r}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, image):
        return self.head(torch.flatten(self.features(image), 1))


class Branchy(nn.Module):
    """A forward with Python control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y
        return -y


def _load(net, key):
    net.load_state_dict(torch.load(WEIGHTS[key], weights_only=True))
    return net


def make_net():
    return _load(MLP(), "mlp")


def make_cnn():
    return _load(CNN(), "cnn")


def not_a_module():
    return {{"layers": [64, 32, 10]}}
'''


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``edgerun`` as installed: that script, unlike ``python -c``, does not put the current directory on
    sys.path, so a ``module:callable`` imports from it only because the source adds it."""
    script = Path(sys.executable).with_name("edgerun")
    run = "import sys; from edgerun.cli import main; sys.exit(main())"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", run]
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=300)


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a half-written package was left behind"


def _package(model: str | Path, val: Path, out: Path, precisions: tuple[str, ...] = ("fp32",)):
    req = PackageRequest(model=model, name="digits", version=1, validation=val, out=out, precisions=precisions,
                         formats=("onnx",), backends=("onnxruntime",), repeats=5, emulate=False)
    return package_model(req)


def _check_package(out: Path, feeds: dict[str, np.ndarray], want: np.ndarray, labels: np.ndarray,
                   origin: str) -> ModelPackage:
    """The package's onnx-fp32 gives the framework's outputs, and records the framework's accuracy."""
    pkg = ModelPackage.load(out)
    fp32 = pkg.variant("onnx-fp32")
    sess = ort.InferenceSession(str(out / fp32.main_file.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]  # every validation row in one batch: the batch dimension is dynamic
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    accuracy = float(np.mean(np.argmax(want, axis=1) == labels))
    assert accuracy > 0.85
    assert fp32.accuracy == pytest.approx(accuracy, abs=1e-4)
    assert pkg.description.startswith(origin + ", packaged by edgerun hub")
    report = (out / REPORT_FILE).read_text()
    assert f"converted from {origin}" in report
    return pkg


@pytest.fixture(scope="session")
def digits():
    from edgerun.testing.models import digits_data

    return digits_data()


# --- PyTorch ----------------------------------------------------------------------------------------


def _train(torch, net, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """A few epochs of Adam in batches of 128 (a few seconds for both nets)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()


@pytest.fixture(scope="session")
def torch_models(digits, tmp_path_factory):
    """``mypkg.models`` on sys.path (MLP and CNN trained a few epochs on digits) and the validation sets."""
    if _missing("torch"):
        pytest.skip("torch is not installed (edgerun[hub-torch])")
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("torch-src")
    weights = {"mlp": str(root / "mlp.pt"), "cnn": str(root / "cnn.pt")}
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "models.py").write_text(MODELS.format(weights=weights))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        models = importlib.import_module("mypkg.models")
        x_train, y_train, x_val, y_val = digits
        mlp, cnn = models.MLP(), models.CNN()
        _train(torch, mlp, x_train, y_train, epochs=10)
        _train(torch, cnn, x_train.reshape(-1, 1, 8, 8), y_train, epochs=6)
        torch.save(mlp.state_dict(), weights["mlp"])
        torch.save(cnn.state_dict(), weights["cnn"])
        np.savez(root / "val-mlp.npz", input=x_val, labels=y_val)
        np.savez(root / "val-cnn.npz", image=x_val.reshape(-1, 1, 8, 8), labels=y_val)
        with torch.no_grad():
            outputs = {"mlp": mlp(torch.from_numpy(x_val)).numpy(),
                       "cnn": cnn(torch.from_numpy(x_val.reshape(-1, 1, 8, 8))).numpy()}
        yield {"root": root, "mlp": mlp, "cnn": cnn, "outputs": outputs, "x": x_val, "y": y_val}
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]


@needs_torch_export
def test_a_module_callable_is_exported_and_packaged(torch_models, tmp_path):
    m = torch_models
    report = _package("mypkg.models:make_cnn", m["root"] / "val-cnn.npz", tmp_path / "pkg", ("fp32", "int8"))
    origin = ("PyTorch module mypkg.models:make_cnn via torch.onnx.export (torch.export-based exporter, dynamo=True), "
              "opset 18")
    pkg = _check_package(tmp_path / "pkg", {"image": m["x"].reshape(-1, 1, 8, 8)}, m["outputs"]["cnn"], m["y"],
                         origin)
    assert [(s.name, s.shape) for s in pkg.inputs] == [("image", (-1, 1, 8, 8))]
    assert [s.name for s in pkg.outputs] == ["output"]
    assert report.notes[0] == f"converted from {origin}"
    assert {v.id for v in report.variants if v.status != "skipped"} >= {"onnx-int8-qdq", "onnx-int8-dynamic"}


@needs_torch_export
def test_an_exported_program_is_packaged(torch_models, tmp_path):
    import torch

    m = torch_models
    x = torch.from_numpy(m["x"][:4])
    program = torch.export.export(m["mlp"], (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "mlp.pt2")
    _package(str(tmp_path / "mlp.pt2"), m["root"] / "val-mlp.npz", tmp_path / "pkg")
    pkg = _check_package(tmp_path / "pkg", {"input": m["x"]}, m["outputs"]["mlp"], m["y"],
                         f"PyTorch ExportedProgram {tmp_path / 'mlp.pt2'} via torch.onnx.export (torch.export-based "
                         f"exporter, dynamo=True), opset 18")
    assert [(s.name, s.shape) for s in pkg.inputs] == [("input", (-1, 64))]  # named after the .npz array


@needs_torch
def test_a_torchscript_file_is_packaged(torch_models, tmp_path):
    import torch

    m = torch_models
    with warnings.catch_warnings():  # "torch.jit.save is deprecated": TorchScript files are still what many have
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(m["cnn"]), tmp_path / "cnn.pt")
    report = _package(tmp_path / "cnn.pt", m["root"] / "val-cnn.npz", tmp_path / "pkg", ("fp32", "int8"))
    _check_package(tmp_path / "pkg", {"image": m["x"].reshape(-1, 1, 8, 8)}, m["outputs"]["cnn"], m["y"],
                   f"TorchScript module {tmp_path / 'cnn.pt'} via torch.onnx.export (TorchScript exporter, "
                   f"dynamo=False), opset 17")
    assert {v.id for v in report.variants if v.status != "skipped"} >= {"onnx-int8-qdq", "onnx-int8-dynamic"}


@needs_torch_export
def test_the_cli_packages_a_module_callable_from_the_current_directory(torch_models, tmp_path):
    m = torch_models
    r = _cli("hub", "package", "mypkg.models:make_net", "--name", "digits", "--version", "2",
             "--validation", str(m["root"] / "val-mlp.npz"), "--out", str(tmp_path / "pkg"), "--precisions", "fp32",
             "--formats", "onnx", "--backends", "onnxruntime", "--repeats", "5", cwd=m["root"])
    assert r.returncode == 0, r.stderr
    assert "converted from PyTorch module mypkg.models:make_net via torch.onnx.export" in r.stdout
    _check_package(tmp_path / "pkg", {"input": m["x"]}, m["outputs"]["mlp"], m["y"],
                   "PyTorch module mypkg.models:make_net via torch.onnx.export (torch.export-based exporter, "
                   "dynamo=True), opset 18")


@needs_torch
def test_a_reference_that_does_not_import_is_refused(torch_models, tmp_path):
    r = _cli("hub", "package", "nosuchpkg.models:make_net", "--name", "digits", "--version", "1",
             "--validation", str(torch_models["root"] / "val-mlp.npz"), "--out", str(tmp_path / "pkg"),
             "--formats", "onnx", "--backends", "onnxruntime", cwd=tmp_path)
    assert r.returncode == 65, r.stderr
    assert ("cannot import module 'nosuchpkg.models' (ModuleNotFoundError: No module named 'nosuchpkg')"
            in " ".join(r.stderr.split()))
    _no_leftovers(tmp_path / "pkg")


def _refused(r: subprocess.CompletedProcess, out: Path) -> str:
    """The command failed as bad input does (exit 65) and left nothing behind; its message, on one line."""
    assert r.returncode == 65, r.stderr
    _no_leftovers(out)
    return " ".join(r.stderr.split())


def _package_cli(model: str | Path, val: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    return _cli("hub", "package", str(model), "--name", "digits", "--version", "1", "--validation", str(val),
                "--out", str(out), "--precisions", "fp32", "--formats", "onnx", "--backends", "onnxruntime",
                "--repeats", "5", cwd=cwd)


@needs_torch
def test_a_reference_to_something_not_a_module_is_refused(torch_models, tmp_path):
    val, root = torch_models["root"] / "val-mlp.npz", torch_models["root"]
    for ref, said in (("mypkg.models:not_a_module", "mypkg.models:not_a_module: not_a_module() returned a dict, not "
                                                    "a torch.nn.Module"),
                      ("mypkg.models:WEIGHTS", "mypkg.models:WEIGHTS: is a dict, not a torch.nn.Module nor a callable"),
                      ("mypkg.models:make_nett", "module 'mypkg.models' has no attribute 'make_nett'")):
        assert said in _refused(_package_cli(ref, val, tmp_path / "pkg", cwd=root), tmp_path / "pkg")


@needs_torch_export
def test_a_module_the_exporter_cannot_export_is_refused_with_its_reason(torch_models, tmp_path):
    msg = _refused(_package_cli("mypkg.models:Branchy", torch_models["root"] / "val-mlp.npz", tmp_path / "pkg",
                                cwd=torch_models["root"]), tmp_path / "pkg")
    assert ("mypkg.models:Branchy: torch.onnx.export (torch.export-based exporter, dynamo=True) failed: "
            "GuardOnDataDependentSymNode: Could not guard on data-dependent expression") in msg, msg
    assert "if y.sum() > 0:" in msg and "torch.cond" in msg


@needs_torch
def test_a_state_dict_is_refused_a_module_is_needed(torch_models, tmp_path):
    with pytest.raises(PackageError, match=r"mlp.pt: a state_dict \(4 entries: 'net.0.weight', 'net.0.bias', 'net.2"
                                           r".weight', ...\) saved with torch.save: it holds parameters, not the "
                                           r"module that uses them; the packager needs the module itself: save it "
                                           r"with torch.jit.save") as exc:
        _package(torch_models["root"] / "mlp.pt", torch_models["root"] / "val-mlp.npz", tmp_path / "pkg")
    assert exc.value.exit_code == 65
    _no_leftovers(tmp_path / "pkg")


# --- TensorFlow -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keras_model(digits, tmp_path_factory):
    """A small Dense model trained a few epochs on digits, as a .keras file and an exported SavedModel."""
    if _missing("tensorflow", "tf2onnx"):
        pytest.skip("tensorflow or tf2onnx is not installed (edgerun[hub-tf])")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("tf-src")
    x_train, y_train, x_val, y_val = digits
    inp = keras.Input((64,), name="pixels")
    out = keras.layers.Dense(10, activation="softmax", name="probs")(keras.layers.Dense(32, activation="relu")(inp))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=5, batch_size=64, verbose=0)
    with warnings.catch_warnings():  # Keras's own "__array__ implementation doesn't accept a copy keyword"
        warnings.simplefilter("ignore", DeprecationWarning)
        model.save(root / "digits.keras")
    model.export(str(root / "saved"), verbose=False)

    class PredictOnly(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.zeros((64, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="pixels")])
        def predict(self, pixels):
            return {"scores": tf.matmul(pixels, self.w)}

    module = PredictOnly()
    tf.saved_model.save(module, str(root / "predict-only"), signatures={"predict": module.predict})
    np.savez(root / "val.npz", pixels=x_val, labels=y_val)
    np.savez(root / "val-input.npz", input=x_val, labels=y_val)
    return {"root": root, "outputs": np.asarray(model(x_val, training=False)), "x": x_val, "y": y_val}


@needs_tf
def test_a_keras_file_is_packaged(keras_model, tmp_path):
    m = keras_model
    report = _package(m["root"] / "digits.keras", m["root"] / "val.npz", tmp_path / "pkg", ("fp32", "int8"))
    pkg = _check_package(tmp_path / "pkg", {"pixels": m["x"]}, m["outputs"], m["y"],
                         f"Keras model {m['root'] / 'digits.keras'} via tf2onnx.convert.from_keras, opset 17")
    assert [(s.name, s.shape) for s in pkg.inputs] == [("pixels", (-1, 64))]  # the Keras input's name
    assert [s.name for s in pkg.outputs] == ["probs"]
    assert {v.id for v in report.variants if v.status != "skipped"} >= {"onnx-int8-qdq", "onnx-int8-dynamic"}


@needs_tf
def test_a_saved_model_is_packaged_from_its_serving_signature(keras_model, tmp_path):
    import tensorflow as tf

    m = keras_model
    serving = tf.saved_model.load(str(m["root"] / "saved")).signatures["serving_default"]
    want = serving(pixels=tf.constant(m["x"]))["output_0"].numpy()
    _package(m["root"] / "saved", m["root"] / "val.npz", tmp_path / "pkg")
    pkg = _check_package(tmp_path / "pkg", {"pixels": m["x"]}, want, m["y"],
                         f"TensorFlow SavedModel {m['root'] / 'saved'} via tf2onnx.convert.from_function "
                         f"(serving_default signature), opset 17")
    assert [(s.name, s.shape) for s in pkg.inputs] == [("pixels", (-1, 64))]
    assert [s.name for s in pkg.outputs] == ["output_0"]  # the signature's output key


@needs_tf
def test_a_saved_model_without_a_serving_signature_is_refused(keras_model, tmp_path):
    msg = _refused(_package_cli(keras_model["root"] / "predict-only", keras_model["root"] / "val.npz",
                                tmp_path / "pkg", cwd=tmp_path), tmp_path / "pkg")
    assert "predict-only: the SavedModel has no 'serving_default' signature (it has 'predict')" in msg, msg


@needs_tf
def test_validation_arrays_must_be_named_after_the_tf_model_inputs(keras_model, tmp_path):
    for model in ("saved", "digits.keras"):
        with pytest.raises(PackageError, match=r"the model's inputs are named \['pixels'\] .*the validation data's "
                                               r"arrays are \['input'\]: name the .npz arrays after the model's "
                                               r"inputs") as exc:
            _package(keras_model["root"] / model, keras_model["root"] / "val-input.npz", tmp_path / "pkg")
        assert exc.value.exit_code == 65
    _no_leftovers(tmp_path / "pkg")


# --- either -----------------------------------------------------------------------------------------


def test_neither_framework_is_imported_by_edgerun_or_the_hub_sources():
    code = textwrap.dedent("""
        import sys
        import edgerun, edgerun.runtime, edgerun.hub.sources, edgerun.hub.packager
        from edgerun.hub.tools import source_for
        kinds = [source_for(s).name for s in ("m.onnx", "pkg.mod:make", "m.pt2", "m.pt", "m.keras")]
        print(kinds, sorted(m for m in ("torch", "tensorflow", "tf2onnx", "keras") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['onnx', 'pytorch-module', 'pytorch-exported-program', 'torchscript', 'keras'] []"


@pytest.mark.parametrize("spec, hidden, extra", [
    ("pkg.models:make_net", "torch", "hub-torch"),
    # onnxscript is looked for only once torch has imported: without torch the packager names torch instead
    pytest.param("pkg.models:make_net", "onnxscript", "hub-torch",
                 marks=pytest.mark.skipif(bool(_missing("torch")), reason="torch is not installed: the packager names "
                                                                          "the missing torch before onnxscript")),
    ("model.pt", "torch", "hub-torch"), ("model.keras", "tensorflow", "hub-tf"), ("saved/", "tf2onnx", "hub-tf")])
def test_a_missing_framework_names_the_extra_to_install(spec, hidden, extra, tmp_path, monkeypatch):
    from edgerun.hub.sources import KerasFile, TfSavedModel, TorchModule, TorchScriptFile

    monkeypatch.setitem(sys.modules, hidden, None)  # its import now raises ImportError
    source = {"pkg.models:make_net": TorchModule(), "model.pt": TorchScriptFile(), "model.keras": KerasFile(),
              "saved/": TfSavedModel()}[spec]
    with pytest.raises(PackageError, match=rf"needs .*{hidden}.*: pip install 'edgerun\[{extra}\]'") as exc:
        source.to_onnx(spec, tmp_path / "model.onnx", {"input": np.zeros((1, 64), np.float32)})
    assert exc.value.exit_code == 69


def test_a_model_no_source_reads_is_refused_with_what_is_accepted(tmp_path):
    np.savez(tmp_path / "val.npz", input=np.zeros((2, 64), np.float32))
    with pytest.raises(PackageError, match=r"model.tflite: expected an ONNX model \(\.onnx\) or a model the packager "
                                           r"converts to ONNX \(.*module:callable.*\.pt2.*SavedModel.*\.keras"):
        _package(tmp_path / "model.tflite", tmp_path / "val.npz", tmp_path / "pkg")
    _no_leftovers(tmp_path / "pkg")
