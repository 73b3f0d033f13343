"""Manifest rules a hub author relies on, and the device's login, keys and reconnect behaviour."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from edgerun.mqtt import backoff_delay
from edgerun.errors import EdgerunError, ManifestError
from edgerun.hub.keys import generate
from edgerun.hub.publish import build_manifest, encode
from edgerun.manifest import canonical_json, load_private_key, load_trusted_keys, parse, sign
from edgerun.testing.mosquitto import Mosquitto
from edgerun.testing.tls import make_test_ca
from mqtt_helpers import Device, Hub, Mqtt311Gate, Watcher, make_package


@pytest.fixture(scope="module")
def signed_parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    generate(tmp / "keys", "k1")
    pkg = make_package(tmp / "pkg", 4)
    return pkg, load_private_key(tmp / "keys" / "k1.key"), load_trusted_keys(tmp / "keys")


def test_signature_covers_the_canonical_json_without_the_signature(signed_parts):
    pkg, key, trusted = signed_parts
    m = sign(build_manifest(pkg), key, "k1")
    body = {k: v for k, v in m.items() if k != "signature"}
    assert canonical_json(m) == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    # key order and whitespace of the payload do not matter, content does
    pretty = json.dumps(dict(reversed(list(m.items()))), indent=2).encode()
    assert parse(pretty, trusted).version == 4


@pytest.mark.parametrize("late,accepted", [(100, True), (400, False)])
def test_expiry_allows_the_documented_clock_skew(signed_parts, late, accepted):
    pkg, key, trusted = signed_parts
    now = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)
    expires = now - dt.timedelta(seconds=late)
    m = build_manifest(pkg)
    m["expires"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    payload = encode(sign(m, key, "k1"))
    if accepted:
        assert parse(payload, trusted, now=now, clock_skew=300).expires == m["expires"]
    else:
        with pytest.raises(ManifestError, match="expired"):
            parse(payload, trusted, now=now, clock_skew=300)


def test_keygen_writes_a_private_key_only_its_owner_can_read_and_never_prints_it(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
                        "hub", "keygen", "--out", str(tmp_path), "--key-id", "hub-2026"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    priv = tmp_path / "hub-2026.key"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    secret = priv.read_text()
    body = "".join(secret.splitlines()[1:-1])
    assert body not in r.stdout + r.stderr
    assert set(load_trusted_keys(tmp_path)) == {"hub-2026"}
    again = subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
                            "hub", "keygen", "--out", str(tmp_path), "--key-id", "hub-2026"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert priv.read_text() == secret


def test_reconnect_backoff_is_exponential_with_jitter():
    for attempt in range(8):
        delays = [backoff_delay(attempt) for _ in range(200)]
        cap = min(30.0, 0.5 * 2 ** attempt)
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > 0.7 * cap and min(delays) < 0.3 * cap  # spread over the whole range
    assert max(backoff_delay(50) for _ in range(200)) <= 30.0


def test_device_logs_in_with_a_password_from_the_environment_or_a_file(tmp_path, keydir):
    pw = tmp_path / "passwd"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "dev1", "s3cret"], check=True, capture_output=True)
    (tmp_path / "dev1.pass").write_text("s3cret\n")
    with Mosquitto(tmp_path / "broker", password_file=pw) as broker:
        watcher = Watcher(broker, "auth", username="dev1", password="s3cret")
        dev = Device(tmp_path / "dev", broker, "auth", keydir, "dev1")
        plain = dev.config.read_text() + 'username = "dev1"\n'
        dev.config.write_text(plain)
        try:
            dev.start(env={"EDGERUN_MQTT_PASSWORD": "wrong"})
            time.sleep(2.0)
            assert "dev1" not in watcher.state, "a wrong password must not get in"
            assert dev.versions() == []  # and the device serves (nothing) while offline
            dev.kill()
            dev.start(env={"EDGERUN_MQTT_PASSWORD": "s3cret"})
            first = watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") and
                                     watcher.state["dev1"]["session"], timeout=20, what="online")
            dev.kill()
            dev.config.write_text(plain + f'password_file = "{tmp_path / "dev1.pass"}"\n')
            dev.start()  # no EDGERUN_MQTT_PASSWORD: the file is read
            watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") and
                             watcher.state["dev1"]["session"] > first, timeout=20, what="online with the file")
        finally:
            dev.kill()
            watcher.close()


def test_device_falls_back_to_mqtt_311_when_the_broker_refuses_mqtt_5(tmp_path, broker, keydir):
    gate = Mqtt311Gate(broker.port)
    watcher = Watcher(broker, "v311")
    dev = Device(tmp_path / "dev", gate, "v311", keydir, "dev1")  # the device connects through the gate
    try:
        dev.start()
        session = watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online") and
                                   watcher.state["dev1"]["session"], timeout=20, what="online over 3.1.1")
        assert gate.levels[0] == 5 and 4 in gate.levels, gate.levels  # tried MQTT 5 first, then 3.1.1
        Hub(broker, "v311", keydir).release(make_package(tmp_path / "v1", 1))
        dev.wait_version(1)
        dev.kill()  # the last will works over 3.1.1 too
        watcher.wait_for(lambda: watcher.state["dev1"]["online"] is False and watcher.state["dev1"]["session"]
                         == session, timeout=15, what="last will")
    finally:
        dev.kill()
        watcher.close()
        gate.close()


@pytest.mark.parametrize("dropped", [3, 4])
def test_connections_closed_before_their_connack_do_not_move_the_device_off_mqtt_5(tmp_path, broker, keydir,
                                                                                   dropped):
    """A load balancer in front of a restarting broker accepts and closes; once the broker is back the
    device speaks MQTT 5 with it, as its CONNACK allows, and is not left on 3.1.1."""
    gate = Mqtt311Gate(broker.port, refuse_v5=False, drop_first=dropped)
    watcher = Watcher(broker, "lb")
    dev = Device(tmp_path / "dev", gate, "lb", keydir, "dev1")
    try:
        dev.start()
        watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online"), timeout=30, what="online")
        assert len(gate.levels) > dropped and gate.passed[-1] == 5, (gate.levels, gate.passed)
        Hub(broker, "lb", keydir).release(make_package(tmp_path / "v1", 1))
        dev.wait_version(1)
        assert gate.passed[-1] == 5, gate.passed
    finally:
        dev.kill()
        watcher.close()
        gate.close()


def test_device_connects_over_tls_and_gets_a_release(tmp_path, keydir):
    from edgerun.mqtt import Broker, Connection

    ca = make_test_ca(tmp_path)
    with Mosquitto(tmp_path / "broker", extra_config=f"cafile {ca}\ncertfile {tmp_path / 'server.pem'}\n"
                                                      f"keyfile {tmp_path / 'server.key'}\n") as broker:
        dev = Device(tmp_path / "dev", broker, "tls", keydir, "dev1")
        dev.config.write_text(dev.config.read_text() + f'tls = true\nca_file = "{ca}"\n')
        try:
            dev.start()
            hub = Hub(broker, "tls", keydir)
            hub.client = lambda: Connection(Broker(port=broker.port, tls=True, ca_file=ca), persistent=False)
            hub.release(make_package(tmp_path / "v1", 1))
            dev.wait_version(1)
            with pytest.raises(EdgerunError):  # the listener speaks only TLS: the device really used it
                with Connection(Broker(port=broker.port), persistent=False, connect_timeout=2):
                    pass
        finally:
            dev.kill()


@pytest.mark.parametrize("key,value", [("device_id", "kitchen/pi"), ("fleet", "lab+1")])
def test_a_device_or_fleet_name_that_is_not_one_topic_level_stops_startup(tmp_path, key, value):
    from edgerun.agent import Agent
    from edgerun.config import Config, MqttConfig
    from edgerun.errors import ConfigError
    from edgerun.runtime import Runtime

    cfg = Config(state_dir=tmp_path, mqtt=MqttConfig(enabled=True, **{key: value}))
    with pytest.raises(ConfigError, match=f"mqtt.{key}"):
        Agent(Runtime(load_plugins=False), cfg)
