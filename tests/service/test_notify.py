"""sd_notify as systemd sees it: readiness only once serving, watchdog pings from a live loop, clean stop."""

from __future__ import annotations

import re
import signal
import time

import httpx


def kinds(messages: list[tuple[float, dict[str, str]]]) -> str:
    """Each sd_notify message as one word, in order: what systemd's state machine acts on."""
    words = []
    for _, m in messages:
        for key, word in (("READY", "READY"), ("STOPPING", "STOPPING"), ("RELOADING", "RELOADING"),
                          ("WATCHDOG", "WATCHDOG"), ("EXTEND_TIMEOUT_USEC", "EXTEND"), ("STATUS", "STATUS")):
            if key in m:
                words.append(word)
                break
    return " ".join(words)


def test_ready_only_when_serving_then_watchdog_then_stopping(service, digits_package):
    probes: list[int | str] = []

    def on_notify(m: dict[str, str]) -> None:
        if m.get("READY") == "1":  # asked from the reader thread the moment READY=1 arrives, once
            try:
                probes.append(httpx.get(f"{s.url}/v2/health/ready", timeout=5).status_code)
            except httpx.HTTPError as exc:
                probes.append(repr(exc))

    s = service(["--model", str(digits_package.root)], watchdog_usec=400_000, on_notify=on_notify)
    i_ready = s.wait_ready()
    assert probes == [200], f"READY=1 sent before /v2/health/ready was true: {probes}"
    assert s.get("/v2/models/digits/ready").status_code == 200
    time.sleep(1.5)
    s.signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0, s.output()

    # status, then per model: status + more time; READY=1 once; only pings and status while serving;
    # STOPPING=1 (asking time to drain) ends it
    order = kinds(s.notify.messages)
    assert re.fullmatch(r"STATUS (STATUS EXTEND( EXTEND)* )+READY( WATCHDOG| STATUS)+ STOPPING EXTEND", order), order
    keys = s.notify.keys()
    assert f"STATUS=loading {digits_package.root}" in keys[:i_ready + 1], keys
    ready_status = s.notify.messages[i_ready][1].get("STATUS", "")
    assert "digits v1" in ready_status and f":{s.port}" in ready_status, ready_status

    pings = s.notify.times("WATCHDOG")
    assert len(pings) >= 5, f"expected a ping every 0.2s for 1.5s, got {len(pings)}"
    assert pings[0] - s.notify.messages[i_ready][0] < 0.4, "the first ping came late"
    gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
    assert gaps[-1] < 0.4, f"a watchdog gap exceeded WATCHDOG_USEC: {gaps[-1]:.3f}s"
    assert 0.15 < gaps[len(gaps) // 2] < 0.3, f"pings are not at half of WATCHDOG_USEC: median {gaps[len(gaps) // 2]}"

    # journald format under systemd: "<priority>logger: message", no timestamps
    lines = [ln for ln in s.output().splitlines() if ln.strip()]
    assert lines and all(re.match(r"^<[0-7]>\S+: ", ln) for ln in lines), lines[:5]
    assert any(ln.startswith("<6>edgerun.daemon: ready") for ln in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", ln) for ln in lines), "timestamps in journald output"


def test_ready_waits_for_a_slow_model_load(service, heavy_package, digits_package):
    """While a model loads, nothing listens and systemd is asked for more time; READY=1 only after the last."""
    s = service(["--model", str(heavy_package.root), "--model", str(digits_package.root)])
    loading = s.notify.wait_for("STATUS", f"loading {heavy_package.root}", proc=s.proc)
    try:
        early = s.get("/v2/health/ready").status_code  # nothing may say "ready" before the models are loaded
    except httpx.HTTPError:
        early = None
    asked = time.monotonic()
    i = s.wait_ready()
    if s.notify.messages[i][0] > asked:  # (on a fast machine the loads may be over before the question)
        assert early in (None, 503), f"/v2/health/ready answered {early} while models were loading"
    assert i > loading and s.get("/v2/models/digits/ready").status_code == 200
    extends = [m for _, m in s.notify.messages[loading:i] if "EXTEND_TIMEOUT_USEC" in m]
    assert len(extends) >= 2 and all(int(m["EXTEND_TIMEOUT_USEC"]) >= 10_000_000 for m in extends), extends


def test_frozen_event_loop_stops_the_watchdog(service, digits_package, testhooks):
    s = service(["--model", str(digits_package.root)], watchdog_usec=300_000,
                env={**testhooks, "EDGERUN_TESTHOOKS_FREEZE_AFTER": "0.8"})
    i = s.wait_ready()
    t_ready = s.notify.messages[i][0]
    time.sleep(2.5)
    pings = s.notify.times("WATCHDOG")
    assert [p for p in pings if p < t_ready + 0.8], "no pings while the loop was alive"
    last = max(pings)
    assert last < t_ready + 1.2, f"pings continued {last - t_ready:.2f}s after READY despite a frozen loop"
    assert time.monotonic() - last > 1.0
    assert s.proc.poll() is None, "a frozen daemon is for systemd's watchdog to kill, not to exit by itself"
    with httpx.Client(timeout=0.5) as c:  # and the frozen loop really serves nothing
        try:
            c.get(s.url + "/v2/health/live")
            raise AssertionError("a frozen event loop answered HTTP")
        except httpx.TimeoutException:
            pass


def test_no_watchdog_pings_without_watchdog_usec(service, digits_package):
    s = service(["--model", str(digits_package.root)])
    s.wait_ready()
    time.sleep(0.5)
    assert s.stop() == 0
    assert not s.notify.times("WATCHDOG")
    assert s.notify.times("STOPPING")


def test_bad_config_fails_startup_with_the_message(service, tmp_path):
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text('[server]\ndrain_timeout = "soon"\n')
    s = service(["--config", str(cfg)])
    assert s.proc.wait(30) == 78, s.output()
    out = s.output()
    assert f"file {cfg}" in out and "key 'server.drain_timeout'" in out and "expected a number" in out, out
    assert not s.notify.times("READY")
    status = [m["STATUS"] for _, m in s.notify.messages if "STATUS" in m]
    assert status and status[-1].startswith("failed:") and "server.drain_timeout" in status[-1], status


def test_missing_model_fails_startup_naming_it(service, tmp_path):
    s = service(["--model", str(tmp_path / "nope")])
    code = s.proc.wait(30)
    assert code not in (0, 1), s.output()  # a meaningful exit code (EX_DATAERR/EX_NOINPUT/...), not a traceback
    assert "nope" in s.output() and "Traceback" not in s.output()
    assert not s.notify.times("READY")


def test_ready_does_not_wait_for_mqtt(service, digits_package, tmp_path):
    """A device starts offline too: READY=1 once the models serve, while the agent keeps trying the broker."""
    from edgerun.testing.mosquitto import free_port

    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[mqtt]\nenabled = true\nport = {free_port()}\nfleet = "f"\ndevice_id = "dev1"\n'
                   f'[[models]]\npath = "{digits_package.root}"\n')  # nothing listens on that port
    s = service(["--config", str(cfg)])
    i = s.wait_ready(timeout=30)
    assert s.notify.messages[i][1]["STATUS"].endswith("; MQTT connecting")
    assert s.get("/v2/models/digits/ready").status_code == 200
    assert s.stop() == 0, s.output()
