"""SIGTERM drains without losing accepted requests; SIGHUP applies an edited config file."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
import pytest


def body(rows: int) -> dict:
    return {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                        "data": np.linspace(0, 1, rows * 64, dtype=np.float32).round(3).tolist()}]}


BODY = body(128)


def binary_body(rows: int) -> dict:
    """httpx.post arguments for a ``rows`` x 64 request in binary tensor data (a large one stays small on the wire)."""
    from edgerun.server.codec import encode_request

    x = np.linspace(0, 1, rows * 64, dtype=np.float32).reshape(rows, 64)
    content, header_length = encode_request({"input": x}, binary=True)
    return {"content": content, "headers": {"inference-header-content-length": str(header_length),
                                            "content-type": "application/octet-stream"}}


def rows_for(url: str, seconds: float) -> int:
    """Rows of the heavy model that take about ``seconds`` on this host (hosts and backends differ 10x)."""
    probe = 4096
    with httpx.Client(timeout=60) as c:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            assert c.post(f"{url}/v2/models/heavy/infer", **binary_body(probe)).status_code == 200
            times.append(time.perf_counter() - t0)
    return max(probe, min(200_000, round(probe * seconds / min(times))))


SETTLE = 0.1  # seconds the server's event loop gets to read a request before it counts as accepted


def test_sigterm_under_load_drains_accepted_requests(service, heavy_package):
    """Requests the server has read finish; a connection caught in the kernel's accept queue is refused or reset."""
    s = service(["--model", str(heavy_package.root)])
    s.wait_ready()
    big_request = binary_body(rows_for(s.url, 1.0))
    results: list[tuple[float | None, float, object]] = []  # (request sent, finished, status code or exception)
    lock = threading.Lock()
    stop = threading.Event()

    def post(c: httpx.Client, request: dict, on_sent: threading.Event | None = None) -> object:
        sent: list[float] = []

        def trace(event: str, info: dict) -> None:
            if event == "http11.send_request_body.complete":
                sent.append(time.monotonic())
                if on_sent is not None:
                    on_sent.set()

        try:
            outcome: object = c.post(f"{s.url}/v2/models/heavy/infer", **request,
                                     extensions={"trace": trace}).status_code
        except httpx.TransportError as exc:
            outcome = exc
        with lock:
            results.append((sent[0] if sent else None, time.monotonic(), outcome))
        return outcome

    def client() -> None:
        # a fresh connection per request: an idle keep-alive connection is not an accepted request
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while not stop.is_set():
                if isinstance(post(c, {"json": BODY}), httpx.ConnectError):
                    return  # the listener is gone

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    # and one request of a second or so, certainly in flight at SIGTERM: the drain is exercised every time
    big_sent = threading.Event()
    with httpx.Client(timeout=30) as c:
        big = threading.Thread(target=post, args=(c, big_request, big_sent))
        big.start()
        assert big_sent.wait(30)
        time.sleep(SETTLE)
        t_term = time.monotonic()
        s.signal(signal.SIGTERM)
        code = s.proc.wait(60)
        big.join(30)
    stop.set()
    for t in threads:
        t.join(30)
    assert code == 0, s.output()

    accepted = [r for r in results if r[0] is not None and r[0] <= t_term - SETTLE]
    assert len(accepted) >= 8, f"too little load to test anything: {len(accepted)} requests before SIGTERM"
    lost = [(r[0] - t_term, r[1] - t_term, r[2]) for r in accepted if r[2] != 200]
    assert not lost, f"requests sent before SIGTERM failed (seconds relative to SIGTERM): {lost}"
    drained = [r for r in accepted if r[1] > t_term]
    assert drained, "no request was in flight at SIGTERM; the drain was not exercised"
    answered = {r[2] for r in results if isinstance(r[2], int)}
    assert answered == {200}, f"HTTP errors during the drain: {sorted(answered)}"
    # sent around SIGTERM, still in the kernel's accept queue when the listener closed: refused or reset,
    # never a partial answer
    late = [r[2] for r in results if not isinstance(r[2], int)]
    assert all(isinstance(e, (httpx.ConnectError, httpx.ReadError)) or "without sending a response" in str(e)
               for e in late), late
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


