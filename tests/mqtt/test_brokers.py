"""What edgerun relies on from an MQTT broker, checked with plain paho clients on Mosquitto, RabbitMQ and NATS."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from edgerun.testing.brokers import find_broker, mqtt_connack, start_broker

log = logging.getLogger(__name__)

KINDS = ("mosquitto", "rabbitmq", "nats")
PROTOCOLS = {"3.1": mqtt.MQTTv31, "3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
# Observed: RabbitMQ 3.10 (MQTT 5 came with 3.13) closes an MQTT 5 connection without a CONNACK;
# NATS 2.9 answers MQTT 5 with CONNACK "unsupported protocol version" and closes an MQTT 3.1 one without a CONNACK.
ACCEPTS = {"mosquitto": {"3.1", "3.1.1", "5"}, "rabbitmq": {"3.1", "3.1.1"}, "nats": {"3.1.1"}}
RETAINED_TO_WILDCARD = {"mosquitto": True, "rabbitmq": False, "nats": True}
RETAINED_SURVIVES_RESTART = {"mosquitto": True, "rabbitmq": True, "nats": True}
WAIT = 10.0


STARTUP_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    if find_broker(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    return request.param


@pytest.fixture(scope="module")
def broker(kind, tmp_path_factory) -> Any:
    began = time.monotonic()
    b = start_broker(kind, tmp_path_factory.mktemp(kind))
    STARTUP_SECONDS[kind] = time.monotonic() - began
    log.info("%s started in %.2fs", kind, STARTUP_SECONDS[kind])
    yield b
    b.stop()


class Client:
    """A paho client with its network loop in a thread; received messages are collected."""

    def __init__(self, broker: Any, client_id: str = "", *, protocol: int = mqtt.MQTTv311,
                 clean: bool = True, session_expiry: int | None = None, will: tuple[str, bytes] | None = None):
        kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean}
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kw)
        self.messages: list[mqtt.MQTTMessage] = []
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self._arrived = threading.Condition()
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message
        if will:
            self.paho.will_set(will[0], will[1], qos=1)
        props = None
        if protocol == mqtt.MQTTv5 and session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        v5 = {"clean_start": clean, "properties": props} if protocol == mqtt.MQTTv5 else {}
        self.paho.connect("127.0.0.1", broker.port, keepalive=30, **v5)
        self.paho.loop_start()
        assert self._connected.wait(WAIT), "no CONNACK"

    def _on_connect(self, _c, _u, flags, code, _props) -> None:
        assert not code.is_failure, code
        self.session_present = flags.session_present
        self._connected.set()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        with self._arrived:
            self.messages.append(msg)
            self._arrived.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        acked = threading.Event()
        self.paho.on_subscribe = lambda *_a: acked.set()
        self.paho.subscribe(topic, qos)
        assert acked.wait(WAIT), "no SUBACK"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.paho.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def wait_for(self, count: int, timeout: float = WAIT) -> list[mqtt.MQTTMessage]:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(broker: Any, *args, **kw) -> Client:
        made.append(Client(broker, *args, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def base() -> str:
    return f"edgerun-test/{uuid.uuid4().hex[:10]}"


def test_startup_time(kind, broker):
    """Each broker is up (first successful CONNACK) well within the 60 s start timeout; printed for the record."""
    print(f"\n{kind}: started in {STARTUP_SECONDS[kind]:.2f}s")
    assert STARTUP_SECONDS[kind] < 60


def test_protocol_versions(kind, broker):
    """Which MQTT versions get a successful CONNACK: all on Mosquitto 2.0, 3.1/3.1.1 on RabbitMQ 3.10, 3.1.1 on NATS."""
    accepted = set()
    for name, protocol in PROTOCOLS.items():
        code = mqtt_connack(broker.port, protocol=protocol)
        log.info("%s MQTT %s: %s", kind, name, code)
        if code is not None and not code.is_failure:
            accepted.add(name)
    assert accepted == ACCEPTS[kind]


def test_retained_exact_topic(broker, clients, base):
    """A QoS 1 retained message reaches a new subscriber of the exact topic, with the retain flag set."""
    topic = f"{base}/release"
    clients(broker).publish(topic, b"v1", retain=True)
    sub = clients(broker)
    sub.subscribe(topic)
    [msg] = sub.wait_for(1)
    assert (msg.topic, msg.payload, msg.retain) == (topic, b"v1", True)


def test_retained_wildcard(kind, broker, clients, base):
    """A `+` subscription gets the retained message on Mosquitto and NATS; on RabbitMQ it gets nothing (its
    retained store is looked up by the subscription's exact topic), while an exact subscription still does."""
    topic = f"{base}/release"
    clients(broker).publish(topic, b"v1", retain=True)
    wild = clients(broker)
    wild.subscribe(f"{base}/+")
    expected = [(b"v1", True)] if RETAINED_TO_WILDCARD[kind] else []
    got = wild.wait_for(1, timeout=WAIT if expected else 3.0)
    assert [(m.payload, m.retain) for m in got] == expected
    exact = clients(broker)
    exact.subscribe(topic)
    assert [m.payload for m in exact.wait_for(1)] == [b"v1"]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_persistent_session(kind, broker, clients, base, protocol):
    """A persistent session (3.1.1 clean_session=False, or 5 clean_start=False with a session expiry) gets the
    QoS 1 messages published while it was disconnected; MQTT 5 only where the broker accepts it."""
    if protocol not in ACCEPTS[kind]:
        pytest.skip(f"{kind} does not accept MQTT {protocol}")
    topic, cid = f"{base}/cmd", f"edgerun-test-{uuid.uuid4().hex[:8]}"
    kw: dict[str, Any] = {"protocol": PROTOCOLS[protocol], "clean": False, "session_expiry": 300}
    first = clients(broker, cid, **kw)
    first.subscribe(topic)
    first.close()
    pub = clients(broker)
    for i in range(3):
        pub.publish(topic, f"m{i}".encode())
    again = clients(broker, cid, **kw)
    assert again.session_present
    assert sorted(m.payload for m in again.wait_for(3)) == [b"m0", b"m1", b"m2"]


def test_last_will(broker, clients, base):
    """A client whose socket dies without DISCONNECT has its QoS 1 last will delivered to subscribers."""
    topic = f"{base}/status"
    watcher = clients(broker)
    watcher.subscribe(topic)
    victim = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgerun-victim-{uuid.uuid4().hex[:8]}")
    victim.will_set(topic, b"offline", qos=1)
    connected: list[Any] = []
    victim.on_connect = lambda *a: connected.append(a)
    victim.connect("127.0.0.1", broker.port, keepalive=30)
    deadline = time.monotonic() + WAIT
    while not connected and time.monotonic() < deadline:
        victim.loop(timeout=0.1)
    assert connected, "victim got no CONNACK"
    sock = victim.socket()
    sock.shutdown(socket.SHUT_RDWR)  # what the kernel does for a killed process: FIN, no DISCONNECT
    sock.close()
    [msg] = watcher.wait_for(1)
    assert (msg.topic, msg.payload) == (topic, b"offline")


def test_restart_keeps_retained(kind, broker, clients, base):
    """A retained message survives a graceful stop and start of the broker (Mosquitto's persistence file,
    RabbitMQ's DETS store in the node's data dir, NATS's JetStream store); restart time is logged."""
    topic = f"{base}/release"
    pub = clients(broker)
    pub.publish(topic, b"v7", retain=True)
    pub.close()
    began = time.monotonic()
    broker.restart()
    print(f"\n{kind}: restarted in {time.monotonic() - began:.2f}s")
    sub = clients(broker)
    sub.subscribe(topic)
    expected = [(b"v7", True)] if RETAINED_SURVIVES_RESTART[kind] else []
    got = sub.wait_for(1, timeout=WAIT if expected else 3.0)
    assert [(m.payload, m.retain) for m in got] == expected
