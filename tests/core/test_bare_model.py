"""A bare model file is a package: Runtime, explain, run, serve, [[models]] path, config check and SIGHUP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgerun.bare import from_model_file, precision_of
from edgerun.runtime import Runtime
from edgerun.testing.processes import terminate

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"
TFLITE = REPO / "examples" / "tflite"
X = np.load(DIGITS / "sample_input.npy")
CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"


def _available(rt: Runtime, backend: str) -> None:
    if backend not in rt.backends or not rt.backends[backend].check().available:
        pytest.skip(f"backend {backend} is not available here")


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory) -> dict[str, Path]:
    """The digits ONNX model as OpenVINO IR, with fp32 and with fp16 weights (save_model's default)."""
    ov = pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("ir")
    model = ov.convert_model(str(DIGITS / "model.fp32.onnx"))
    ov.save_model(model, str(root / "digits32.xml"), compress_to_fp16=False)
    ov.save_model(model, str(root / "digits16.xml"))
    return {"fp32": root / "digits32.xml", "fp16": root / "digits16.xml"}


@pytest.mark.parametrize("file, variant, backend, package", [
    (DIGITS / "model.fp32.onnx", "onnx-fp32", "onnxruntime", DIGITS),
    (DIGITS / "model.int8.onnx", "onnx-int8", "onnxruntime", DIGITS),
    (TFLITE / "digits_fp32.tflite", "tflite-fp32", "litert", TFLITE),
    (TFLITE / "digits_int8.tflite", "tflite-int8", "litert", TFLITE),
], ids=lambda v: v.name if isinstance(v, Path) else None)
def test_a_model_file_runs_as_its_package_does(cpu_profile, file, variant, backend, package):
    with Runtime(profile=cpu_profile) as rt:
        _available(rt, backend)
        bare = rt.load(file)
        assert (bare.name, bare.version, bare.variant.id, bare.backend) == (file.stem, 1, variant, backend)
        assert bare.package.root == file.parent and not bare.package.samples
        assert [(s.name, s.datatype, s.shape) for s in bare.inputs] == [("input", "FP32", (-1, 64))]
        assert [(s.name, s.shape) for s in bare.outputs] == [("probabilities", (-1, 10))]
        bare.package.verify(bare.variant)  # the real size and sha256
        packaged = rt.load(package, variant=variant, backend=backend)
        assert packaged.variant.main_file.sha256 == bare.variant.main_file.sha256
        np.testing.assert_array_equal(rt.infer(bare.name, {"input": X})["probabilities"],
                                      rt.infer(packaged.name, {"input": X})["probabilities"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_openvino_ir_runs_with_its_bin_beside_it(cpu_profile, ir_files, precision):
    with Runtime(profile=cpu_profile) as rt:
        _available(rt, "openvino")
        model = rt.load(ir_files[precision])
        assert (model.variant.id, model.backend) == (f"openvino-{precision}", "openvino")
        assert [f.path for f in model.variant.files] == [ir_files[precision].name,
                                                         ir_files[precision].with_suffix(".bin").name]
        reference = rt.load(DIGITS, variant="onnx-fp32", backend="onnxruntime")
        np.testing.assert_allclose(rt.infer(model.name, {"input": X})["probabilities"],
                                   rt.infer(reference.name, {"input": X})["probabilities"], atol=2e-3)


def _fp16_and_qdq(root: Path) -> tuple[Path, Path]:
    """The digits MLP with fp16 weights (fp32 in and out through Casts), and with QDQ int8 weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = onnx.load(str(DIGITS / "model.fp32.onnx"))
    g = src.graph
    weights = {i.name: numpy_helper.to_array(i) for i in g.initializer}

    def save(nodes: list, inits: list, name: str) -> Path:
        model = helper.make_model(helper.make_graph(nodes, name, list(g.input), list(g.output), inits),
                                  opset_imports=src.opset_import)
        model.ir_version = src.ir_version
        onnx.save(model, str(root / name))
        return root / name

    def renamed(node, mapping: dict[str, str]):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [mapping.get(t, t) for t in copy.input]
        copy.output[:] = [mapping.get(t, t) for t in copy.output]
        return copy

    fp16 = save([helper.make_node("Cast", ["input"], ["x16"], to=TensorProto.FLOAT16),
                 *(renamed(n, {"input": "x16", "probabilities": "p16"}) for n in g.node),
                 helper.make_node("Cast", ["p16"], ["probabilities"], to=TensorProto.FLOAT)],
                [numpy_helper.from_array(w.astype(np.float16), k) for k, w in weights.items()], "digits16.onnx")
    nodes, inits = [], []
    for k, w in weights.items():
        if w.ndim == 2:  # Gemm weights: int8, dequantized per tensor
            scale = np.float32(np.abs(w).max() / 127)
            inits += [numpy_helper.from_array(np.round(w / scale).astype(np.int8), f"{k}_q"),
                      numpy_helper.from_array(np.array(scale, np.float32), f"{k}_scale")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{k}_q", f"{k}_scale"], [k]))
        else:
            inits.append(numpy_helper.from_array(w, k))
    qdq = save(nodes + list(g.node), inits, "digits_qdq.onnx")
    return fp16, qdq


def test_precision_is_read_from_the_file(cpu_profile, tmp_path):
    fp16, qdq = _fp16_and_qdq(tmp_path)
    with Runtime(profile=cpu_profile) as rt:
        reference = rt.infer(rt.load(DIGITS / "model.fp32.onnx").name, {"input": X})["probabilities"]
        for path, variant in ((fp16, "onnx-fp16"), (qdq, "onnx-int8")):
            model = rt.load(path)
            assert model.variant.id == variant
            np.testing.assert_allclose(rt.infer(model.name, {"input": X})["probabilities"], reference, atol=0.05)
    for path, fmt, want in ((DIGITS / "model.fp32.onnx", "onnx", "fp32"), (DIGITS / "model.int8.onnx", "onnx", "int8"),
                            (TFLITE / "digits_int8_io.tflite", "tflite", "int8")):
        assert precision_of(path, fmt) == want, path
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    assert precision_of(junk, "onnx") == "fp32"  # cannot tell: says fp32 (loading it is what fails)


def test_explain_shows_the_variant_its_precision_and_no_measurements(cli):
    rc, out, err = cli("explain", DIGITS / "model.int8.onnx", "--profile", "generic-x86_64")
    assert rc == 0, err
    assert "model.int8 v1" in out and "bare model file: version 1, no measurements" in out
    assert "zero-filled batch of 1" in out and "no samples" in out
    chosen = [ln for ln in out.splitlines() if "onnx-int8" in ln and "chosen" in ln]
    assert chosen and "onnx int8" in out and "(estimate)" in out


def test_cli_run_prints_what_the_package_prints(cli, tmp_path):
    printed = {}
    for kind, target in (("bare", DIGITS / "model.fp32.onnx"), ("package", DIGITS)):
        rc, out, err = cli("run", target, "--input", f"input={DIGITS / 'sample_input.npy'}", "--variant", "onnx-fp32",
                           "--profile", "generic-x86_64", "--save", tmp_path / f"{kind}.npz")
        assert rc == 0, err
        printed[kind] = out.splitlines()
    assert printed["bare"][0] == "model.fp32 v1: onnx-fp32 on onnxruntime"
    assert printed["bare"][1:3] == printed["package"][1:3]  # "probabilities float32 [2, 10]" and the first row
    argmax = {k: np.load(tmp_path / f"{k}.npz")["probabilities"].argmax(axis=1) for k in printed}
    np.testing.assert_array_equal(argmax["bare"], argmax["package"])


def test_files_that_are_not_models_are_clear_errors(cli, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(512))
    rc, _, err = cli("run", junk, "--input", f"input={DIGITS / 'sample_input.npy'}", "--profile", "generic-x86_64")
    assert rc == 65 and f"{junk}: not a valid onnx model" in err and "onnxruntime cannot load" in err, err
    (tmp_path / "model.pt").write_bytes(b"torch")
    rc, _, err = cli("explain", tmp_path / "model.pt")
    assert rc == 65 and "suffix '.pt'" in err and "the installed backends read .onnx, .tflite, .xml" in err, err
    rc, _, err = cli("explain", tmp_path / "missing.onnx")
    assert rc == 65 and "no such model file" in err, err
    (tmp_path / "empty").mkdir()
    rc, _, err = cli("explain", tmp_path / "empty")
    assert rc == 65 and "no edgerun.toml (is this a model package directory?)" in err, err


def test_a_format_no_available_backend_reads_names_the_extra(cpu_profile):
    from edgerun.backend import Availability
    from edgerun.errors import BackendUnavailable

    with Runtime(profile=cpu_profile) as rt:
        if "litert" not in rt.backends:
            pytest.skip("the litert plugin is not registered")
        litert = type(rt.backends["litert"])

        class Missing(litert):  # type: ignore[misc, valid-type]
            def availability(self) -> Availability:
                return Availability(False, reason="not installed", install_hint=litert.install_hint)

        with pytest.raises(BackendUnavailable, match=r"no available backend reads tflite models; install one: "
                                                     r"pip install 'edgerun\[tflite\]'"):
            from_model_file(TFLITE / "digits_fp32.tflite", {**rt.backends, "litert": Missing()})


def test_config_check_takes_a_model_file(cli, tmp_path):
    shutil.copy(DIGITS / "model.fp32.onnx", tmp_path / "x.onnx")
    (tmp_path / "model.pt").write_bytes(b"torch")
    cfg = tmp_path / "edgerun.toml"
    for path, rc_want, expected in (("x.onnx", 0, "1 model(s)"),
                                    ("missing.onnx", 78, "expected a model package directory or a model file"),
                                    ("model.pt", 78, "the installed backends read .onnx, .tflite, .xml")):
        cfg.write_text(f'[[models]]\npath = "{path}"\n')
        rc, out, err = cli("config", "check", "--config", cfg)
        assert rc == rc_want, (path, out, err)
        assert expected in out + err, (path, out, err)
        if rc:
            assert "key 'models[0].path'" in err, err


# --- a real edgerun serve -------------------------------------------------------------------------

class Serve:
    """``edgerun serve ARGS`` on a free port, with a NOTIFY_SOCKET to know when it is ready or reloaded."""

    def __init__(self, tmp: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"edgerun-bare-{uuid.uuid4().hex[:12]}"
        self.notify.bind(b"\0" + name.encode())
        self.log = tmp / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGERUN_", "NOTIFY_", "WATCHDOG_"))}
        env.update(NOTIFY_SOCKET=f"@{name}", EDGERUN_LOG_LEVEL="INFO")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", str(self.port),
                                          "--state-dir", str(tmp / "state"), "--profile", "generic-x86_64", *args],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(self, line: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"edgerun serve exited {self.proc.returncode}: {self.output()}"
            self.notify.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                if line in self.notify.recv(65536).decode().splitlines():
                    return
            except socket.timeout:
                pass
        raise AssertionError(f"no {line} within {timeout}s: {self.output()}")

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for("RELOADING=1")
        self.wait_for("READY=1")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def infer(self, name: str) -> np.ndarray:
        r = httpx.post(f"{self.url}/v2/models/{name}/infer", timeout=10, json={"inputs": [
            {"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    def close(self) -> None:
        terminate(self.proc)
        self.notify.close()


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        started.append(Serve(tmp_path, *args))
        started[-1].wait_for("READY=1")
        return started[-1]

    yield start
    for s in started:
        s.close()


def test_serve_a_model_file_over_kserve_v2(serve, cpu_profile):
    s = serve("--model", str(DIGITS / "model.fp32.onnx"))
    meta = httpx.get(f"{s.url}/v2/models/model.fp32", timeout=10).json()
    assert meta["versions"] == ["1"] and meta["parameters"]["variant"] == "onnx-fp32"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    with Runtime(profile=cpu_profile) as rt:
        want = rt.infer(rt.load(DIGITS, variant="onnx-fp32", backend="onnxruntime").name, {"input": X})
    np.testing.assert_allclose(s.infer("model.fp32"), want["probabilities"], atol=1e-6)


def test_models_path_to_a_file_serves_with_its_settings_and_sighup_reloads_a_changed_file(serve, tmp_path):
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    model = tmp_path / "x.onnx"
    shutil.copy(DIGITS / "model.fp32.onnx", model)
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text('[[models]]\npath = "x.onnx"\nmax_inflight = 2\n[models.batching]\nmax_batch_size = 8\n')
    s = serve("--config", str(cfg))
    meta = httpx.get(f"{s.url}/v2/models/x", timeout=10).json()
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert (meta["parameters"]["max_batch_size"], meta["parameters"]["max_inflight"]) == (8, 2)  # its [[models]]
    assert s.infer("x").argmax(axis=1).tolist() == [2, 0]

    model.touch()  # same bytes: nothing to reload
    s.reload()
    assert "reload: now serving x" not in s.output()

    mlp_onnx(random_mlp_weights([64, 16, 3], seed=3), tmp_path / "other.onnx")
    os.replace(tmp_path / "other.onnx", model)  # another model: 3 classes
    s.reload()
    assert "reload: now serving x v1" in s.output()
    meta = httpx.get(f"{s.url}/v2/models/x", timeout=10).json()
    assert meta["outputs"][0]["shape"] == [-1, 3] and meta["parameters"]["max_batch_size"] == 8
    assert s.infer("x").shape == (2, 3)
