"""The example package (examples/digits) carries the packager's measurements, and each variant passes its warm-up."""

from __future__ import annotations

from pathlib import Path

from edgerun.package import ModelPackage
from edgerun.runtime import Runtime

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_example_variants_are_measured_and_load_on_every_backend_they_were_measured_on():
    pkg = ModelPackage.load(EXAMPLE)
    rt = Runtime(threads=1)
    for v in pkg.variants:
        assert v.accuracy is not None and v.accuracy > 0.95, v.id
        assert "onnxruntime" in v.measured and v.memory_bytes == max(m.memory_bytes for m in v.measured.values())
        for backend, m in v.measured.items():
            assert m.latency_ms > 0 and m.memory_bytes > 0 and m.accuracy >= v.accuracy, (v.id, backend)
            if backend in rt.backends and rt.backends[backend].availability().available:
                rt.prepare(EXAMPLE, variant=v.id, backend=backend).retire()  # the recorded atol holds here
    choice = rt.explain(EXAMPLE, memory_budget="1GiB")
    assert choice.candidates and all(c.memory_measured for c in choice.candidates)  # not "(estimated)"
