"""Package the digits MLP and CNN, trained here, from ONNX and from PyTorch; check the packaging targets.

    python benchmarks/packaging.py          # ~5-8 minutes on 2 shared cores; writes benchmarks/results/packaging.json
    python benchmarks/packaging.py --quick  # the CNN from ONNX, once (a smoke test; writes to the temp dir)

Data: scikit-learn's digits (nothing downloaded); validation = the held-out quarter with its labels, calibration =
the first 200 training rows. Models: the 64-64-10 MLP (``train_digits_mlp``, written by ``mlp_onnx``) and the CNN
of ``train_digits_cnn`` ([N, 1, 8, 8] inputs). Each is packaged from its ONNX file and from PyTorch: a module file
written to the temp dir defines the same network in torch, loads the trained weights (the MLP's from scikit-learn,
the CNN's from its ONNX initializers), is checked against the ONNX model, and is packaged as ``module:callable``
(the torch.export-based exporter). The CNN from ONNX is packaged three times to check the kept set is stable.
Formats onnx, openvino, tflite; precisions fp32, fp16, int8, and int4 for the MLP.

Targets (a reference fp32 is the same format's fp32 variant on the same backend, else onnx-fp32 there; every
planned variant is measured, so it exists even when dropped; an int8 variant is *kept for a backend* when the
package keeps it, it ran on that backend and the package does not mark it ``not_for`` that backend (a device
does not pick it there); *faster* means beyond both measured errors):
  1. every kept int8 variant is within 1 point of fp32 and faster than fp32 on each backend it is kept for;
  2. a TFLite int8 variant is kept on the CNN, within 1 point of fp32 on LiteRT (in every CNN packaging);
  3. the three CNN-from-ONNX packagings keep the same variants, mark them ``not_for`` the same backends, and
     lead a device (``Runtime.explain`` on this host) to the same variant and backend at 1 GiB / 64 MiB / 16 MiB;
  4. each package_model call on the CNN takes at most 60 s of wall time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the 'packaging' distribution that onnxruntime imports: keep its folder off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from edgerun.hub.packager import (
    PackageRequest,
    PackagingReport,
    VariantReport,
    package_model,
)
from edgerun.units import format_size

BUDGETS = ("1GiB", "64MiB", "16MiB")
BACKENDS = ("onnxruntime", "openvino", "litert")
SHORT = {"onnxruntime": "ort", "openvino": "ov", "litert": "litert"}
FORMATS = ("onnx", "openvino", "tflite")
MAX_DROP = 1.0  # points
MAX_SECONDS = 60.0
VERSIONS = ("onnxruntime", "openvino", "ai-edge-litert", "tensorflow", "onnx2tf", "torch", "nncf", "onnxscript",
            "scikit-learn")
TORCH_MODULE = "bench_digits_torch"

MODULE_TEXT = '''"""The benchmark's digits networks in PyTorch, with the weights trained by benchmarks/packaging.py."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent


def _load(net, name):
    with np.load(HERE / name) as z:
        net.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
    return net.eval()


def make_mlp():
    """The 64-64-10 MLP of mlp_onnx: Gemm, ReLU, Gemm, Softmax."""
    return _load(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(dim=1)), "mlp.npz")


