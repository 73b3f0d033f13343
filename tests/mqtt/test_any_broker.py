"""The update flow on RabbitMQ's MQTT plugin and NATS's MQTT listener, not only on Mosquitto.

RabbitMQ 3.10 speaks MQTT 3.1.1 only and closes an MQTT 5 CONNECT without a CONNACK; NATS answers MQTT 5
with a CONNACK refusing the version. RabbitMQ does not deliver retained messages to wildcard
subscriptions, which is why a device also subscribes the exact release topics of the models it knows.
"""

from __future__ import annotations

import time

import pytest

from edgerun.mqtt import Broker, Connection
from edgerun.testing.brokers import find_broker, start_broker
from mqtt_helpers import Device, Hub, Watcher, make_package


@pytest.fixture(scope="module", params=["rabbitmq", "nats"])
def other_broker(request, tmp_path_factory):
    if find_broker(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    b = start_broker(request.param, tmp_path_factory.mktemp(request.param))
    yield b
    b.stop()


def test_update_restart_and_last_will_on_another_broker(tmp_path, other_broker, keydir, fleet):
    hub = Hub(other_broker, fleet, keydir)
    watcher = Watcher(other_broker, fleet)
    dev = Device(tmp_path / "dev", other_broker, fleet, keydir, "dev1")
    try:
        dev.start()
        watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online"), timeout=30, what="device online")
        hub.release(make_package(tmp_path / "v1", 1))
        dev.wait_version(1, timeout=60)
        watcher.event(1, ("active",))

        dev.stop()  # the next release is published while the device is away and its session is gone:
        with Connection(Broker(port=other_broker.port), client_id=f"edgerun-{fleet}-dev1", persistent=False):
            pass  # (a session that expired, or a broker that lost it) so the release reaches it only retained
        hub.release(make_package(tmp_path / "v2", 2))
        time.sleep(0.5)
        dev.start()
        dev.wait_version(2, timeout=60)  # from the exact release topic: a wildcard gets nothing on RabbitMQ
        assert dev.infer().json()["model_version"] == "2"

        session = watcher.wait_for(lambda: watcher.state.get("dev1", {}).get("online")
                                   and watcher.state["dev1"]["session"], timeout=30, what="online again")
        dev.kill()
        watcher.wait_for(lambda: watcher.state["dev1"]["online"] is False
                         and watcher.state["dev1"]["session"] == session, timeout=20, what="last will")
        r = hub.cli("publish", str(make_package(tmp_path / "v3", 3).root), "--fleet", fleet, "--key",
                    str(keydir / "hub-test.key"))  # the hub's own command line connects to it as well
        assert r.returncode == 0, r.stderr
    finally:
        dev.kill()
        watcher.close()
