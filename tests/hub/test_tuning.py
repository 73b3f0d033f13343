"""Fleet knowledge: devices' tuning figures reach the registry through the watcher, `edgerun hub tuning` aggregates
them per profile and CPU model, and a package made with them makes a device of that profile pick by them."""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter

import pytest

from edgerun.contract import ModelInfo, Status, TunedCandidate, TuningInfo
from edgerun.hub.registry import Batch, Registry
from edgerun.mqtt import Broker, Connection
from edgerun.testing.mosquitto import find_mosquitto
from rollout_helpers import CLI, all_on, wait_for

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

REGISTRIES = pytest.mark.parametrize("setup", ["sqlite", "postgresql"], indirect=True)
PROFILES = ("generic-x86_64", "raspberry-pi-4")  # two CPU models of the first, one of the second


def options(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(c["options"].items()))


def expected_groups(tuning: dict[str, list[TuningInfo]], version: int) -> dict[tuple[str, str], dict]:
    """Per (profile, CPU model): device count, and per candidate the median latency, drops and picks."""
    groups: dict[tuple[str, str], dict] = {}
    for infos in tuning.values():
        for t in infos:
            if t.version != version:
                continue
            g = groups.setdefault((t.profile, t.cpu_model), {"devices": 0, "lat": {}, "dropped": Counter(),
                                                             "picked": Counter()})
            g["devices"] += 1
            for c in t.candidates:
                key = (c.variant, c.backend, " ".join(f"{k}={v}" for k, v in sorted(c.options.items())))
                if c.kept:
                    g["lat"].setdefault(key, []).append(c.latency_ms)
                else:
                    g["dropped"][key] += 1
            ch = t.chosen
            g["picked"][(ch.variant, ch.backend, " ".join(f"{k}={v}" for k, v in sorted(ch.options.items())))] += 1
    return groups


def tables(text: str) -> dict[str, list[str]]:
    """The lines of each table `hub tuning` printed, by its title line."""
    out: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if " device" in line and " · " in line and "│" not in line:
            title = line.strip()
            out[title] = []
        elif title is not None:
            out[title].append(line)
    return out


