"""close() gives memory back, and a backend whose library is missing says so instead of crashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend_helpers import REPO, TFLITE_DIR, backend

LEAK_MARGIN = 15 << 20
CYCLE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, psutil
    from pathlib import Path
    from edgerun.backend import LoadOptions

    name, path, close = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "close"
    if name == "onnxruntime":
        from edgerun_onnxruntime import OnnxRuntimeBackend as B
    elif name == "openvino":
        from edgerun_openvino import OpenVinoBackend as B
    else:
        from edgerun_litert import LiteRTBackend as B
    b, proc, rss, sessions = B(), psutil.Process(), [], []
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    for _ in range(20):
        s = b.load(path, LoadOptions(threads=1))
        s.run({"input": x})
        if close:
            s.close()
        sessions.append(s)  # the session objects stay referenced: only close() can give the memory back
        rss.append(proc.memory_info().rss)
    print(json.dumps(rss))
""")


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> dict[str, Path]:
    """A ~9 MB random MLP (64-1024-1024-1024-10) as ONNX, OpenVINO IR and tflite, so a leak shows in RSS."""
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    d = tmp_path_factory.mktemp("big")
    weights = random_mlp_weights([64, 1024, 1024, 1024, 10])
    out = {"onnx": mlp_onnx(weights, d / "big.onnx")}
    try:
        from backend_helpers import save_ir

        out["ir"] = save_ir(out["onnx"], d / "big.xml")
    except ImportError:
        pass
    try:
        from edgerun.testing.tflite import mlp_tflite

        out["tflite"] = mlp_tflite(weights, d / "big.tflite")
    except ImportError:
        pass
    return out


def _model_size(path: Path) -> int:
    """Bytes on disk of a model file, with an OpenVINO IR's .bin beside its .xml."""
    return sum(f.stat().st_size for f in ((path, path.with_suffix(".bin")) if path.suffix == ".xml" else (path,)))


def _cycles(name: str, path: Path, close: bool) -> tuple[list[int], int]:
    """RSS after each of 20 load/run(/close) cycles in a fresh process, and the model's size on disk."""
    backend(name)
    size = _model_size(path)
    assert size > 8_000_000
    # glibc keeps freed blocks below its mmap threshold in the heap, where RSS swings by tens of MB from cycle to
    # cycle; model-sized buffers above 1 MiB get their own mappings, so a freed session shows as freed
    proc = subprocess.run([sys.executable, "-c", CYCLE_SCRIPT, name, str(path), "close" if close else "keep"],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), size


CASES = [("onnxruntime", "onnx"), ("openvino", "onnx"), ("openvino", "ir"), ("litert", "tflite")]


@pytest.mark.parametrize("name,fmt", CASES)
def test_close_really_frees_memory(big_models, name, fmt):
    path = big_models.get(fmt) or pytest.skip(f"no {fmt} model")
    rss, size = _cycles(name, path, close=True)
    growth = rss[19] - rss[2]
    assert growth < LEAK_MARGIN, (f"{name}: RSS grew {growth / 2**20:.1f} MiB between load/run/close cycles 3 and 20 "
                                  f"(model {size / 2**20:.1f} MiB); RSS per cycle (MiB): "
                                  f"{[round(r / 2**20) for r in rss]}")


@pytest.mark.parametrize("name,fmt", CASES)
def test_the_rss_check_sees_sessions_that_are_not_closed(big_models, name, fmt):
    """The control: the same 20 cycles without close() grow by far more than the margin, so the check can fail."""
    path = big_models.get(fmt) or pytest.skip(f"no {fmt} model")
    rss, size = _cycles(name, path, close=False)
    growth = rss[19] - rss[2]
    assert growth > max(LEAK_MARGIN, 17 * size // 2), (f"{name}: only {growth / 2**20:.1f} MiB for 17 sessions "
                                                       f"of a {size / 2**20:.1f} MiB model left open")


@pytest.mark.parametrize("name,fmt", CASES)
def test_memory_estimate_is_calibrated_against_measured_peak_rss(big_models, name, fmt):
    """Without a measurement, variant choice estimates the need; it must be near the peak RSS a fresh process needs.

    Measured as benchmarks/calibrate_memory.py does (peak RSS growth over load + one inference, library imported).
    """
    from edgerun.choice import memory_need
    from edgerun.package import FileEntry, Variant

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from calibrate_memory import measure
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    b = backend(name)
    path = big_models.get(fmt) or pytest.skip(f"no {fmt} model")
    size = _model_size(path)
    variant = Variant("v", {"ir": "openvino"}.get(fmt, fmt), "fp32", (FileEntry(path.name, "0" * 64, size),))
    need, measured = memory_need(variant, b)
    peak = measure(name, path)["peak"]
    assert not measured
    assert 0.75 * peak <= need <= 1.35 * peak, (f"{name} on a {size / 2**20:.1f} MiB {fmt} model: estimate "
                                                f"{need / 2**20:.1f} MiB, measured peak {peak / 2**20:.1f} MiB")


