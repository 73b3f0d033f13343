"""Variant choice: the most accurate variant that fits the budget, and ``edgerun explain``."""

from __future__ import annotations

import pytest

from edgerun.profiles import Profile
from edgerun.runtime import Runtime


def test_large_budget_takes_the_most_accurate_variant(runtime: Runtime, measured_digits) -> None:
    c = runtime.explain(measured_digits, memory_budget="4GiB")
    assert c.chosen is not None
    assert (c.chosen.variant.id, c.chosen.backend) == ("onnx-fp32", "onnxruntime")
    assert all(cand.kept for cand in c.candidates if cand.backend != "-")


def test_budget_between_the_two_needs_takes_int8(runtime: Runtime, measured_digits) -> None:
    needs = {v.id: v.memory_bytes for v in measured_digits.variants}
    assert needs == {"onnx-fp32": 30 << 20, "onnx-int8": 12 << 20}
    budget = (needs["onnx-fp32"] + needs["onnx-int8"]) // 2
    c = runtime.explain(measured_digits, memory_budget=budget)
    assert c.chosen is not None and c.chosen.variant.id == "onnx-int8"
    fp32 = [cand for cand in c.candidates if cand.variant.id == "onnx-fp32"]
    assert fp32 and all(not cand.kept and "needs 30.0 MiB > budget 21.0 MiB" in cand.reason for cand in fp32)
    assert runtime.prepare(measured_digits, memory_budget=budget).variant.id == "onnx-int8"


def test_the_profile_budget_applies_when_none_is_given(measured_digits) -> None:
    small = Profile(name="tiny-board", memory_budget="20MiB", prefer=("onnxruntime",))
    with Runtime(profile=small) as rt:
        assert rt.explain(measured_digits).chosen.variant.id == "onnx-int8"
        assert rt.load(measured_digits.root).variant.id == "onnx-int8"


def test_profile_backend_preference_breaks_ties(measured_digits) -> None:
    for first in ("openvino", "onnxruntime"):
        with Runtime(profile=Profile(name=f"{first}-first", prefer=(first,))) as rt:
            c = rt.explain(measured_digits, memory_budget="1GiB")
            assert (c.chosen.variant.id, c.chosen.backend) == ("onnx-fp32", first)


def test_without_measurements_the_need_is_estimated_from_file_size(runtime: Runtime, digits_package) -> None:
    c = runtime.explain(digits_package, memory_budget="1GiB")
    assert c.chosen is not None
    assert all(not cand.memory_measured and cand.memory_bytes > cand.variant.size for cand in c.candidates
               if cand.backend != "-")


def _row(out: str, variant: str, backend: str) -> str:
    return next(line for line in out.splitlines() if variant in line and backend in line)


def test_explain_lists_every_variant_with_verdict_and_reason(cli, measured_digits) -> None:
    rc, out, _ = cli("explain", measured_digits.root, "--memory-budget", "20MiB", "--profile", "generic-x86_64")
    assert rc == 0
    assert "digits v1 on profile generic-x86_64, memory budget 20.0 MiB" in out
    int8 = _row(out, "onnx-int8", "onnxruntime")
    assert "chosen" in int8 and "12.0 MiB" in int8 and "0.9750" in int8
    fp32 = _row(out, "onnx-fp32", "onnxruntime")
    assert "dropped" in fp32 and "needs 30.0 MiB > budget 20.0 MiB" in fp32
    assert "kept" in _row(out, "onnx-int8", "openvino")


def test_explain_exits_69_when_nothing_fits(cli, measured_digits) -> None:
    rc, out, err = cli("explain", measured_digits.root, "--memory-budget", "8MiB", "--profile", "generic-x86_64")
    assert rc == 69
    assert "dropped" in _row(out, "onnx-int8", "onnxruntime")
    assert "no variant of 'digits' fits the memory budget of 8.0 MiB" in err and "needs 12.0 MiB" in err


@pytest.mark.parametrize("budget", ["lots", "0%"])
def test_explain_with_a_malformed_budget(cli, measured_digits, budget: str) -> None:
    rc, _, err = cli("explain", measured_digits.root, "--memory-budget", budget, "--profile", "generic-x86_64")
    assert rc != 0
    assert "budget" in err.lower() and budget in err


