"""Build the digits example package the README uses: a scikit-learn MLP (64-64-10) as ONNX fp32 and int8.

Run once at generation time (needs the ``dev`` and ``hub`` extras: scikit-learn, onnx, onnxruntime); the generated
files are committed, so tests, CI and users only read them:

    python examples/digits/build.py

Writes, beside this script: ``model.fp32.onnx``, ``model.int8.onnx`` (dynamic int8 quantization), ``edgerun.toml``
and ``sample_input.npy`` (two digit images, for ``edgerun run examples/digits --input input=examples/digits/sample_input.npy``).
Each variant is measured the way ``edgerun hub package`` measures (``edgerun.hub.packager.measure_variants``) on
every backend installed here: accuracy on the validation split, latency and peak memory per backend, and the
warm-up tolerance, so a device chooses by measured figures. Unlike ``edgerun hub package``, both variants are
kept whatever they measure: the README uses them to show the choice between them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgerun.hub.packager import VariantReport, available_backends, measure_variants, package_variant
from edgerun.package import save_package
from edgerun.testing.models import digits_data, make_digits_package

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Train, export, quantize, measure and write the package into this directory."""
    pkg = make_digits_package(HERE, name="digits", version=1, hidden=(64,), seed=0)
    np.save(HERE / "sample_input.npy", pkg.samples[0].inputs["input"])
    _, _, x_val, y_val = digits_data(seed=0)
    backends = available_backends()
    reports = [VariantReport(v.id, v.format, v.precision, "example", files=[f.path for f in v.files])
               for v in pkg.variants]
    work = Path(tempfile.mkdtemp(prefix="edgerun-example-"))
    try:
        if measure_variants(HERE, reports, backends, {"input": x_val}, y_val, work, repeats=200) is None:
            raise SystemExit("the fp32 variant could not be measured")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [f"{r.id} on {b}: {m.error}" for r in reports for b, m in r.results.items() if m.error]
    if failed:
        raise SystemExit("measuring failed: " + "; ".join(failed))
    pkg.variants = [package_variant(r, HERE, "accuracy") for r in reports]
    measured_on = sorted({b for r in reports for b in r.results})
    pkg.description += f"; variants measured on {', '.join(measured_on)} by examples/digits/build.py"
    save_package(pkg, HERE)
    for v in pkg.variants:
        per = ", ".join(f"{b} {m.latency_ms:.4f} ms / {m.memory_bytes >> 20} MiB" for b, m in v.measured.items())
        print(f"{v.id}: {v.size} bytes, accuracy {v.accuracy}, atol {v.atol}; {per}")


if __name__ == "__main__":
    main()