def make_cnn():
    """The CNN of edgerun.testing.models.train_digits_cnn."""
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    return _load(net, "cnn.npz")
'''


@dataclass
class Job:
    """One package_model call: which model, from which source."""

    name: str  # mlp-onnx, cnn-torch, ...
    model: str
    source: str
    val: Path
    calib: Path
    precisions: tuple[str, ...]
    run: int = 1


@dataclass
class Run:
    """A job's outcome: the report, its wall time and the device's choice per budget."""

    job: Job
    report: PackagingReport
    seconds: float
    picks: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.job.name}#{self.job.run}"

    @property
    def kept(self) -> list[str]:
        return sorted(v.id for v in self.report.kept)

    @property
    def not_for(self) -> dict[str, list[str]]:
        """The backends each kept variant is marked not to be used on."""
        return {v.id: sorted(v.info.get("not_for") or {}) for v in sorted(self.report.kept, key=lambda v: v.id)}


# --- the models ---------------------------------------------------------------------------------------


def write_data(root: Path) -> dict[str, Path]:
    """The digits validation (held-out quarter, labels) and calibration (200 training rows) sets, flat and as images."""
    from edgerun.testing.models import digits_data

    x_train, _, x_val, y_val = digits_data()
    files = {}
    for kind, shape in (("mlp", (-1, 64)), ("cnn", (-1, 1, 8, 8))):
        files[f"{kind}-val"] = root / f"{kind}-val.npz"
        files[f"{kind}-calib"] = root / f"{kind}-calib.npz"
        np.savez(files[f"{kind}-val"], input=x_val.reshape(shape), labels=y_val)
        np.savez(files[f"{kind}-calib"], input=x_train[:200].reshape(shape))
    return files


def train_models(root: Path, quick: bool) -> dict[str, Path]:
    """The trained MLP and CNN as ONNX; the torch module file beside them (skipped with ``quick``)."""
    import onnx
    from onnx import numpy_helper

    from edgerun.testing.models import (
        mlp_onnx,
        sklearn_weights,
        train_digits_cnn,
        train_digits_mlp,
    )

    cnn, _ = train_digits_cnn(root / "cnn.onnx")
    models = {"cnn": cnn}
    if quick:
        return models
    weights = sklearn_weights(train_digits_mlp((64,)))
    models["mlp"] = mlp_onnx(weights, root / "mlp.onnx")
    np.savez(root / "mlp.npz", **{"0.weight": weights[0][0].T, "0.bias": weights[0][1],
                                  "2.weight": weights[1][0].T, "2.bias": weights[1][1]})
    np.savez(root / "cnn.npz", **{i.name: numpy_helper.to_array(i) for i in onnx.load(str(cnn)).graph.initializer})
    (root / f"{TORCH_MODULE}.py").write_text(MODULE_TEXT)
    sys.path.insert(0, str(root))
    return models


def check_torch_module(spec: str, onnx_path: Path, val: Path) -> float:
    """The largest deviation of the torch module from the ONNX model on the validation set (must be tiny)."""
    import onnxruntime as ort
    import torch

    mod, _, attr = spec.partition(":")
    net = getattr(importlib.import_module(mod), attr)()
    with np.load(val) as z:
        x = z["input"]
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    dev = float(np.max(np.abs(got - want)))
    if dev > 1e-4:
        raise SystemExit(f"{spec} does not compute what {onnx_path.name} does (max deviation {dev:.3g})")
    return dev


def jobs_for(models: dict[str, Path], data: dict[str, Path], quick: bool) -> list[Job]:
    """The CNN from ONNX first (cold) and twice more at the end; the MLP and the PyTorch sources in between."""
    cnn_p, mlp_p = ("fp32", "fp16", "int8"), ("fp32", "fp16", "int8", "int4")

    def cnn_onnx(run: int) -> Job:
        return Job("cnn-onnx", str(models["cnn"]), "ONNX file (train_digits_cnn)", data["cnn-val"], data["cnn-calib"],
                   cnn_p, run)

    if quick:
        return [cnn_onnx(1)]
    return [cnn_onnx(1),
            Job("mlp-onnx", str(models["mlp"]), "ONNX file (mlp_onnx of train_digits_mlp)", data["mlp-val"],
                data["mlp-calib"], mlp_p),
            Job("mlp-torch", f"{TORCH_MODULE}:make_mlp", "PyTorch module:callable (torch.export-based exporter)",
                data["mlp-val"], data["mlp-calib"], mlp_p),
            Job("cnn-torch", f"{TORCH_MODULE}:make_cnn", "PyTorch module:callable (torch.export-based exporter)",
                data["cnn-val"], data["cnn-calib"], cnn_p),
            cnn_onnx(2), cnn_onnx(3)]


# --- running ------------------------------------------------------------------------------------------


def picks(out: Path) -> dict[str, str]:
    """The variant and backend ``Runtime().explain`` chooses at each budget."""
    from edgerun.runtime import Runtime

    chosen = {}
    for budget in BUDGETS:
        c = Runtime().explain(out, memory_budget=budget).chosen
        chosen[budget] = f"{c.variant.id} on {c.backend}" if c is not None else "none fits"
    return chosen


def package(job: Job, root: Path) -> Run:
    """One package_model call, timed."""
    out = root / f"pkg-{job.name}-{job.run}"
    req = PackageRequest(model=job.model, name=job.name, version=job.run, validation=job.val, out=out,
                         calibration=job.calib, precisions=job.precisions, formats=FORMATS,
                         max_accuracy_drop=MAX_DROP, force=True)
    t0 = time.perf_counter()
    report = package_model(req)
    return Run(job, report, time.perf_counter() - t0, picks(out))


# --- targets ------------------------------------------------------------------------------------------


def reference(run: Run, v: VariantReport, backend: str) -> tuple[VariantReport, Any] | None:
    """The fp32 variant ``v`` is judged by on ``backend``: its own format's, else onnx-fp32, as run there."""
    by = {u.id: u for u in run.report.variants}
    for rid in (f"{v.format}-fp32", "onnx-fp32"):
        u = by.get(rid)
        if u is not None and backend in u.ok_results():
            return u, u.results[backend]
    return None


def within(acc: float | None, ref: float | None) -> bool:
    return acc is not None and ref is not None and ref - acc <= MAX_DROP / 100 + 1e-9


def beyond_errors(a: Any, b: Any) -> bool:
    """``a`` is faster than ``b`` beyond both measured errors."""
    return (a.latency_ms is not None and b.latency_ms is not None
            and a.latency_ms + (a.latency_err_ms or 0) < b.latency_ms - (b.latency_err_ms or 0))


def us(r: Any) -> str:
    if r is None or r.latency_ms is None:
        return "-"
    err = f" ± {1000 * r.latency_err_ms:.1f}" if r.latency_err_ms is not None else ""
    return f"{1000 * r.latency_ms:.1f}{err} µs"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def target_int8(runs: list[Run]) -> dict[str, Any]:
    """1: every kept int8 variant within 1 point of fp32 and faster, on each backend it is kept for."""
    rows = []
    for run in runs:
        for v in run.report.kept:
            if v.precision != "int8":
                continue
            for b, r in v.ok_results().items():
                if b in (v.info.get("not_for") or {}):
                    continue
                ref = reference(run, v, b)
                if ref is None:
                    rows.append({"run": run.label, "variant": v.id, "backend": b, "pass": False,
                                 "text": "no fp32 measured on this backend"})
                    continue
                u, rr = ref
                acc_ok, fast = within(r.accuracy, rr.accuracy), beyond_errors(r, rr)
                rows.append({"run": run.label, "variant": v.id, "backend": b, "fp32": u.id, "pass": acc_ok and fast,
                             "accuracy": r.accuracy, "fp32_accuracy": rr.accuracy, "latency_ms": r.latency_ms,
                             "latency_err_ms": r.latency_err_ms, "fp32_latency_ms": rr.latency_ms,
                             "fp32_latency_err_ms": rr.latency_err_ms,
                             "text": f"{pct(r.accuracy)} vs {pct(rr.accuracy)} ({u.id}); {us(r)} vs {us(rr)}"
                                     f" = {rr.latency_ms / r.latency_ms:.2f}× "
                                     f"{'faster' if fast else 'NOT faster beyond the errors'}"
                                     + ("" if acc_ok else "; more than 1 point below")})
    ok = bool(rows) and all(r["pass"] for r in rows)
    return {"target": "1", "title": "kept int8 within 1 point of fp32 and faster, on each backend kept for",
            "pass": ok, "rows": rows,
            "summary": f"{sum(r['pass'] for r in rows)}/{len(rows)} (variant, backend) pairs pass"
                       if rows else "no int8 variant kept"}


def target_tflite_int8(runs: list[Run]) -> dict[str, Any]:
    """2: a TFLite int8 variant kept on the CNN, within 1 point of fp32 on LiteRT."""
    rows = []
    for run in runs:
        if not run.job.name.startswith("cnn"):
            continue
        tfl = [v for v in run.report.variants if v.format == "tflite" and v.precision == "int8"]
        kept = [v for v in tfl if v.status == "kept"]
        good = []
        for v in kept:
            r, ref = v.results.get("litert"), reference(run, v, "litert")
            if r is not None and ref is not None and within(r.accuracy, ref[1].accuracy):
                good.append(f"{v.id} kept: {pct(r.accuracy)} vs {ref[0].id} {pct(ref[1].accuracy)} on litert")
        if good:
            rows.append({"run": run.label, "pass": True, "text": "; ".join(good)})
            continue
        why = []
        for v in tfl:
            r = v.results.get("litert")
            ref = reference(run, v, "litert")
            acc = f"{pct(r.accuracy)} on litert" if r is not None and r.error is None else "not measured"
            fp32 = f" vs {ref[0].id} {pct(ref[1].accuracy)}" if ref else ""
            why.append(f"{v.id} {v.status} ({acc}{fp32}): {v.reason}")
        rows.append({"run": run.label, "pass": False, "text": "; ".join(why) or "no TFLite int8 variant planned"})
    ok = bool(rows) and all(r["pass"] for r in rows)
    return {"target": "2", "title": "a kept TFLite int8 variant on the CNN within 1 point of fp32", "pass": ok,
            "rows": rows, "summary": f"{sum(r['pass'] for r in rows)}/{len(rows)} CNN packagings have one"}


def target_stable(runs: list[Run]) -> dict[str, Any]:
    """3: the same kept set, the same backends each is kept for (``not_for``) and the same device choice over the
    CNN-from-ONNX runs."""
    same = [r for r in runs if r.job.name == "cnn-onnx"]
    title = f"kept set, where each is used and the device's pick identical over {len(same)} packagings of the CNN"
    if len(same) < 2:
        return {"target": "3", "title": title, "pass": None, "rows": [], "summary": "not run (one packaging)"}
    kept_same = len({tuple(r.kept) for r in same}) == 1
    used_same = len({tuple((v, tuple(bs)) for v, bs in r.not_for.items()) for r in same}) == 1
    picks_same = len({tuple(r.picks.items()) for r in same}) == 1
    ok = kept_same and used_same and picks_same
    rows = [{"run": r.label, "pass": ok, "kept": r.kept, "not_for": r.not_for, "picks": r.picks,
             "text": f"kept {', '.join(r.kept)}; not for: "
                     + ("; ".join(f"{v} on {', '.join(bs)}" for v, bs in r.not_for.items() if bs) or "none")
                     + "; device picks " + "; ".join(f"{b}: {p}" for b, p in r.picks.items())}
            for r in same]
    word = {True: "identical", False: "DIFFERS"}
    return {"target": "3", "title": title, "pass": ok, "kept_same": kept_same, "not_for_same": used_same,
            "device_choice_same": picks_same, "rows": rows,
            "summary": f"kept set {word[kept_same]}; not_for {word[used_same]}; device choice at "
                       f"{'/'.join(BUDGETS)} {word[picks_same]} across the runs"}


def target_time(runs: list[Run]) -> dict[str, Any]:
    """4: one package_model call on the CNN takes at most 60 s."""
    rows = [{"run": r.label, "pass": r.seconds <= MAX_SECONDS, "seconds": round(r.seconds, 1),
             "text": f"{r.seconds:.1f} s ({r.job.source})"} for r in runs if r.job.name.startswith("cnn")]
    ok = bool(rows) and all(r["pass"] for r in rows)
    return {"target": "4", "title": f"packaging the CNN takes ≤ {MAX_SECONDS:.0f} s", "pass": ok, "rows": rows,
            "summary": ", ".join(f"{r['run']} {r['seconds']} s" for r in rows)}


# --- printing -----------------------------------------------------------------------------------------


def int8_info(v: VariantReport) -> str:
    """The recorded int8 settings, targets and where the variant was validated, in one line."""
    parts = []
    s = v.info.get("int8")
    if s:
        how = [s.get("tool", "?")]
        if "activations" in s:
            how.append(f"{s['activations']} activations, {s['weights']} weights "
                       f"{'per channel' if s.get('per_channel') else 'per tensor'}")
        if "reduce_range" in s:
            how.append(f"reduce_range {s['reduce_range']}")
        if "overflow_fix" in s:
            how.append(f"overflow_fix {s['overflow_fix']}")
        if s.get("excluded"):
            how.append(f"{len(s['excluded'])} node(s) kept in fp32")
        how.append(f"targets {', '.join(s.get('targets') or []) or '-'}")
        parts.append("; ".join(how))
    t = v.info.get("tflite")
    if t:
        parts.append(f"{t.get('quantization')}, {t.get('weights', '?')} weights"
                     + (f", calibrated on {t['calibration_rows']} rows" if t.get("calibration_rows") else "")
                     + f" (onnx2tf {t.get('onnx2tf')})")
    where = []
    for rec in v.info.get("validated", []):
        on = (f"{rec['cpu']} ({rec['how']}" + (f", {rec['cpu_model']}" if rec.get("cpu_model") else "")
              + (f", {rec['backend']}" if rec.get("backend") else "") + ")")
        if "score" not in rec:  # a class that could not be checked says why in its "how"
            where.append(on)
            continue
        base = f", fp32 {pct(rec['fp32_score'])}" if "fp32_score" in rec else ""
        where.append(f"{on}: {rec['metric']} {pct(rec['score'])} on {rec['samples']}{base}")
    parts.append("validated on " + "; ".join(where) if where else "no per-CPU validation recorded")
    if s and "weight_max" in s:
        parts.append(f"largest int8 weight {s['weight_max']}")
    if "validation" in v.info:
        val = v.info["validation"]
        parts.append(f"package sample agreement {pct(val['agreement'])} on {val['samples']}")
    return " | ".join(parts)


def print_run(console: Any, run: Run) -> None:
    """The per-variant table of one packaging, with reasons and the int8 records below it."""
    from rich.table import Table

    rep = run.report
    title = f"{run.label}: {run.job.source}, {rep.weights} — packaged in {run.seconds:.1f} s"
    table = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    for col in ("variant", "prec", "verdict"):
        table.add_column(col, no_wrap=True)
    for metric in ("acc", "latency", "memory"):
        for b in BACKENDS:
            table.add_column(f"{metric} {SHORT[b]}", justify="right", no_wrap=True)
    for v in rep.variants:
        cells = {"acc": [], "latency": [], "memory": []}
        for b in BACKENDS:
            r = v.results.get(b)
            if r is not None and r.error is not None:
                for column in cells.values():
                    column.append("failed")
                continue
            cells["acc"].append(pct(r.accuracy) if r else "")
            cells["latency"].append(us(r) if r else "")
            cells["memory"].append(format_size(r.memory_bytes) if r else "")
        style = {"kept": "green", "dropped": "yellow", "skipped": "dim"}.get(v.status, "")
        table.add_row(v.id, v.precision, f"[{style}]{v.status}[/]", *cells["acc"], *cells["latency"],
                      *cells["memory"])
    console.print(table)
    for note in rep.notes:
        console.print(f"  note: {note}", highlight=False)
    console.print("  device picks: " + "; ".join(f"{b}: {p}" for b, p in run.picks.items()), highlight=False)
    for v in rep.variants:
        if v.status != "kept":
            console.print(f"  {v.id} {v.status}: {v.reason}", highlight=False, soft_wrap=True)
    for v in rep.variants:
        if v.precision == "int8" and v.status != "skipped":
            console.print(f"  int8 {v.id}: {int8_info(v)}", highlight=False, soft_wrap=True)


def print_targets(console: Any, targets: list[dict[str, Any]]) -> None:
    """PASS/FAIL per target with the numbers behind it."""
    from rich.table import Table

    table = Table(title="targets", title_justify="left")
    for col in ("#", "target", "result", "numbers"):
        table.add_column(col, overflow="fold")
    for t in targets:
        verdict = "[dim]n/a[/]" if t["pass"] is None else "[green]PASS[/]" if t["pass"] else "[red]FAIL[/]"
        table.add_row(t["target"], t["title"], verdict, t["summary"])
    console.print(table)
    for t in targets:
        for r in t["rows"]:
            mark = "ok  " if r["pass"] else "FAIL"
            what = f"{r['run']} {r.get('variant', '')} {'on ' + r['backend'] if 'backend' in r else ''}".rstrip()
            console.print(f"  [{t['target']}] {mark} {what}: {r['text']}", highlight=False, soft_wrap=True)


# --- results ------------------------------------------------------------------------------------------


def host() -> dict[str, Any]:
    from edgerun.device import detect

    facts = detect()
    return {"machine": platform.machine(), "cpu_model": facts.cpu_model, "cpu_class": facts.cpu_class,
            "cpu_count": facts.cpu_count, "cpu_flags": sorted(facts.cpu_flags), "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def run_record(run: Run) -> dict[str, Any]:
    d = run.report.to_dict()
    d.pop("out")
    return {"model": run.job.name, "run": run.job.run, "source": run.job.source, "spec": run.job.model,
            "precisions": list(run.job.precisions), "formats": list(FORMATS), "seconds": round(run.seconds, 1),
            "kept": run.kept, "not_for": run.not_for, "picks": run.picks, "report": d}


def main() -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CNN from ONNX, once (a smoke test)")
    ap.add_argument("--out", type=Path, help="results file (default: benchmarks/results/packaging.json; with "
                                             "--quick, a file in the temp dir)")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 220)
    started, t_all = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-packaging-") as tmp:
        root = Path(tmp)
        data = write_data(root)
        t0 = time.perf_counter()
        models = train_models(root, args.quick)
        deviations = {}
        if not args.quick:
            deviations = {f"{TORCH_MODULE}:make_{k}": check_torch_module(f"{TORCH_MODULE}:make_{k}", models[k],
                                                                         data[f"{k}-val"]) for k in ("mlp", "cnn")}
        console.print(f"trained the models in {time.perf_counter() - t0:.1f} s; torch modules vs ONNX: "
                      + (", ".join(f"{k} max deviation {d:.2g}" for k, d in deviations.items()) or "-"),
                      highlight=False)
        runs = []
        for job in jobs_for(models, data, args.quick):
            console.print(f"packaging {job.name} (run {job.run}) from {job.model} ...", highlight=False)
            runs.append(package(job, root))
            print_run(console, runs[-1])
    targets = [target_int8(runs), target_tflite_int8(runs), target_stable(runs), target_time(runs)]
    total = time.perf_counter() - t_all
    console.print()
    print_targets(console, targets)
    console.print(f"total run time {total:.0f} s", highlight=False)
    out = args.out or (Path(tempfile.gettempdir()) / "edgerun-packaging-quick.json" if args.quick
                       else ROOT / "benchmarks" / "results" / "packaging.json")
    results = {"command": "python benchmarks/packaging.py" + (" --quick" if args.quick else ""), "date": started,
               "total_seconds": round(total, 1), "host": host(), "versions": versions(),
               "max_accuracy_drop": MAX_DROP, "torch_module_deviation": deviations, "targets": targets,
               "runs": [run_record(r) for r in runs]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    console.print(f"wrote {out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
