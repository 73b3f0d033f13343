"""On-device tuning: what it measures, what it picks, what it serves, and what it keeps in its cache."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgerun.autotune import AutoTuner
from edgerun.config import TuningConfig
from edgerun.runtime import Runtime
from edgerun.tune import TuneSettings, Tuner, same_choice
from edgerun.tunecache import TuningCache

BUDGET = TuneSettings(budget=6, candidate_timeout=20)


def test_tuning_measures_every_pair_and_its_options_and_picks_a_kept_one(checked_digits):
    rt = Runtime()
    tuner = Tuner(rt, BUDGET)
    info = tuner.tune(checked_digits)
    pairs = {(c.variant, c.backend) for c in info.candidates}
    assert {("onnx-fp32", "onnxruntime"), ("onnx-int8", "onnxruntime")} <= pairs
    assert any(c.options for c in info.candidates), "options are tried on the fastest pairs"
    chosen = info.chosen
    assert chosen is not None and chosen.kept and chosen.latency_ms > 0 and chosen.peak_rss_bytes > 0
    assert chosen.agreement is not None and chosen.agreement >= 0.95  # checked on the validation sample vs fp32
    assert info.default is not None and (info.default.variant, info.default.backend) == \
        (rt.explain(checked_digits).chosen.variant.id, rt.explain(checked_digits).chosen.backend)
    assert info.cpu_model == rt.facts.cpu_model and info.profile == rt.profile.name
    assert not [n for n in tuner.notes if "validation" in n]


def test_a_package_without_validation_sample_is_tuned_on_latency_and_says_so(digits_package):
    tuner = Tuner(Runtime(), TuneSettings(budget=4))
    info = tuner.tune(digits_package)
    assert info.chosen is not None
    assert all(c.agreement is None for c in info.candidates)
    assert any("no validation sample" in n for n in tuner.notes)


def test_a_candidate_that_crashes_hangs_overshoots_memory_or_is_wrong_is_dropped_while_serving_goes_on(
        checked_digits, tmp_path):
    import tunefakes

    from edgerun.plugins import make_plugin_manager

    pm, _ = make_plugin_manager()
    pm.register(tunefakes, name="tunefakes")
    rt = Runtime(plugin_manager=pm, memory_budget="200MiB")
    model = rt.load(checked_digits, backend="onnxruntime")
    x = checked_digits.validation.inputs["input"][:1]
    before = rt.infer("digits", {"input": x})["probabilities"]
    failures: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                rt.infer("digits", {"input": x})
            except BaseException as exc:  # noqa: BLE001 - any failure is what the test looks for
                failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    try:
        info = Tuner(rt, TuneSettings(budget=40, candidate_timeout=8)).tune(checked_digits)
    finally:
        done.set()
        server.join()
    by_backend = {}
    for c in info.candidates:
        by_backend.setdefault(c.backend, []).append(c)
    assert all(not c.kept and c.reason.startswith("crashed (signal SIGSEGV)") for c in by_backend["crashing"])
    assert all(not c.kept and c.reason.startswith("timed out") for c in by_backend["hanging"])
    assert all(not c.kept and c.reason.startswith("over the memory budget") for c in by_backend["hungry"]), \
        [(c.kept, c.reason) for c in by_backend["hungry"]]
    assert all(not c.kept and c.reason.startswith("wrong on this device") and c.agreement < 0.5
               for c in by_backend["wrong"])
    assert info.chosen.backend in ("onnxruntime", "openvino")
    assert failures == []
    assert rt.model("digits") is model  # the serving session is untouched
    np.testing.assert_array_equal(rt.infer("digits", {"input": x})["probabilities"], before)
    rt.close()


def test_the_model_serves_while_tuned_then_swaps_to_the_pick_and_a_restart_reuses_the_cache(checked_digits,
                                                                                          tmp_path):
    rt = Runtime()
    rt.load(checked_digits)
    tuner = AutoTuner(rt, TuningConfig(mode="every", budget=5, defer_load=0), tmp_path)
    x = checked_digits.validation.inputs["input"][:1]
    tuner.activated(rt.model("digits"))
    served = 0
    while not tuner.idle.wait(0.01):
        rt.infer("digits", {"input": x})  # raises on any failure
        served += 1
    assert served > 0
    info = rt.tuned["digits"]
    serving = rt.model("digits")
    assert same_choice(info, serving), "the tuned pick serves"
    assert serving.options == info.chosen.options
    cache_file = TuningCache(tmp_path).path("digits", 1)
    assert json.loads(cache_file.read_text())["info"]["chosen"] == info.chosen.to_dict()
    from edgerun.agent import Agent
    from edgerun.config import Config, MqttConfig
    from edgerun.contract import Status

    status = Agent(rt, Config(state_dir=tmp_path / "agent", mqtt=MqttConfig(enabled=True))).status()
    sent = Status.from_payload(status.to_payload())
    assert [t.chosen for t in sent.tuning] == [info.chosen], "the device's status carries what it measured"
    rt.close()

    again = Runtime()  # a restart: the cache answers, nothing is measured
    restarted = AutoTuner(again, TuningConfig(mode="every", budget=5, defer_load=0), tmp_path)
    cached = restarted.cached(again.open_package(checked_digits.root))
    assert cached is not None and cached.chosen == info.chosen and cached.ts == info.ts
    again.close()


def test_explain_shows_the_device_figures_beside_the_hubs_and_which_decided(checked_digits, tmp_path):
    from typer.testing import CliRunner

    from edgerun.cli.app import app

    runner = CliRunner(env={"COLUMNS": "200"})
    state = tmp_path / "state"
    before = runner.invoke(app, ["explain", str(checked_digits.root), "--state-dir", str(state)])
    assert before.exit_code == 0, before.output
    assert "decided by: the hub's figures" in before.output
    tuned = runner.invoke(app, ["tune", str(checked_digits.root), "--state-dir", str(state), "--budget", "4",
                                "--json"])
    assert tuned.exit_code == 0, tuned.output
    result = json.loads(tuned.output)
    assert result["chosen"]["kept"] and any("saved to" in n for n in result["notes"])
    after = runner.invoke(app, ["explain", str(checked_digits.root), "--state-dir", str(state)])
    assert after.exit_code == 0, after.output
    assert "device" in after.output and "decided by: this device's figures" in after.output
    assert "chosen (device figures)" in after.output
    cached = runner.invoke(app, ["tune", str(checked_digits.root), "--state-dir", str(state), "--json"])
    assert json.loads(cached.output)["ts"] == result["ts"], "a second tune reads the cache"
    # a budget the tuned pick does not fit: the pick is not shown as chosen, and the line says why
    with Runtime() as rt:
        need = next(cand.memory_bytes for cand in rt.explain(checked_digits).candidates
                    if (cand.variant.id, cand.backend) == (result["chosen"]["variant"], result["chosen"]["backend"]))
    small = runner.invoke(app, ["explain", str(checked_digits.root), "--state-dir", str(state),
                                "--memory-budget", str(need - 1)])
    assert "chosen (device figures)" not in small.output
    assert (f"this device's tuned pick ({result['chosen']['variant']} on {result['chosen']['backend']}) does not "
            "fit this memory budget") in " ".join(small.output.split())


@pytest.mark.parametrize("damage", ["garbage", "other-format", "other-key"])
def test_a_corrupt_cache_or_one_from_another_format_or_key_is_ignored_and_tuned_again(checked_digits, tmp_path,
                                                                                        damage):
    rt = Runtime()
    cache = TuningCache(tmp_path)
    info = Tuner(rt, TuneSettings(budget=3)).tune(checked_digits)
    path = cache.put(rt, checked_digits, info)
    assert cache.get(rt, checked_digits) == info
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text('{"format": 1, "key": {"model": "dig')
    elif damage == "other-format":
        data["format"] = 999
        path.write_text(json.dumps(data))
    else:
        data["key"]["backends"]["onnxruntime"] = "0.0.1"  # tuned under another onnxruntime
        path.write_text(json.dumps(data))
    assert cache.get(rt, checked_digits) is None
    rt.load(checked_digits)
    tuner = AutoTuner(rt, TuningConfig(mode="every", budget=3, defer_load=0), tmp_path)
    tuner.activated(rt.model("digits"))
    assert tuner.idle.wait(120)
    fresh = cache.get(rt, checked_digits)
    assert fresh is not None and fresh.ts > info.ts, "tuned again, and the cache rewritten"
    rt.close()


def test_tuning_mode_first_tunes_only_the_first_version_of_a_model(checked_digits, tmp_path):
    from edgerun.testing.models import make_digits_package

    rt = Runtime()
    rt.load(checked_digits)
    tuner = AutoTuner(rt, TuningConfig(mode="first", budget=3, defer_load=0), tmp_path)
    tuner.activated(rt.model("digits"))
    assert tuner.idle.wait(120)
    assert TuningCache(tmp_path).path("digits", 1).is_file()
    v2 = make_digits_package(tmp_path / "v2", version=2, int8=False)
    rt.load(v2)
    tuner.activated(rt.model("digits"))
    assert tuner.idle.wait(120)
    assert not TuningCache(tmp_path).path("digits", 2).exists()
    assert rt.model("digits").version == 2
    rt.close()


def test_tuning_settings_are_checked_in_the_configuration(tmp_path):
    from edgerun.config import parse_config
    from edgerun.errors import ConfigError

    cfg = parse_config({"tuning": {"mode": "first", "budget": 12}})
    assert cfg.tuning.mode == "first" and cfg.tuning.budget == 12.0
    with pytest.raises(ConfigError, match="tuning.mode"):
        parse_config({"tuning": {"mode": "sometimes"}})
    with pytest.raises(ConfigError, match="tune"):
        parse_config({"models": [{"path": str(tmp_path), "tune": "always"}]})


def test_tuned_options_reach_the_backend_at_load(checked_digits):
    from edgerun.errors import ModelLoadError

    rt = Runtime()
    model = rt.load(checked_digits, backend="onnxruntime", options={"threads": 1, "graph_optimization": "extended"})
    assert model.options == {"threads": 1, "graph_optimization": "extended"}
    assert model.describe()["options"] == model.options
    with pytest.raises(ModelLoadError, match="execution_mode 'sideways'"):
        rt.prepare(checked_digits, backend="onnxruntime", options={"execution_mode": "sideways"})
    rt.close()


def test_a_busy_device_defers_tuning(checked_digits, tmp_path, caplog):
    import logging
    import time

    rt = Runtime()
    rt.load(checked_digits)
    tuner = AutoTuner(rt, TuningConfig(mode="every", budget=3, defer_load=1e-9, max_defer=600), tmp_path)
    with caplog.at_level(logging.INFO, logger="edgerun.autotune"):
        tuner.activated(rt.model("digits"))
        deadline = time.monotonic() + 60
        while "deferred: load" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    assert tuner.busy == "digits v1" and "digits" not in rt.tuned
    tuner.stop()
    assert not TuningCache(tmp_path).path("digits", 1).exists(), "stopped while deferred: nothing measured"
    rt.close()


def test_an_encrypted_package_is_tuned_with_the_device_key(checked_digits, tmp_path):
    from edgerun.devicekey import create_key_file
    from edgerun.hub.encrypt import encrypt_package

    key_path = tmp_path / "device.key"
    identity = create_key_file(key_path)
    encrypted = encrypt_package(checked_digits, [identity.recipient], tmp_path / "encrypted")
    info = Tuner(Runtime(device_key=key_path), TuneSettings(budget=4)).tune(encrypted)
    onnx = [c for c in info.candidates if c.backend == "onnxruntime"]
    assert onnx and all(c.kept and c.latency_ms for c in onnx), [c.reason for c in onnx]
    assert info.chosen.agreement is not None
