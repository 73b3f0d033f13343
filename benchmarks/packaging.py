"""Package the digits MLP and a ~3M-parameter MobileNet-like CNN with ``edgerun hub package``; print what was measured.

    python benchmarks/packaging.py            # ~3-5 minutes on 2 shared cores; writes benchmarks/results/packaging.json

Digits: scikit-learn's digits, MLPs trained here (64-64-10, the example model, and a MatMul-heavy 64-512-512-10),
accuracy on the held-out quarter, calibration on 200 training rows.
CNN: MobileNet-v1 layout (3.2M parameters) on 3x64x64 inputs with random He-initialised convolutions and a head fitted
to the features' leading principal components. Its validation set is synthetic: structured random images labelled
with the fp32 model's own top-1, so fp32 scores 100% by construction and every other variant's "accuracy" is its
agreement with fp32. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the 'packaging' distribution that onnxruntime imports: keep its folder off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests" / "hub_package"))

from cnn import fp32_labels, mobilenet_onnx, structured_images  # noqa: E402

from edgerun.hub.packager import PackageRequest, package_model  # noqa: E402
from edgerun.runtime import Runtime  # noqa: E402
from edgerun.units import format_size  # noqa: E402

BUDGETS = ("1GiB", "64MiB", "16MiB")


def digits_inputs(root: Path, hidden: tuple[int, ...] = (64,), max_iter: int = 300) -> tuple[Path, Path, Path]:
    from edgerun.testing.models import digits_data, mlp_onnx, sklearn_weights, train_digits_mlp

    x_train, _, x_val, y_val = digits_data()
    tag = "-".join(map(str, hidden))
    model = mlp_onnx(sklearn_weights(train_digits_mlp(hidden, max_iter=max_iter)), root / f"digits-{tag}.onnx")
    np.savez(root / "digits-val.npz", input=x_val, labels=y_val)
    np.savez(root / "digits-calib.npz", input=x_train[:200])
    return model, root / "digits-val.npz", root / "digits-calib.npz"


def cnn_inputs(root: Path, n_val: int) -> tuple[Path, Path, Path]:
    model = mobilenet_onnx(root / "mobilenet64.onnx", size=64, head_images=structured_images(300, 64, seed=1))
    x_val = structured_images(n_val, 64, seed=5)
    np.savez(root / "cnn-val.npz", image=x_val, labels=fp32_labels(model, x_val))
    np.savez(root / "cnn-calib.npz", image=structured_images(64, 64, seed=6))
    return model, root / "cnn-val.npz", root / "cnn-calib.npz"


def picks(out: Path) -> dict[str, str]:
    rt = Runtime()
    chosen = {}
    for budget in BUDGETS:
        c = rt.explain(out, memory_budget=budget)
        if c.chosen is None:
            fits = [x for x in c.candidates if x.backend != "-"]
            smallest = min(fits, key=lambda x: x.memory_bytes) if fits else None
            chosen[budget] = ("none fits" + (f" (smallest: {smallest.variant.id} on {smallest.backend}, "
                                            f"{format_size(smallest.memory_bytes)})" if smallest else ""))
        else:
            chosen[budget] = (f"{c.chosen.variant.id} on {c.chosen.backend} "
                              f"({format_size(c.chosen.memory_bytes)})")
    return chosen


def print_report(title: str, report, budget_picks: dict[str, str]) -> None:
    metric = "acc" if report.metric == "accuracy" else "agree"
    print(f"\n== {title}: {report.weights}")
    print(f"{'variant':<24}{'verdict':<9}{'size':>10}{'zlib':>10}{metric:>8}  latency ms (1 thread, batch 1) / peak RSS")
    for v in report.variants:
        if v.status == "skipped":
            print(f"{v.id:<24}skipped  {v.reason[:100]}")
            continue
        s = v.score(report.metric)
        per = "  ".join(f"{b}: {r.latency_ms:.3f} / {format_size(r.memory_bytes)}" for b, r in v.ok_results().items())
        errs = "  ".join(f"{b}: failed" for b, r in v.results.items() if r.error)
        print(f"{v.id:<24}{v.status:<9}{format_size(v.size):>10}{format_size(v.compressed_size):>10}"
              f"{100 * s if s is not None else float('nan'):>7.2f}%  {per}  {errs}".rstrip())
        if v.status == "dropped":
            print(f"{'':<33}↳ {v.reason[:160]}")
    for budget, pick in budget_picks.items():
        print(f"  device picks at {budget:>6}: {pick}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "packaging.json")
    ap.add_argument("--cnn-val", type=int, default=200, help="synthetic CNN validation images")
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    results = {"command": "python benchmarks/packaging.py", "host": {"machine": platform.machine(),
               "processor": platform.processor(), "python": platform.python_version()}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-") as tmp:
        root = Path(tmp)
        cnn = cnn_inputs(root, args.cnn_val)
        jobs = [("digits", *digits_inputs(root), "digits MLP (64-64-10), accuracy on the held-out digits", 1.0),
                ("digits-wide", *digits_inputs(root, (512, 512), max_iter=60),
                 "wider digits MLP (64-512-512-10, MatMul-heavy), accuracy on the held-out digits", 1.0),
                ("mobilenet64", *cnn, "MobileNet-like CNN, 3x64x64; labels = fp32's own top-1 on synthetic images",
                 1.0),
                ("mobilenet64-bound20", *cnn, "the same CNN with --max-accuracy-drop 20 (to see the int8 choice)",
                 20.0)]
        for name, model, val, calib, title, bound in jobs:
            t0 = time.perf_counter()
            req = PackageRequest(model=model, name=name, version=1, validation=val, calibration=calib,
                                 out=root / f"{name}-pkg", precisions=("fp32", "fp16", "int8", "int4"),
                                 formats=("onnx", "openvino", "tflite"), prune=0.5, repeats=args.repeats,
                                 max_accuracy_drop=bound)
            report = package_model(req)
            seconds = time.perf_counter() - t0
            budget_picks = picks(req.out)
            print_report(f"{title} — packaged in {seconds:.0f}s", report, budget_picks)
            d = report.to_dict()
            d.pop("out")
            results["models"][name] = {"title": title, "max_accuracy_drop": bound, "seconds": round(seconds, 1), "report": d,
                                       "picks": budget_picks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
