"""The drop rules on given measurements: the int8 method and every drop follow the numbers, with the reason shown."""

from __future__ import annotations

from pathlib import Path

from edgerun.hub.packager import BackendResult, PackageRequest, VariantReport, _decide

ORT, OV = "onnxruntime", "openvino"


def _v(vid: str, precision: str, method: str, accuracy: float, *, mib: int = 10, err: float | None = 0.01,
       **latency_ms: float) -> VariantReport:
    """A measured variant; ``err`` is each latency's relative error (None: not timed side by side)."""
    fmt = vid.split("-")[0]
    v = VariantReport(vid, fmt, precision, method)
    v.results = {b: BackendResult(latency_ms=ms, memory_bytes=mib << 20, accuracy=accuracy,
                                  latency_err_ms=None if err is None else err * ms)
                 for b, ms in latency_ms.items()}
    return v


def _decided(*variants: VariantReport, bound: float = 1.0) -> dict[str, VariantReport]:
    req = PackageRequest(model=Path("m.onnx"), name="m", version=1, validation=Path("v.npz"), out=Path("o"),
                         precisions=("fp32", "fp16", "int8", "int4"), formats=("onnx", "openvino"),
                         max_accuracy_drop=bound)
    _decide(list(variants), req, "accuracy")
    return {v.id: v for v in variants}


def test_the_int8_method_kept_is_the_one_measured_faster_whatever_the_model():
    for qdq_ms, dyn_ms in ((0.5, 8.0), (0.8, 0.3)):  # a CNN's numbers, then an MLP's
        by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0),
                      _v("onnx-int8-qdq", "int8", "static", 0.965, onnxruntime=qdq_ms, openvino=0.1),
                      _v("onnx-int8-dynamic", "int8", "dynamic", 0.965, onnxruntime=dyn_ms, openvino=9.0))
        winner, loser = ("onnx-int8-qdq", "onnx-int8-dynamic") if qdq_ms < dyn_ms else \
            ("onnx-int8-dynamic", "onnx-int8-qdq")
        assert by[winner].status == "kept", by[winner].reason
        assert by[loser].status == "dropped"
        assert by[loser].reason.startswith(f"{winner} is faster on onnxruntime")  # the format's own backend decides


def test_a_variant_past_the_accuracy_bound_is_dropped_with_the_numbers():
    fp32 = _v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0)
    int8 = _v("onnx-int8-qdq", "int8", "static", 0.95, onnxruntime=0.5)
    by = _decided(fp32, int8)
    assert by["onnx-int8-qdq"].status == "dropped"
    assert by["onnx-int8-qdq"].reason == "accuracy 95.00% is 2.00 points below fp32's 97.00% (bound 1)"
    int8 = _v("onnx-int8-qdq", "int8", "static", 0.95, onnxruntime=0.5)
    assert _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0), int8, bound=3)[int8.id].status == "kept"


def test_a_variant_slower_than_a_more_accurate_one_on_every_backend_is_dropped():
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0, openvino=2.0),
                  _v("onnx-fp16", "fp16", "fp16", 0.97, onnxruntime=1.2, openvino=1.85),  # within 15% on openvino
                  _v("openvino-fp32", "fp32", "convert", 0.97, openvino=1.5))
    assert by["onnx-fp16"].status == "dropped"
    assert by["onnx-fp16"].reason.startswith("neither faster (beyond the measured error) nor lighter than onnx-fp32, "
                                             "which is as accurate or more")
    assert by["openvino-fp32"].status == "kept"  # faster than onnx-fp32 where both ran
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0, openvino=2.0),
                  _v("onnx-fp16", "fp16", "fp16", 0.97, onnxruntime=1.2, openvino=1.5))
    assert by["onnx-fp16"].status == "kept"  # faster on one backend


def test_a_quantized_variant_scoring_above_fp32_must_still_be_faster_than_it():
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.9778, onnxruntime=0.008, openvino=0.04),
                  _v("openvino-int4", "int4", "weights", 0.98, openvino=0.041))
    v = by["openvino-int4"]
    assert v.status == "dropped" and "98.00% vs 97.78% is not counted for a lower precision" in v.reason
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.9778, onnxruntime=0.008, openvino=0.04),
                  _v("openvino-int4", "int4", "weights", 0.98, openvino=0.02))
    assert by["openvino-int4"].status == "kept"


def test_a_variant_that_failed_everywhere_is_dropped_with_the_errors():
    bad = VariantReport("onnx-fp16", "onnx", "fp16", "fp16")
    bad.results = {ORT: BackendResult(error="ModelLoadError: boom"), OV: BackendResult(error="PackageError: bang")}
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0), bad)
    assert by["onnx-fp16"].status == "dropped"
    reason = by["onnx-fp16"].reason
    assert "onnxruntime: ModelLoadError: boom" in reason and "openvino: PackageError: bang" in reason