@REGISTRIES
def test_devices_tuning_figures_reach_the_registry_and_hub_tuning_shows_them_per_profile_and_cpu(setup):
    with setup.sim(n=40, seed=2, profiles=PROFILES, tune=True) as fleet:
        setup.publish(1)
        wait_for(lambda: all_on(fleet, 1), what="v1 everywhere")
        r = setup.cli("tuning", "digits", "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        want = expected_groups(fleet.tuning(), 1)

        assert set(got) == {"fleet", "model", "version", "versions", "groups", "profiles"}
        assert (got["model"], got["version"], got["versions"]) == ("digits", 1, {"1": 40})
        assert set(got["groups"][0]) == {"profile", "cpu_model", "cpu_class", "devices", "incomplete", "candidates"}
        assert set(got["groups"][0]["candidates"][0]) == {
            "variant", "backend", "options", "latency_ms", "latency_p25_ms", "latency_p75_ms", "latency_err_ms",
            "peak_rss_bytes", "agreement", "agreement_min", "measured", "dropped", "drop_reason", "picked"}
        assert {(g["profile"], g["cpu_model"]) for g in got["groups"]} == set(want)
        assert len({cpu for p, cpu in want if p == "generic-x86_64"}) == 2  # two CPU models of one profile
        for g in got["groups"]:
            w = want[(g["profile"], g["cpu_model"])]
            assert g["devices"] == w["devices"] and g["incomplete"] == 0
            lats = [c["latency_ms"] for c in g["candidates"] if c["latency_ms"] is not None]
            assert lats == sorted(lats)  # fastest first
            for c in g["candidates"]:
                key = (c["variant"], c["backend"], options(c))
                if key in w["lat"]:
                    assert c["latency_ms"] == pytest.approx(statistics.median(w["lat"][key]), rel=1e-3)
                    assert c["measured"] == len(w["lat"][key])
                    assert c["latency_p25_ms"] <= c["latency_ms"] <= c["latency_p75_ms"]
                assert c["picked"] == w["picked"][key] and c["dropped"] == w["dropped"][key]
                if c["dropped"]:
                    assert c["drop_reason"].startswith("wrong on this device")
        dropped = {c["variant"] for g in got["groups"] for c in g["candidates"] if c["dropped"]}
        assert dropped == {"onnx-int8"}  # int8 saturates on some x86 CPUs without VNNI, and only there
        per_profile = {g["profile"]: g["devices"] for g in got["profiles"]}
        assert per_profile == {p: sum(w["devices"] for (q, _), w in want.items() if q == p) for p in PROFILES}

        # the table: one per profile and CPU model, the devices' pick marked
        r = setup.cli("tuning", "digits")
        assert r.returncode == 0, r.stderr
        shown = tables(r.stdout)
        for (profile, cpu), w in want.items():
            title = next((t for t in shown if t.startswith(f"{profile} · {cpu}")), None)
            assert title is not None and f"· {w['devices']} device" in title, list(shown)
            (variant, backend, opts), _ = w["picked"].most_common(1)[0]
            marked = [line for line in shown[title] if "→" in line]
            assert len(marked) == 1 and variant in marked[0] and backend in marked[0] and opts in marked[0], marked

        # a device that tunes again replaces what it measured before
        before = {c.latency_ms for c in setup.registry.tuning(setup.fleet, "digits", 1) if c.device == "sim-0003"
                  for c in c.candidates}
        again = fleet.retune("sim-0003", "digits", slower=3.0)
        assert setup.cli("tuning", "digits", "--json").returncode == 0  # syncs the registry from the broker
        rows = [t for t in setup.registry.tuning(setup.fleet, "digits", 1) if t.device == "sim-0003"]
        assert len(rows) == 1 and rows[0].ts == pytest.approx(again.ts)
        assert {c.latency_ms for c in rows[0].candidates} == {c.latency_ms for c in again.candidates}
        assert min(c.latency_ms for c in rows[0].candidates) > 2 * min(before)

        # an older device (contract 1.3) says nothing of tuning: it is a device like any other, and counts for none
        old = Status("old-1", setup.fleet, profile="generic-x86_64", models=(ModelInfo("digits", 1, "onnx-fp32",
                                                                                       "onnxruntime"),))
        data = {k: v for k, v in old.to_dict().items() if k != "tuning"}
        data["contract"] = "1.3"
        with Connection(Broker(port=setup.broker.port), persistent=False) as c:
            c.wait([c.publish(setup.topics.status("old-1"), json.dumps(data).encode(), retain=True)])
        r = setup.cli("tuning", "digits", "--json")
        assert r.returncode == 0, r.stderr
        assert sum(g["devices"] for g in json.loads(r.stdout)["profiles"]) == 40
        assert setup.registry.device(setup.fleet, "old-1").to_dict()["contract"] == "1.3"

        # a new version: the latest one devices tuned is shown, the older stays on request
        setup.publish(2)
        wait_for(lambda: all_on(fleet, 2), what="v2 everywhere")
        r = setup.cli("tuning", "digits")
        assert r.returncode == 0 and "digits v2" in r.stdout and "other versions: v1 (40 devices)" in r.stdout, r.stdout
        v1 = json.loads(setup.cli("tuning", "digits", "--version", "1", "--json", "--offline").stdout)
        assert v1["version"] == 1 and sum(g["devices"] for g in v1["profiles"]) == 40
        only = json.loads(setup.cli("tuning", "digits", "--profile", "raspberry-pi-4", "--json", "--offline").stdout)
        assert [g["profile"] for g in only["groups"]] == ["raspberry-pi-4"]


def test_nothing_to_show_is_a_clear_message_and_exit_66(setup):
    b = Batch()
    b.statuses["d1"] = (_status("d1", "generic-x86_64", "cpu-a", 1, {"onnxruntime": 0.1}), time.time())
    setup.registry.apply(setup.fleet, b)
    r = setup.cli("tuning", "nothing", "--offline")
    assert r.returncode == 66 and "has reported tuning figures for model 'nothing'" in r.stderr, r.stderr
    r = setup.cli("tuning", "digits", "--version", "9", "--offline")
    assert r.returncode == 66 and "for digits v9; figures exist for v1 (1 device)" in r.stderr, r.stderr
    r = setup.cli("tuning", "digits", "--profile", "jetson-orin-nano", "--offline")
    assert r.returncode == 66 and "profiles with figures: generic-x86_64" in r.stderr, r.stderr
    b = Batch()  # a later version that only another profile's devices tuned so far
    b.statuses["d2"] = (_status("d2", "raspberry-pi-4", "Cortex-A72", 2, {"onnxruntime": 0.4}), time.time())
    setup.registry.apply(setup.fleet, b)
    assert json.loads(setup.cli("tuning", "digits", "--offline", "--json").stdout)["version"] == 2
    mine = json.loads(setup.cli("tuning", "digits", "--profile", "generic-x86_64", "--offline", "--json").stdout)
    assert mine["version"] == 1 and [g["profile"] for g in mine["groups"]] == ["generic-x86_64"]
    assert "Traceback" not in r.stderr
    r = setup.cli("tuning", "--help")
    assert r.returncode == 0 and "per profile and CPU model" in r.stdout


def test_a_tuning_cut_short_and_a_cpu_model_not_reported_are_said(setup):
    b = Batch()
    b.statuses["d1"] = (_status("d1", "generic-x86_64", "", 1, {"onnxruntime": 0.1}, complete=False), time.time())
    b.statuses["d2"] = (_status("d2", "generic-x86_64", "", 1, {"onnxruntime": 0.3}), time.time())
    setup.registry.apply(setup.fleet, b)
    r = setup.cli("tuning", "digits", "--offline")
    assert r.returncode == 0, r.stderr
    assert "generic-x86_64 · CPU model not reported (x86) · 2 devices, 1 ran out of tuning time" in r.stdout, r.stdout
    got = json.loads(setup.cli("tuning", "digits", "--offline", "--json").stdout)
    (c,) = got["groups"][0]["candidates"]
    assert got["groups"][0]["incomplete"] == 1 and c["latency_ms"] == pytest.approx(0.2) and c["measured"] == 2


def test_the_dashboard_row_of_a_device_shows_what_it_picked_when_it_tuned():
    from edgerun.hub.dashboard.rows import device_row

    status = _status("d1", "raspberry-pi-4", "Cortex-A72", 1, {"onnxruntime": 0.4, "litert": 0.25})
    row = device_row("d1", None, status, None, None, 1)
    assert row["models"][0]["tuned"] == {"variant": "onnx-fp32", "backend": "litert", "options": "",
                                         "latency_ms": 0.25, "default_latency_ms": 0.4, "cpu_model": "Cortex-A72",
                                         "complete": True}
    older = Status("d2", "f", profile="raspberry-pi-4", models=(ModelInfo("digits", 1, "onnx-fp32", "onnxruntime"),))
    assert device_row("d2", None, older, None, None, 1)["models"][0]["tuned"] is None


def test_a_registry_made_before_tuning_figures_gets_their_table_on_open(tmp_path):
    path = tmp_path / "hub.db"
    Registry(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as c:  # the database as an edgerun before this change left it
        c.execute("DROP TABLE device_tuning")
    registry = Registry(f"sqlite:///{path}")
    b = Batch()
    b.statuses["d1"] = (_status("d1", "raspberry-pi-4", "Cortex-A72", 1, {"onnxruntime": 0.4}), time.time())
    registry.apply("f", b)
    assert [(t.device, t.cpu_model) for t in registry.tuning("f", "digits")] == [("d1", "Cortex-A72")]
    assert registry.device("f", "d1").profile == "raspberry-pi-4"


def _status(device: str, profile: str, cpu: str, version: int, latencies: dict[str, float],
            ts: float = 1000.0, complete: bool = True) -> Status:
    """A 1.4 status whose tuning of digits measured onnx-fp32 on each backend at these latencies (ms)."""
    cands = tuple(TunedCandidate("onnx-fp32", b, {}, ms, ms * 0.05, 8 << 20, None) for b, ms in latencies.items())
    chosen = min(cands, key=lambda c: c.latency_ms)
    t = TuningInfo("digits", version, chosen, cands[0], cands, cpu, "x86", profile, 2.0, complete, ts)
    return Status(device, "f", profile=profile, models=(ModelInfo("digits", version, "onnx-fp32", chosen.backend),),
                  tuning=(t,))


def test_a_package_made_with_fleet_figures_makes_a_device_of_that_profile_pick_by_them(tmp_path, keys):
    import numpy as np

    from edgerun.choice import best_of, candidates, host_cpu_model
    from edgerun.cli.hub_package import _fleet_figures
    from edgerun.package import ModelPackage
    from edgerun.profiles import load_profiles
    from edgerun.runtime import Runtime
    from edgerun.testing.models import digits_data, mlp_onnx, sklearn_weights, train_digits_mlp

    here = host_cpu_model()
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    registry = Registry(db)
    b = Batch()
    for i in range(3):  # devices with this host's CPU: OpenVINO is ten times faster there
        b.statuses[f"here-{i}"] = (_status(f"here-{i}", "generic-x86_64", here, 1,
                                           {"onnxruntime": 0.1 + i * 0.001, "openvino": 0.01 + i * 0.001}), time.time())
    for i in range(5):  # more devices of the same profile, another CPU: onnxruntime is
        b.statuses[f"other-{i}"] = (_status(f"other-{i}", "generic-x86_64", "Other CPU", 1,
                                            {"onnxruntime": 0.02 + i * 0.001, "openvino": 0.2 + i * 0.001}),
                                    time.time())
    registry.apply("f", b)
    env = {"EDGERUN_HUB_DB": db, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-c", CLI, "hub", "tuning", "digits", "--fleet", "f", "--offline", "--json"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    (tmp_path / "figures.json").write_text(r.stdout)
    assert _fleet_figures("registry", "digits", "f", db).to_dict() == json.loads(r.stdout)

    x_train, _, x_val, y_val = digits_data()
    model = mlp_onnx(sklearn_weights(train_digits_mlp()), tmp_path / "digits.onnx")
    np.savez(tmp_path / "val.npz", input=x_val, labels=y_val)
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-c", CLI, "hub", "package", str(model), "--name", "digits", "--version", "2",
                        "--validation", str(tmp_path / "val.npz"), "--out", str(out), "--precisions", "fp32",
                        "--formats", "onnx", "--backends", "onnxruntime,openvino", "--repeats", "10",
                        "--fleet-figures", str(tmp_path / "figures.json")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fleet figures of digits v1 recorded for onnx-fp32" in " ".join(r.stdout.split())
    pkg = ModelPackage.load(out)
    fleet = pkg.variant("onnx-fp32").info["fleet"]["generic-x86_64"]
    assert fleet["openvino"]["cpu_models"][here] == {"latency_ms": 0.011, "latency_err_ms": 0.00055, "devices": 3}
    assert fleet["onnxruntime"]["latency_ms"] == pytest.approx(0.0235) and fleet["onnxruntime"]["devices"] == 8

    profiles = load_profiles()
    with Runtime(profile=profiles["generic-x86_64"]) as rt:
        c = rt.explain(pkg)
        assert (c.chosen.variant.id, c.chosen.backend) == ("onnx-fp32", "openvino")  # against the profile's order
        assert c.chosen.latency_source == f"fleet: 3 devices of profile generic-x86_64, CPU {here}"
        assert c.chosen.latency_ms == pytest.approx(0.011)
        # a device of the profile with a CPU nobody reported goes by the profile's figures
        elsewhere = candidates(pkg, rt.profile, rt.backends, c.budget, cpu_model="A CPU nobody reported")
        pick = best_of([x for x in elsewhere if x.kept], rt.profile)
        assert pick.backend == "onnxruntime" and pick.latency_source == "fleet: 8 devices of profile generic-x86_64"
    with Runtime(profile=profiles["x86_64-avx512-vnni"]) as rt:  # no device of this profile measured it
        c = rt.explain(pkg)
        assert {x.latency_source for x in c.candidates if x.kept} == {"hub"}
    r = subprocess.run([sys.executable, "-c", CLI, "explain", str(out), "--profile", "generic-x86_64"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "fleet: 3 devices, this CPU" in out, r.stdout + r.stderr
    assert f"Latencies are what devices of profile generic-x86_64 with this CPU ({here}) measured" in out

    r = subprocess.run([sys.executable, "-c", CLI, "hub", "package", str(model), "--name", "other", "--version", "1",
                        "--validation", str(tmp_path / "val.npz"), "--out", str(tmp_path / "other"),
                        "--fleet-figures", str(tmp_path / "figures.json")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 65 and "the fleet figures are of model 'digits', not 'other'" in r.stderr, r.stderr
    assert not (tmp_path / "other").exists()
