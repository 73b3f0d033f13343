"""With no backend library importable, ``import edgerun`` and the CLI still work and say what to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND_LIBRARIES = ("onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime")
# A meta-path finder placed first: importing any backend library (or a submodule) fails as if it were not installed.
BLOCKER = textwrap.dedent(f"""
    import sys

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {BACKEND_LIBRARIES!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")


def _python(code: str, *args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """Run ``code`` after the blocker in a fresh interpreter."""
    env = {**os.environ, "COLUMNS": str(columns), "EDGERUN_LOG_LEVEL": "WARNING", "EDGERUN_STRICT_PLUGINS": "1"}
    env.pop("EDGERUN_DISABLE_PLUGINS", None)
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def _edgerun(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """``edgerun ARGS`` (what the console script runs) with no backend library importable."""
    return _python("from edgerun.cli import main\nsys.exit(main())", *args, columns=columns)


def test_import_edgerun_without_any_backend_library() -> None:
    proc = _python("""
        import edgerun, edgerun.cli
        from edgerun import Runtime
        for name in {libs!r}:
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f"{{name}} was importable: the blocker does not work")
        rt = Runtime()
        print(edgerun.__version__, sorted(rt.backends), [a.available for _, a in rt.backend_status()])
    """.format(libs=BACKEND_LIBRARIES))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "0.1.0 ['litert', 'onnxruntime', 'openvino'] [False, False, False]"


def test_help_without_any_backend_library() -> None:
    proc = _edgerun("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for command in ("backends", "device", "explain", "run", "serve"):
        assert f" {command} " in proc.stdout


@pytest.mark.parametrize("columns", [80, 200])
def test_backends_without_any_backend_library_names_each_install_hint(columns: int) -> None:
    proc = _edgerun("backends", columns=columns)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "…" not in proc.stdout, "nothing is cut off"
    if columns < 200:
        return
    for backend, extra in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("litert", "tflite")):
        row = next(line for line in lines if line.startswith(f"│ {backend} "))
        assert "│ no " in row and f"pip install 'edgerun[{extra}]'" in proc.stdout
    assert "No module named 'onnxruntime'" in proc.stdout


def test_explain_without_any_backend_library_says_what_to_install() -> None:
    proc = _edgerun("explain", str(ROOT / "examples" / "digits"), "--profile", "generic-x86_64")
    assert proc.returncode == 69
    assert "can run here (onnx-fp32, onnx-int8 on onnxruntime: backend unavailable" in proc.stderr
    assert "pip install 'edgerun[onnxruntime]'" in proc.stderr and "pip install 'edgerun[openvino]'" in proc.stderr