def test_a_variant_is_only_dropped_in_favour_of_one_that_stays():
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.9778, onnxruntime=0.008, openvino=0.040),
                  _v("openvino-fp32", "fp32", "convert", 0.9778, openvino=0.030),  # faster than onnx-fp32
                  _v("openvino-int4", "int4", "weights", 0.98, openvino=0.039))  # not: dropped, so it cannot
    assert by["openvino-int4"].status == "dropped"                                # drop openvino-fp32
    assert by["openvino-fp32"].status == "kept", by["openvino-fp32"].reason


def test_latencies_within_their_errors_or_fifteen_percent_are_a_tie_decided_by_memory():
    # int8 methods 8% apart: a tie; the one needing clearly less memory is kept
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.965, mib=6, err=0.01, onnxruntime=0.50),
                  _v("onnx-int8-dynamic", "int8", "dynamic", 0.965, mib=9, err=0.01, onnxruntime=0.46))
    assert by["onnx-int8-qdq"].status == "kept" and by["onnx-int8-dynamic"].status == "dropped"
    assert "as fast (within the measured error or 15%) and needs clearly less memory" in by["onnx-int8-dynamic"].reason
    # 20% apart, but each median is known only within 15%: the intervals overlap, still a tie
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.965, mib=6, err=0.15, onnxruntime=0.50),
                  _v("onnx-int8-dynamic", "int8", "dynamic", 0.965, mib=9, err=0.15, onnxruntime=0.40))
    assert by["onnx-int8-qdq"].status == "kept"
    # known within 1%: the faster one wins
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.965, mib=6, err=0.01, onnxruntime=0.50),
                  _v("onnx-int8-dynamic", "int8", "dynamic", 0.965, mib=9, err=0.01, onnxruntime=0.40))
    assert by["onnx-int8-dynamic"].status == "kept"


def test_a_variant_no_faster_but_clearly_lighter_stays():
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, mib=40, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.968, mib=12, onnxruntime=0.98))
    assert by["onnx-int8-qdq"].status == "kept"  # as fast, a third of the memory: a small device wants it
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, mib=40, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.968, mib=36, onnxruntime=0.98))
    assert by["onnx-int8-qdq"].status == "dropped"  # 10% less memory is not enough to keep it


def test_a_variant_kept_for_one_backend_is_marked_not_for_the_others():
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0, openvino=2.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.97, onnxruntime=0.97, openvino=1.2))
    int8 = by["onnx-int8-qdq"]
    assert int8.status == "kept"  # 40% faster on openvino
    assert set(int8.info["not_for"]) == {"onnxruntime"}  # no gain there: a device does not pick it on onnxruntime
    assert "neither faster nor lighter than onnx-fp32 on onnxruntime" in int8.info["not_for"]["onnxruntime"]


def test_a_latency_without_an_error_never_counts_as_faster():
    # side-by-side timing failed: each variant has only its own first estimate, which cannot be told from noise
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, err=None, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.97, err=None, onnxruntime=0.5),
                  _v("onnx-int8-dynamic", "int8", "dynamic", 0.97, err=None, onnxruntime=0.2))
    assert by["onnx-int8-dynamic"].status == "dropped"  # not "faster": the first in the plan stays
    assert "as fast (within the measured error or 15%) and as light, and comes first" in by["onnx-int8-dynamic"].reason
    assert by["onnx-int8-qdq"].status == "dropped"  # not faster than fp32 either: nothing to gain
    assert by["onnx-int8-qdq"].reason.startswith("neither faster (beyond the measured error) nor lighter than onnx-fp32")
    # the same numbers with errors: the fastest method is kept, and kept beside fp32
    by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, onnxruntime=1.0),
                  _v("onnx-int8-qdq", "int8", "static", 0.97, onnxruntime=0.5),
                  _v("onnx-int8-dynamic", "int8", "dynamic", 0.97, onnxruntime=0.2))
    assert by["onnx-int8-dynamic"].status == "kept" and by["onnx-int8-qdq"].status == "dropped"


def test_a_gap_near_the_margin_is_decided_the_same_way_from_run_to_run():
    """Three runs whose int8 gains straddle nothing but noise keep the same variants for the same backends."""
    outcomes = set()
    for fp32_ms, int8_ort, int8_ov in ((1.0, 0.58, 0.73), (1.03, 0.60, 0.74), (0.98, 0.57, 0.71)):
        by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, mib=12, onnxruntime=fp32_ms, openvino=2 * fp32_ms),
                      _v("onnx-int8-qdq", "int8", "static", 0.97, mib=11, onnxruntime=int8_ort,
                         openvino=2 * int8_ov))
        int8 = by["onnx-int8-qdq"]
        outcomes.add((int8.status, tuple(sorted(int8.info.get("not_for", {})))))
    assert outcomes == {("kept", ())}
    # a gain within the margin is a tie on that backend in every run: not_for it, every time
    outcomes = set()
    for int8_ov in (0.90, 0.93, 0.88):
        by = _decided(_v("onnx-fp32", "fp32", "original", 0.97, mib=12, onnxruntime=1.0, openvino=2.0),
                      _v("onnx-int8-qdq", "int8", "static", 0.97, mib=11, onnxruntime=0.58, openvino=2 * int8_ov))
        outcomes.add(tuple(sorted(by["onnx-int8-qdq"].info.get("not_for", {}))))
    assert outcomes == {("openvino",)}
