"""SIGTERM drains without losing accepted requests; SIGHUP applies an edited config file."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np

BODY = {"inputs": [{"name": "input", "shape": [128, 64], "datatype": "FP32",
                    "data": np.linspace(0, 1, 128 * 64, dtype=np.float32).round(3).tolist()}]}


def test_sigterm_under_load_drains_accepted_requests(service, heavy_package):
    s = service(["--model", str(heavy_package.root)])
    s.wait_ready()
    results: list[tuple[float, float, object]] = []  # (sent, finished, status code or exception)
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        # a fresh connection per request: an idle keep-alive connection is not an accepted request
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    outcome: object = c.post(f"{s.url}/v2/models/heavy/infer", json=BODY).status_code
                except httpx.TransportError as exc:
                    outcome = exc
                with lock:
                    results.append((t0, time.monotonic(), outcome))
                if isinstance(outcome, httpx.ConnectError):
                    return  # the listener is gone

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    t_term = time.monotonic()
    s.signal(signal.SIGTERM)
    code = s.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(30)
    assert code == 0, s.output()

    before = [r for r in results if r[0] < t_term]
    assert len(before) >= 8, f"too little load to test anything: {len(before)} requests before SIGTERM"
    lost = [r for r in before if r[2] != 200]
    assert not lost, f"requests sent before SIGTERM failed: {lost}"
    drained = [r for r in before if r[1] > t_term]
    assert drained, "no request was in flight at SIGTERM; the drain was not exercised"
    answered = [r[2] for r in results if isinstance(r[2], int)]
    assert set(answered) == {200}, f"non-200 answers during the drain: {sorted(set(answered))}"
    for sent, _, outcome in results:
        if not isinstance(outcome, int):  # only connections attempted once stopping may fail
            assert sent >= t_term, f"a request sent before SIGTERM failed with {outcome!r}"
    assert s.notify.times("STOPPING")


def _write_config(path, port_models: list) -> None:
    text = 'log_level = "INFO"\n' + "".join(f'[[models]]\npath = "{p}"\n' for p in port_models)
    path.write_text(text)


def test_sighup_adds_and_removes_models_from_the_edited_config(service, tmp_path, digits_package, second_package):
    cfg = tmp_path / "edgerun.toml"
    _write_config(cfg, [digits_package.root])
    s = service(["--config", str(cfg)])
    s.wait_ready()
    assert s.get("/v2/models/digits-b/ready").status_code == 404

    _write_config(cfg, [digits_package.root, second_package.root])
    n = len(s.notify.messages)
    s.signal(signal.SIGHUP)
    i = s.notify.wait_for("RELOADING", "1", after=n, timeout=30, proc=s.proc)
    j = s.notify.wait_for("READY", "1", after=i, timeout=60, proc=s.proc)
    assert "digits-b v1" in s.notify.messages[j][1]["STATUS"]
    assert s.get("/v2/models/digits-b/ready").status_code == 200
    x = second_package.samples[0].inputs["input"]
    r = httpx.post(f"{s.url}/v2/models/digits-b/infer", timeout=10, json={"inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    assert s.get("/v2/models/digits/ready").status_code == 200  # untouched by the reload

    _write_config(cfg, [second_package.root])  # drop the first model
    n = len(s.notify.messages)
    s.signal(signal.SIGHUP)
    s.notify.wait_for("READY", "1", after=s.notify.wait_for("RELOADING", after=n, proc=s.proc), proc=s.proc)
    assert s.get("/v2/models/digits/ready").status_code == 404
    assert s.get("/v2/models/digits-b/ready").status_code == 200

    cfg.write_text('threads = "many"\n')  # a broken edit: keep serving what we have, say why
    n = len(s.notify.messages)
    s.signal(signal.SIGHUP)
    k = s.notify.wait_for("READY", "1", after=n, proc=s.proc)
    status = s.notify.messages[k][1]["STATUS"]
    assert status.startswith("reload failed") and "key 'threads'" in status and str(cfg) in status, status
    assert s.get("/v2/models/digits-b/ready").status_code == 200
    assert s.stop() == 0, s.output()


def test_sigterm_while_loading_models_exits_cleanly(service, heavy_package, digits_package):
    s = service(["--model", str(heavy_package.root), "--model", str(digits_package.root)])
    s.notify.wait_for("STATUS", f"loading {heavy_package.root}", proc=s.proc)
    s.signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0, s.output()
    assert not s.notify.times("READY"), "READY=1 after SIGTERM during start-up"
    assert s.notify.times("STOPPING")
    assert f"loading {digits_package.root}" not in " ".join(s.notify.keys()), "kept loading after SIGTERM"


def test_sighup_applies_mqtt_settings(service, tmp_path):
    import pytest

    from edgerun.testing.mosquitto import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text("[mqtt]\nenabled = false\n")
    with Mosquitto(tmp_path / "a") as a, Mosquitto(tmp_path / "b") as b:
        s = service(["--config", str(cfg)])
        i = s.wait_ready()
        assert "MQTT" not in s.notify.messages[i][1]["STATUS"]

        def reload_to(text: str) -> None:
            cfg.write_text(text)
            n = len(s.notify.messages)
            s.signal(signal.SIGHUP)
            s.notify.wait_for("READY", "1", after=s.notify.wait_for("RELOADING", after=n, proc=s.proc), proc=s.proc)

        def wait_status(text: str) -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = [m["STATUS"] for _, m in s.notify.messages if "STATUS" in m]
                if st and st[-1].endswith(text):
                    return
                time.sleep(0.1)
            raise AssertionError(f"STATUS never ended with {text!r}: {st[-3:]}")

        mqtt = 'device_id = "dev1"\nfleet = "f"\nkeepalive = 2\n'
        reload_to(f"[mqtt]\nenabled = true\nport = {a.port}\n{mqtt}")
        wait_status("MQTT connected")
        a.stop()
        wait_status("MQTT connecting")
        reload_to(f"[mqtt]\nenabled = true\nport = {b.port}\n{mqtt}")  # a new broker: the agent restarts
        wait_status("MQTT connected")
        reload_to("[mqtt]\nenabled = false\n")
        wait_status(f":{s.port}")
        assert s.stop() == 0, s.output()
