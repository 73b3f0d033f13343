"""sd_notify as systemd sees it: readiness only once serving, watchdog pings from a live loop, clean stop."""

from __future__ import annotations

import re
import signal
import time

import httpx


def test_ready_only_when_serving_then_watchdog_then_stopping(service, digits_package):
    s = service(["--model", str(digits_package.root)], watchdog_usec=400_000)
    i_ready = s.wait_ready()
    # asked the moment READY=1 arrives, with no retry: the service must already be ready
    assert s.get("/v2/health/ready").status_code == 200, "READY=1 sent before /v2/health/ready is true"
    assert s.get("/v2/models/digits/ready").status_code == 200
    time.sleep(1.5)
    s.signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0, s.output()

    keys = s.notify.keys()
    order = [k for k in keys if k in ("READY", "WATCHDOG", "STOPPING", "EXTEND_TIMEOUT_USEC")]
    # loading asks for time before READY=1; pings only after it; STOPPING=1 is the end of the pings
    assert order.index("EXTEND_TIMEOUT_USEC") < order.index("READY"), keys
    assert "WATCHDOG" not in order[:order.index("READY")], keys
    assert "WATCHDOG" not in order[order.index("STOPPING"):], keys
    assert any(k.startswith("STATUS=loading") for k in keys[:i_ready]), keys
    ready_status = s.notify.messages[i_ready][1].get("STATUS", "")
    assert "digits v1" in ready_status and f":{s.port}" in ready_status, ready_status
    assert "STOPPING" in order, keys

    pings = s.notify.times("WATCHDOG")
    assert len(pings) >= 5, f"expected a ping every 0.2s for 1.5s, got {len(pings)}"
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.4, f"a watchdog gap exceeded WATCHDOG_USEC: {max(gaps):.3f}s"

    # journald format under systemd: "<priority>logger: message", no timestamps
    lines = [ln for ln in s.output().splitlines() if ln.strip()]
    assert lines and all(re.match(r"^<[0-7]>\S+: ", ln) for ln in lines), lines[:5]
    assert any(ln.startswith("<6>edgerun.daemon: ready") for ln in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", ln) for ln in lines), "timestamps in journald output"


def test_frozen_event_loop_stops_the_watchdog(service, digits_package):
    s = service(["--model", str(digits_package.root)], watchdog_usec=300_000,
                env={"EDGERUN_TEST_FREEZE_AFTER": "0.8"})
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