def _availability_without(modules: list[str], plugin: str, cls: str) -> dict:
    """availability() of a plugin in a fresh interpreter where importing ``modules`` fails."""
    code = textwrap.dedent(f"""
        import json, sys
        for m in {modules!r}:
            sys.modules[m] = None  # import of m now raises ImportError
        from edgerun import Runtime
        from {plugin} import {cls}
        a = {cls}().availability()
        rt = Runtime(threads=1)
        status = {{b.name: str(av) for b, av in rt.backend_status()}}
        print(json.dumps({{"available": a.available, "reason": a.reason, "hint": a.install_hint,
                          "text": str(a), "status": status}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "EDGERUN_STRICT_PLUGINS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_openvino_missing_is_reported_unavailable_with_install_hint():
    got = _availability_without(["openvino"], "edgerun_openvino", "OpenVinoBackend")
    assert got["available"] is False
    assert "openvino cannot be imported" in got["reason"]
    assert got["hint"] == "pip install 'edgerun[openvino]'"
    assert got["status"]["openvino"].startswith("unavailable: openvino cannot be imported")
    assert got["status"]["onnxruntime"] == "available"


def test_litert_missing_is_reported_unavailable_with_install_hint():
    got = _availability_without(["ai_edge_litert", "tflite_runtime"], "edgerun_litert", "LiteRTBackend")
    assert got["available"] is False
    assert got["reason"].startswith("neither ai-edge-litert nor tflite-runtime is installed")
    assert got["hint"] == "pip install 'edgerun[tflite]'"
    assert got["status"]["litert"].endswith("(pip install 'edgerun[tflite]')")


def test_runtime_still_serves_onnx_when_openvino_and_litert_are_missing(digits_package, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["openvino"] = sys.modules["ai_edge_litert"] = sys.modules["tflite_runtime"] = None
        import numpy as np
        from edgerun import Runtime
        rt = Runtime(threads=1)
        m = rt.load({str(digits_package.root)!r}, variant="onnx-fp32")
        out = rt.infer(m.name, {{"input": np.zeros((1, 64), np.float32)}})["probabilities"]
        print(m.backend, out.shape)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["onnxruntime", "(1,", "10)"]


@pytest.mark.parametrize("recorded", [True, False], ids=["dist-info", "no-dist-info"])
def test_tflite_runtime_2_14_under_numpy_2_is_explained(tmp_path, recorded):
    """tflite-runtime 2.14 (built for NumPy 1.x) installed next to NumPy 2: the reason names both and the fix.

    The real wheel cannot be installed offline, so the test puts a tflite_runtime package on the path whose
    interpreter fails to import the way the real one does under NumPy 2 (ImportError "numpy.core.multiarray failed
    to import" from AttributeError "_ARRAY_API not found"). With its dist-info (a pip install) the version alone
    tells; without it (a distro package) the import error does.
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("needs NumPy 2")
    pkg = tmp_path / "tflite_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '2.14.0'\n")
    (pkg / "interpreter.py").write_text(
        "try:\n    raise AttributeError('_ARRAY_API not found')\n"
        "except AttributeError as exc:\n    raise ImportError('numpy.core.multiarray failed to import') from exc\n")
    library = "tflite-runtime"
    if recorded:
        dist = tmp_path / "tflite_runtime-2.14.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tflite-runtime\nVersion: 2.14.0\n")
        library = "tflite-runtime 2.14.0"
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        sys.modules["ai_edge_litert"] = None
        from pathlib import Path
        from edgerun.backend import LoadOptions
        from edgerun.errors import ModelLoadError
        from edgerun_litert import LiteRTBackend
        b = LiteRTBackend()
        try:
            b.load(Path({str(TFLITE_DIR / "digits_fp32.tflite")!r}), LoadOptions())
            load = "loaded"
        except ModelLoadError as exc:
            load = str(exc)
        print(json.dumps({{"text": str(b.availability()), "load": load}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["text"] == (f"unavailable: {library} was built for NumPy 1.x and fails with NumPy "
                           f"{np.__version__}; install ai-edge-litert (pip install 'edgerun[tflite]')")
    assert "built for NumPy 1.x" in got["load"] and "pip install 'edgerun[tflite]'" in got["load"]