def test_sighup_applies_the_log_level_and_keeps_the_listener(service, tmp_path, digits_package, second_package):
    from edgerun.testing.mosquitto import free_port

    cfg = tmp_path / "edgerun.toml"
    port = free_port()

    def write(level: str, port: int, *models) -> None:
        cfg.write_text(f'log_level = "{level}"\n[server]\nport = {port}\n'
                       + "".join(f'[[models]]\npath = "{p.root}"\n' for p in models))

    def reload() -> str:
        """SIGHUP; the log lines it produced."""
        before = len(s.output())
        n = len(s.notify.messages)
        s.signal(signal.SIGHUP)
        s.notify.wait_for("READY", "1", after=s.notify.wait_for("RELOADING", after=n, proc=s.proc), proc=s.proc)
        time.sleep(0.2)
        return s.output()[before:]

    write("INFO", port, digits_package)
    s = service(["--config", str(cfg)], port_flag=False, env={"EDGERUN_LOG_LEVEL": None})
    s.url = f"http://127.0.0.1:{port}"
    s.wait_ready()
    assert "<7>" not in s.output()

    other = free_port()
    write("DEBUG", other, digits_package, second_package)
    out = reload()
    assert "<6>edgerun.daemon: log level is now DEBUG" in out and "<7>" in out, out
    assert (f"<4>edgerun.daemon: server.port changed ({port} -> {other}): not applied while running, "
            f"kept {port} until the next restart") in out, out
    assert s.get("/v2/models/digits-b/ready").status_code == 200  # models applied, on the old listener
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{other}/v2/health/live", timeout=2)

    write("WARNING", other, digits_package)
    out = reload()
    assert s.get("/v2/models/digits-b/ready").status_code == 404
    after = out.split("reloading the configuration from", 1)[1].splitlines()[1:]  # logged at the old level
    assert not [ln for ln in after if ln.startswith(("<6>", "<7>"))], out  # e.g. "no longer serving" is INFO
    assert s.stop() == 0, s.output()


def test_sigterm_during_an_update_exits_0_and_the_update_resumes(service, tmp_path, digits_package):
    """The agent stops at a journalled step (no half-written state) and the next start carries on from it."""
    import json

    from edgerun.contract import Topics
    from edgerun.hub.keys import generate
    from edgerun.hub.publish import build_manifest, encode, iter_chunks
    from edgerun.manifest import load_private_key, sign
    from edgerun.mqtt import Broker, Connection
    from edgerun.testing.mosquitto import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    keys = tmp_path / "keys"
    generate(keys, "hub")
    state = tmp_path / "state"
    journal = state / "journal" / "digits.json"
    topics = Topics("f")
    with Mosquitto(tmp_path / "broker") as broker, Connection(Broker(port=broker.port), persistent=False) as hub:
        cfg = tmp_path / "edgerun.toml"
        cfg.write_text(f'[mqtt]\nenabled = true\nport = {broker.port}\nfleet = "f"\ndevice_id = "dev1"\n'
                       f'keepalive = 2\ntrusted_keys = "{keys}"\n')
        manifest = build_manifest(digits_package, chunk_size=4096)
        files = [f for v in manifest["variants"] for f in v["files"]]
        chunks = [(f["sha256"], i, block) for f in files
                  for i, block in iter_chunks(digits_package.root / f["path"], f["chunk_size"])]
        assert len(chunks) >= 4
        half = chunks[:len(chunks) // 2]  # the hub is still uploading: the device gets half of the chunks
        hub.wait([hub.publish(topics.blob(sha, i), block, retain=True) for sha, i, block in half])
        hub.wait([hub.publish(topics.release("digits"), encode(sign(manifest, load_private_key(keys / "hub.key"),
                                                                    "hub")), retain=True)])
        s = service(["--config", str(cfg)])
        s.wait_ready()
        deadline = time.monotonic() + 30
        while not (journal.exists() and json.loads(journal.read_text())["state"] == "downloading"):
            assert time.monotonic() < deadline and s.proc.poll() is None, s.output()
            time.sleep(0.05)
        time.sleep(1.0)  # the first half lands on disk
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.output()
        assert time.monotonic() - t0 < 10, "the agent held up the shutdown"
        out = s.output()
        assert "Traceback" not in out and "<6>edgerun.daemon: stopped" in out, out

        entry = json.loads(journal.read_text())  # complete JSON: written by rename, never in place
        assert entry["state"] == "downloading" and entry["version"] == 1, entry
        leftovers = [p for p in state.rglob(".*") if p.is_file()]
        assert not leftovers, f"temp files of interrupted writes: {leftovers}"
        assert list((state / "partial").glob("*.part")), "the chunks received so far were not kept"

        hub.wait([hub.publish(topics.blob(sha, i), block, retain=True) for sha, i, block in chunks])
        again = service(["--config", str(cfg)])
        again.wait_ready()
        deadline = time.monotonic() + 30
        # the new version serves from its swap on; the journal says "active" once the swap's clean-up is done
        while not (again.get("/v2/models/digits/ready").status_code == 200
                   and json.loads(journal.read_text())["state"] == "active"):
            assert time.monotonic() < deadline and again.proc.poll() is None, (journal.read_text(), again.output())
            time.sleep(0.1)
        assert "resuming the update of digits to v1" in again.output()
        assert again.stop() == 0, again.output()
