"""Build the digits example package the README uses: a scikit-learn MLP (64-64-10) as ONNX fp32 and int8.

Run once at generation time (needs the ``dev`` extra: scikit-learn, onnx, onnxruntime); the generated files are
committed, so tests, CI and users only read them:

    python examples/digits/build.py

Writes, beside this script: ``model.fp32.onnx``, ``model.int8.onnx`` (dynamic int8 quantization), ``edgerun.toml``
(both variants with accuracy measured on the validation split, one warm-up sample with its expected outputs) and
``sample_input.npy`` (two digit images, for ``edgerun run examples/digits --input input=examples/digits/sample_input.npy``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerun.testing.models import make_digits_package

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Train, export, quantize and write the package into this directory."""
    pkg = make_digits_package(HERE, name="digits", version=1, hidden=(64,), seed=0)
    np.save(HERE / "sample_input.npy", pkg.samples[0].inputs["input"])
    for v in pkg.variants:
        print(f"{v.id}: {v.size} bytes, accuracy {v.accuracy}")


if __name__ == "__main__":
    main()