def test_explain_reads_in_an_80_column_terminal(cli, measured_digits, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgerun.cli.app import console

    monkeypatch.setattr(console, "width", 80)  # the console took its width from COLUMNS when first imported
    rc, out, _ = cli("explain", measured_digits.root, "--memory-budget", "20MiB", "--profile", "generic-x86_64")
    assert rc == 0
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out, out
    assert "→ chosen" in _row(out, "onnx-int8", "onnxruntime")
    assert "dropped: needs" in _row(out, "onnx-fp32", "openvino")


@pytest.mark.parametrize(("int8_accuracy", "winner"), [(0.980, "onnx-fp32"), (0.990, "onnx-int8")])
def test_an_accuracy_edge_within_noise_does_not_buy_a_less_precise_variant(
        runtime: Runtime, measured_digits, int8_accuracy: float, winner: str) -> None:
    """int8 0.2 points above fp32 (one validation example) loses to fp32; 1.2 points above, it wins."""
    import dataclasses

    pkg = dataclasses.replace(measured_digits, variants=[
        dataclasses.replace(v, accuracy=int8_accuracy) if v.precision == "int8" else v
        for v in measured_digits.variants])
    c = runtime.explain(pkg, memory_budget="1GiB")
    assert c.chosen is not None and c.chosen.variant.id == winner


def test_a_latency_gap_within_the_noise_is_decided_by_memory(runtime: Runtime, measured_digits) -> None:
    """One variant on two backends 7% apart: not a reason to take the one needing four times the memory."""
    from dataclasses import replace

    from edgerun.package import Measurement

    fp32 = measured_digits.variant("onnx-fp32")
    timed = replace(fp32, memory_bytes=None, measured={
        "openvino": Measurement(latency_ms=0.093, memory_bytes=50 << 20, accuracy=0.978, latency_err_ms=0.004),
        "onnxruntime": Measurement(latency_ms=0.100, memory_bytes=12 << 20, accuracy=0.978, latency_err_ms=0.004)})
    pkg = replace(measured_digits, variants=[timed])
    for first in ("openvino", "onnxruntime"):
        with Runtime(profile=Profile(name=f"{first}-first", prefer=(first,))) as rt:
            assert rt.explain(pkg, memory_budget="1GiB").chosen.backend == "onnxruntime"
    faster = replace(timed, measured={**timed.measured, "openvino": Measurement(0.05, 50 << 20, 0.978, 0.002)})
    assert runtime.explain(replace(pkg, variants=[faster]), memory_budget="1GiB").chosen.backend == "openvino"


def test_close_memory_needs_and_unmeasured_errors_fall_to_the_profile_order(measured_digits) -> None:
    """Memory needs 5% apart, or latencies without an error, flip from one packaging to the next: the device
    takes the profile's first backend, whichever figure happens to be smaller."""
    from dataclasses import replace

    from edgerun.package import Measurement

    fp32 = measured_digits.variant("onnx-fp32")
    for ov_mem, ort_mem in ((12 << 20, int(12.6 * (1 << 20))), (int(12.6 * (1 << 20)), 12 << 20)):
        timed = replace(fp32, memory_bytes=None, measured={
            "openvino": Measurement(0.100, ov_mem, 0.978, 0.004), "onnxruntime": Measurement(0.101, ort_mem, 0.978, 0.004)})
        for first in ("openvino", "onnxruntime"):
            with Runtime(profile=Profile(name=f"{first}-first", prefer=(first,))) as rt:
                pkg = replace(measured_digits, variants=[timed])
                assert rt.explain(pkg, memory_budget="1GiB").chosen.backend == first
    # no errors recorded (an older package, or a hub whose side-by-side timing failed): 2x is not "faster" either
    untimed = replace(fp32, memory_bytes=None, measured={
        "openvino": Measurement(0.05, 12 << 20, 0.978), "onnxruntime": Measurement(0.10, 12 << 20, 0.978)})
    with Runtime(profile=Profile(name="ort-first", prefer=("onnxruntime",))) as rt:
        assert rt.explain(replace(measured_digits, variants=[untimed]), memory_budget="1GiB").chosen.backend == \
            "onnxruntime"


def test_a_variant_marked_not_for_a_backend_is_taken_on_another(package_copy) -> None:
    """The hub kept int8 for openvino only: a device runs it there, never on onnxruntime."""
    def mark(data) -> None:
        for v in data["variants"]:
            v["memory_bytes"] = 30 << 20 if v["precision"] == "fp32" else 12 << 20
            if v["precision"] == "int8":
                v.setdefault("info", {})["not_for"] = {"onnxruntime": "neither faster nor lighter than onnx-fp32"}

    root = package_copy(mark)
    with Runtime(profile=Profile(name="ort-first", prefer=("onnxruntime", "openvino"))) as rt:
        c = rt.explain(root, memory_budget="20MiB")
        assert (c.chosen.variant.id, c.chosen.backend) == ("onnx-int8", "openvino")
        ort = next(cand for cand in c.candidates if (cand.variant.id, cand.backend) == ("onnx-int8", "onnxruntime"))
        assert not ort.kept and "not for onnxruntime: neither faster nor lighter than onnx-fp32" in ort.reason
