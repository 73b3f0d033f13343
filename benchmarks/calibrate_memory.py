"""Calibrate the memory estimate of variant choice: RSS a backend needs to load and run a model of a given size.

    python benchmarks/calibrate_memory.py [--runs 5] [--sizes 1,10,40]

For each available backend and each file size (MB), a random MLP 64-h-h-h-10 of that size (ONNX for
onnxruntime and OpenVINO, tflite for LiteRT) is loaded and run once in a fresh process, ``--runs`` times.
The need of one run is the peak RSS of the process (VmHWM, reset just before the load) minus its RSS then, with the
backend library already imported (the import is paid once per process, not per model). Medians per size
are fitted with least squares to ``need = base + factor * file_size``; the table and the fit are printed and
written to benchmarks/results/calibrate_memory.json. Each backend class's ``memory_estimate`` (plugins/edgerun_*/__init__.py) holds the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys
from pathlib import Path
import numpy as np, psutil
from edgerun.backend import LoadOptions
name, path = sys.argv[1], Path(sys.argv[2])
if name == "onnxruntime":
    from edgerun_onnxruntime import OnnxRuntimeBackend as B
elif name == "openvino":
    from edgerun_openvino import OpenVinoBackend as B
else:
    from edgerun_litert import LiteRTBackend as B
b = B()
assert b.availability().available
if name == "onnxruntime":
    import onnxruntime
elif name == "openvino":
    import openvino
else:
    from ai_edge_litert import interpreter
x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
proc = psutil.Process()

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

try:  # reset the peak RSS (VmHWM) so the peak of the imports does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = proc.memory_info().rss
s = b.load(path, LoadOptions(threads=1))
s.run({"input": x})
after = proc.memory_info().rss
print(json.dumps({"rss": after - before, "peak": max(hwm(), after) - before}))
"""

FORMAT = {"onnxruntime": "onnx", "openvino": "onnx", "litert": "tflite"}


def make_model(root: Path, mb: float, fmt: str) -> Path:
    """A random MLP 64-h-h-h-10 whose file is about ``mb`` MB."""
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    h = max(16, int(math.sqrt(mb * 1e6 / 8)))
    weights = random_mlp_weights([64, h, h, h, 10])
    if fmt == "onnx":
        return mlp_onnx(weights, root / f"mlp-{mb:g}mb.onnx")
    from edgerun.testing.tflite import mlp_tflite

    return mlp_tflite(weights, root / f"mlp-{mb:g}mb.tflite")


def measure(backend: str, path: Path) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", CHILD, backend, str(path)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} on {path.name} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(sizes: list[int], needs: list[float]) -> tuple[float, float]:
    """Least-squares (base, factor) of need = base + factor * size; base is kept non-negative."""
    factor, base = np.polyfit(np.asarray(sizes, float), np.asarray(needs, float), 1)
    if base < 0:
        factor, base = float(np.dot(sizes, needs) / np.dot(sizes, sizes)), 0.0
    return float(base), float(factor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per backend and size (median)")
    ap.add_argument("--sizes", default="1,10,40", help="model file sizes in MB")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "calibrate_memory.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from edgerun import Runtime

    console = Console(width=110)
    mbs = [float(s) for s in args.sizes.split(",")]
    with Runtime(load_plugins=True) as rt:
        available = [b.name for b, a in rt.backend_status() if a.available and b.name in FORMAT]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgerun-calibrate-") as tmp:
        files = {(fmt, mb): make_model(Path(tmp), mb, fmt) for fmt in {FORMAT[b] for b in available} for mb in mbs}
        for backend in available:
            rows = []
            for mb in mbs:
                path = files[(FORMAT[backend], mb)]
                runs = [measure(backend, path) for _ in range(args.runs)]
                rows.append({"file_bytes": path.stat().st_size,
                             "peak_bytes": int(statistics.median(r["peak"] for r in runs)),
                             "rss_bytes": int(statistics.median(r["rss"] for r in runs)),
                             "runs": runs})
            base, factor = fit([r["file_bytes"] for r in rows], [r["peak_bytes"] for r in rows])
            results[backend] = {"format": FORMAT[backend], "base_bytes": int(base), "factor": round(factor, 2),
                                "sizes": rows}

    table = Table(title="memory a loaded model needs: peak RSS growth over load + one inference (median)")
    for col in ("backend", "file MB", "peak MB", "resident MB", "peak / file", "fit: base MB + factor × file"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for backend, r in results.items():
        for i, row in enumerate(r["sizes"]):
            f = row["file_bytes"] / 2**20
            table.add_row(backend if i == 0 else "", f"{f:.1f}", f"{row['peak_bytes'] / 2**20:.1f}",
                          f"{row['rss_bytes'] / 2**20:.1f}", f"{row['peak_bytes'] / row['file_bytes']:.2f}",
                          f"{r['base_bytes'] / 2**20:.1f} + {r['factor']:.2f} × file" if i == 0 else "")
    console.print(table)
    out = {"command": "python benchmarks/calibrate_memory.py", "runs": args.runs, "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backends": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    for backend, r in results.items():
        console.print(f'{backend}: memory_estimate = ({max(1, round(r["base_bytes"] / 2**20))} << 20, '
                      f'{r["factor"]:.1f})')
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
