"""Triton's ``perf_analyzer``, for the tests and benchmarks that run it against edgerun.

It ships in the ``tritonclient`` 2.51 wheel (``tritonclient-2.51.0.data/data/bin/perf_analyzer``), links
``libb64.so.0d`` (Debian's ``libb64-0d``) and ``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``, found
through ``LD_LIBRARY_PATH``), and runs on the CPU without a GPU. ``python -m edgerun.testing.perf_analyzer``
puts it in the cache (``.ci/run`` does, once); ``find()`` returns it and the environment it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "tritonclient==2.51.0"
MEMBER = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgerun" / "perf_analyzer"


def find() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary and the environment to run it in; LookupError saying what is missing."""
    path = os.environ.get("EDGERUN_PERF_ANALYZER") or shutil.which("perf_analyzer") or str(CACHE / "perf_analyzer")
    if not os.access(path, os.X_OK):
        raise LookupError(f"perf_analyzer not found (looked in PATH and {CACHE}); `python -m "
                          "edgerun.testing.perf_analyzer` fetches it from the tritonclient 2.51 wheel")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        lib = str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    except ImportError:
        pass
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, env=env, timeout=30)
    if "error while loading shared libraries" in probe.stderr:
        raise LookupError(f"perf_analyzer cannot start: {probe.stderr.strip()} (apt-get install libb64-0d; "
                          "pip install nvidia-cuda-runtime-cu12)")
    return path, env


def fetch() -> Path:
    """Put perf_analyzer in the cache from the tritonclient 2.51 wheel (pip download, no install)."""
    target = CACHE / "perf_analyzer"
    if os.access(target, os.X_OK):
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        "-d", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("tritonclient-*.whl")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".part").chmod(0o755)
    target.with_suffix(".part").rename(target)
    return target


if __name__ == "__main__":
    print(fetch())
