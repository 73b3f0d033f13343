"""What edgerun adds per inference: ``Runtime.infer`` versus the backend library's own call on the same session.

    python benchmarks/overhead.py [--quick]

For each available backend, on a ~1 ms model (random MLP 64-2048-2048-2048-10) and a ~50 µs one
(MLP 64-512-512-10), batch 1, one thread, the same loaded session and input are run three ways, interleaved
call by call: the native library call (onnxruntime ``InferenceSession.run``, OpenVINO ``InferRequest.infer``,
LiteRT ``set_tensor``/``invoke``/``get_tensor``), edgerun's ``Session.run`` (the plugin) and ``Runtime.infer``
(input checks, version lookup, in-flight accounting, the plugin). Each is timed per call; the table shows
medians over 400 calls (1 ms model) or 2000 calls (50 µs model) per path. Overhead = Runtime.infer - native.
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
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent

MODELS = {"1ms": [64, 2048, 2048, 2048, 10], "50us": [64, 512, 512, 10]}
TARGETS = {"1ms": ("percent", 5.0), "50us": ("us", 10.0)}
RUNS = {"1ms": 400, "50us": 2000}  # timed calls per path; the medians are over these


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


def native_call(session) -> Callable[[dict[str, np.ndarray]], object]:
    """The backend library's own call on the object behind an edgerun Session: what a user without edgerun runs."""
    name = type(session).__name__
    if name == "OnnxRuntimeSession":
        ort_session, outputs = session._sess, [o.name for o in session.outputs]
        return lambda inputs: ort_session.run(outputs, inputs)
    if name == "OpenVinoSession":
        request = session._request()
        return lambda inputs: request.infer(inputs, share_inputs=True)
    if name == "LiteRTSession":
        interp = session._interp
        (in_index,), out_indices = [i for _, i in session._in], [i for _, i in session._out]

        def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
            interp.set_tensor(in_index, inputs["input"])
            interp.invoke()
            return [interp.get_tensor(i) for i in out_indices]
        return run
    raise ValueError(f"no native call known for {name}")


def measure(rt, model_name: str, x: np.ndarray, runs: int) -> dict[str, float]:
    """Median µs per call of the native library call, edgerun's Session.run and Runtime.infer, interleaved call by call."""
    session = rt.model(model_name).session
    inputs = {"input": x}
    native = native_call(session)
    paths = {"native": lambda: native(inputs), "session": lambda: session.run(inputs),
             "runtime": lambda: rt.infer(model_name, inputs)}
    for fn in paths.values():  # warm every path
        for _ in range(max(10, runs // 10)):
            fn()
    times: dict[str, list[int]] = {k: [] for k in paths}
    order = list(paths.items())
    clock = time.perf_counter_ns
    for i in range(runs):
        for key, fn in order[i % 3:] + order[:i % 3]:  # rotate so no path always runs first
            t0 = clock()
            fn()
            times[key].append(clock() - t0)
    return {k: statistics.median(v) / 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a fifth of the calls (a smoke run, not for the record)")
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
                runs = RUNS[label] // (5 if args.quick else 1)
                us = measure(rt, name, x, runs)
                over = us["runtime"] - us["native"]
                kind, limit = TARGETS[label]
                ok = (over / us["native"] * 100 if kind == "percent" else over) <= limit
                rows.append({"backend": backend, "model": label, "layers": sizes, "format": fmt,
                             "native_us": round(us["native"], 2), "session_us": round(us["session"], 2),
                             "runtime_us": round(us["runtime"], 2), "overhead_us": round(over, 2),
                             "overhead_pct": round(over / us["native"] * 100, 2),
                             "target": f"<= {limit:g}{'%' if kind == 'percent' else ' us'}", "meets_target": ok,
                             "runs": runs})
                rt.unload(name)

    table = Table(title="edgerun Runtime.infer overhead over the native call (batch 1, 1 thread, median per call)")
    for col in ("backend", "model", "native µs", "Session µs", "Runtime µs", "overhead µs", "overhead %", "target",
                "runs"):
        table.add_column(col, justify="left" if col in ("backend", "model") else "right")
    for r in rows:
        style = "green" if r["meets_target"] else "red"
        table.add_row(r["backend"], r["model"], f"{r['native_us']:.1f}", f"{r['session_us']:.1f}",
                      f"{r['runtime_us']:.1f}", f"{r['overhead_us']:.2f}", f"{r['overhead_pct']:.2f}",
                      f"[{style}]{r['target']}[/{style}]", str(r["runs"]))
    console.print(table)
    result = {"command": "python benchmarks/overhead.py" + (" --quick" if args.quick else ""),
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
