"""The variant choice ranks by a package's fleet figures (``info.fleet``) for this device's profile and CPU model,
and a malformed ``info.fleet`` changes nothing."""

from __future__ import annotations

import dataclasses

import pytest

from edgerun.choice import best_of, candidates
from edgerun.package import Measurement
from edgerun.runtime import Runtime


def _with(pkg, measured: dict[str, float], fleet) -> object:
    """``pkg`` with only onnx-fp32, the hub's latencies ``measured`` (ms, error 1%) and ``info.fleet``."""
    v = pkg.variant("onnx-fp32")
    v = dataclasses.replace(v, measured={b: Measurement(ms, None, None, ms / 100) for b, ms in measured.items()},
                            info={**v.info, "fleet": fleet})
    return dataclasses.replace(pkg, variants=[v])


def _pick(rt: Runtime, pkg, cpu_model: str):
    cands = candidates(pkg, rt.profile, rt.backends, 1 << 34, cpu_model=cpu_model)
    return best_of([c for c in cands if c.kept], rt.profile), cands


@pytest.fixture
def rt(cpu_profile):
    with Runtime(profile=cpu_profile) as r:
        if "openvino" not in r.backends or not r.backends["openvino"].check().available:
            pytest.skip("OpenVINO is not available here")
        yield r


def test_the_cpu_models_figure_wins_over_the_profiles_and_both_over_the_hubs(rt, digits_package):
    fig = lambda ms, n: {"latency_ms": ms, "latency_err_ms": ms / 50, "devices": n}  # noqa: E731
    fleet = {"generic-x86_64": {"onnxruntime": {**fig(0.05, 9), "cpu_models": {"cpu-b": fig(0.5, 3)}},
                                "openvino": {**fig(0.5, 9), "cpu_models": {"cpu-b": fig(0.05, 3)}}},
             "raspberry-pi-4": {"openvino": fig(0.001, 40)}}
    pkg = _with(digits_package, {"onnxruntime": 1.0, "openvino": 0.1}, fleet)  # the hub: OpenVINO 10x faster
    pick, _ = _pick(rt, pkg, "cpu-a")  # a CPU nobody reported: the profile's figures
    assert pick.backend == "onnxruntime" and pick.latency_source == "fleet: 9 devices of profile generic-x86_64"
    pick, _ = _pick(rt, pkg, "cpu-b")
    assert pick.backend == "openvino" and pick.latency_source == "fleet: 3 devices of profile generic-x86_64, CPU cpu-b"
    assert pick.latency_ms == 0.05
    hub_only = _with(digits_package, {"onnxruntime": 1.0, "openvino": 0.1}, {"raspberry-pi-4": fleet["raspberry-pi-4"]})
    pick, cands = _pick(rt, hub_only, "cpu-a")  # figures of another profile only: the hub's, as before
    assert pick.backend == "openvino" and {c.latency_source for c in cands if c.kept} == {"hub"}


def test_a_candidate_without_a_fleet_figure_ties_on_speed(rt, digits_package):
    fleet = {"generic-x86_64": {"openvino": {"latency_ms": 0.5, "latency_err_ms": 0.01, "devices": 4}}}
    pkg = _with(digits_package, {"onnxruntime": 1.0, "openvino": 0.1}, fleet)
    pick, cands = _pick(rt, pkg, "cpu-a")
    sources = {c.backend: c.latency_source for c in cands if c.kept}
    assert sources == {"onnxruntime": "no fleet figure for it: a tie on speed",
                       "openvino": "fleet: 4 devices of profile generic-x86_64"}
    assert pick.backend == "onnxruntime"  # no one is clearly faster: memory, then the profile's order, decide


@pytest.mark.parametrize("fleet", ["fast", ["generic-x86_64"], {"generic-x86_64": "fast"},
                                   {"generic-x86_64": {"onnxruntime": {"latency_ms": "0.1", "devices": 3}}},
                                   {"generic-x86_64": {"onnxruntime": {"latency_ms": -1.0}}},
                                   {"generic-x86_64": {"onnxruntime": {"latency_ms": True}, "cpu_models": 7}}])
def test_a_malformed_info_fleet_changes_nothing(rt, digits_package, fleet):
    pkg = _with(digits_package, {"onnxruntime": 1.0, "openvino": 0.1}, fleet)
    pick, cands = _pick(rt, pkg, "cpu-a")
    assert pick.backend == "openvino" and all(c.fleet is None and not c.by_fleet for c in cands)
