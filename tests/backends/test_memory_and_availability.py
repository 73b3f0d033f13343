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

    name, path = sys.argv[1], Path(sys.argv[2])
    if name == "onnxruntime":
        from edgerun_onnxruntime import OnnxRuntimeBackend as B
    elif name == "openvino":
        from edgerun_openvino import OpenVinoBackend as B
    else:
        from edgerun_litert import LiteRTBackend as B
    b, proc, rss = B(), psutil.Process(), []
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    for _ in range(20):
        s = b.load(path, LoadOptions(threads=1))
        s.run({"input": x})
        s.close()
        del s
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


@pytest.mark.parametrize("name,fmt", [("onnxruntime", "onnx"), ("openvino", "onnx"), ("openvino", "ir"),
                                      ("litert", "tflite")])
def test_close_really_frees_memory(big_models, name, fmt):
    backend(name)
    path = big_models.get(fmt) or pytest.skip(f"no {fmt} model")
    size = sum(f.stat().st_size for f in (path, path.with_suffix(".bin")) if f.is_file())
    assert size > 8_000_000
    proc = subprocess.run([sys.executable, "-c", CYCLE_SCRIPT, name, str(path)], capture_output=True, text=True,
                          timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rss[19] - rss[2]
    assert growth < LEAK_MARGIN, (f"{name}: RSS grew {growth / 2**20:.1f} MiB between load/run/close cycles 3 and 20 "
                                  f"(model {size / 2**20:.1f} MiB); RSS per cycle (MiB): "
                                  f"{[round(r / 2**20) for r in rss]}")


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


def test_tflite_runtime_2_14_under_numpy_2_is_explained(tmp_path):
    """tflite-runtime 2.14 (built for NumPy 1.x) installed next to NumPy 2: the reason names both and the fix.

    The real wheel cannot be installed offline, so the test puts a tflite_runtime 2.14.0 distribution on the path
    whose interpreter fails the way the real one does under NumPy 2 (AttributeError: _ARRAY_API not found).
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("needs NumPy 2")
    pkg = tmp_path / "tflite_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '2.14.0'\n")
    (pkg / "interpreter.py").write_text("raise AttributeError('_ARRAY_API not found')\n")
    dist = tmp_path / "tflite_runtime-2.14.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tflite-runtime\nVersion: 2.14.0\n")
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
    assert got["text"] == (f"unavailable: tflite-runtime 2.14.0 was built for NumPy 1.x and fails with NumPy "
                           f"{np.__version__}; install ai-edge-litert (pip install 'edgerun[tflite]')")
    assert "built for NumPy 1.x" in got["load"] and "pip install 'edgerun[tflite]'" in got["load"]
