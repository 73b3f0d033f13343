"""What edgerun's Runtime adds per inference: ``Runtime.infer`` versus the backend session's own ``run``.

    python benchmarks/overhead.py [--quick]

For each available backend, on a ~1 ms model (random MLP 64-2048-2048-2048-10) and a ~50 µs one
(MLP 64-512-512-10), batch 1, one thread: loops of raw ``session.run`` and of ``Runtime.infer`` on the
same session and input are interleaved; per-call times are medians over the loops (≥200 calls each).
Writes benchmarks/results/overhead.json. Targets: ≤5% on the 1 ms model, ≤10 µs on the small one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

MODELS = {"1ms": [64, 2048, 2048, 2048, 10], "50us": [64, 512, 512, 10]}
TARGETS = {"1ms": ("percent", 5.0), "50us": ("us", 10.0)}


def make_package(root: Path, name: str, sizes: list[int], fmt: str) -> Path:
    """A one-variant package holding a random MLP as ONNX or tflite."""
    from edgerun.package import ModelPackage, Variant, file_entry, save_package
    from edgerun.tensors import TensorSpec
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    root.mkdir(parents=True, exist_ok=True)
    weights = random_mlp_weights(sizes)
    if fmt == "onnx":
        mlp_onnx(weights, root / "model.onnx")
        files = (file_entry(root, "model.onnx"),)
    else:
        from edgerun.testing.tflite import mlp_tflite

        mlp_tflite(weights, root / "model.tflite")
        files = (file_entry(root, "model.tflite"),)
    pkg = ModelPackage(name=name, version=1, inputs=[TensorSpec("input", "FP32", (-1, sizes[0]))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, sizes[-1]))],
                       variants=[Variant(f"{fmt}-fp32", fmt, "fp32", files)])
    save_package(pkg, root)
    return root


def per_call(fn, calls: int) -> float:
    """Mean seconds per call over one loop of ``calls`` calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(rt, model_name: str, x: np.ndarray, loops: int, calls: int) -> tuple[float, float, int]:
    """Median µs per call of raw session.run and of Runtime.infer, interleaved loop by loop."""
    session = rt.model(model_name).session
    inputs = {"input": x}
    raw = lambda: session.run(inputs)  # noqa: E731
    wrapped = lambda: rt.infer(model_name, inputs)  # noqa: E731
    for _ in range(max(5, calls // 4)):  # warm both paths
        raw()
        wrapped()
    raw_t, rt_t = [], []
    for i in range(loops):
        order = (raw, wrapped) if i % 2 == 0 else (wrapped, raw)
        for fn in order:
            (raw_t if fn is raw else rt_t).append(per_call(fn, calls))
    return statistics.median(raw_t) * 1e6, statistics.median(rt_t) * 1e6, loops * calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer loops (a smoke run, not for the record)")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "overhead.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from edgerun import Runtime

    console = Console(width=110)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgerun-overhead-") as tmp, Runtime(threads=1) as rt:
        status = {b.name: a for b, a in rt.backend_status()}
        for backend, avail in status.items():
            if not avail.available:
                console.print(f"[yellow]skip {backend}: {avail}")
                continue
            fmt = "tflite" if "tflite" in rt.backends[backend].formats else "onnx"
            for label, sizes in MODELS.items():
                name = f"{backend}-{label}"
                root = make_package(Path(tmp) / name, name, sizes, fmt)
                rt.load(root, backend=backend)
                x = np.random.default_rng(0).random((1, sizes[0]), dtype=np.float32)
                # ~0.4 s per side on the 1 ms model, ~0.2 s on the small one; ≥200 calls each
                loops = 10 if args.quick else 30
                calls = 10 if label == "1ms" else 200
                if args.quick:
                    calls = max(2, calls // 4)
                raw_us, rt_us, n = measure(rt, name, x, loops, calls)
                over = rt_us - raw_us
                kind, limit = TARGETS[label]
                ok = (over / raw_us * 100 if kind == "percent" else over) <= limit
                rows.append({"backend": backend, "model": label, "layers": sizes, "format": fmt,
                             "raw_us": round(raw_us, 2), "runtime_us": round(rt_us, 2),
                             "overhead_us": round(over, 2), "overhead_pct": round(over / raw_us * 100, 2),
                             "target": f"<= {limit:g}{'%' if kind == 'percent' else ' us'}", "meets_target": ok,
                             "calls_per_side": n})
                rt.unload(name)

    table = Table(title="edgerun Runtime.infer overhead (batch 1, 1 thread, median per call)")
    for col in ("backend", "model", "raw µs", "Runtime µs", "overhead µs", "overhead %", "target"):
        table.add_column(col, justify="left" if col in ("backend", "model") else "right")
    for r in rows:
        style = "green" if r["meets_target"] else "red"
        table.add_row(r["backend"], r["model"], f"{r['raw_us']:.1f}", f"{r['runtime_us']:.1f}",
                      f"{r['overhead_us']:.2f}", f"{r['overhead_pct']:.2f}",
                      f"[{style}]{r['target']}[/{style}]")
    console.print(table)
    result = {"command": "python benchmarks/overhead.py" + (" --quick" if args.quick else ""),
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
