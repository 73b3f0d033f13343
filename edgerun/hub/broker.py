"""The hub's short-lived MQTT connection to the fleet's broker (publish, collect retained messages)."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgerun.errors import EdgerunError


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to log in (the password from a file or EDGERUN_MQTT_PASSWORD)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class HubClient:
    """A connected paho client with its network loop in a thread; use as a context manager."""

    def __init__(self, opts: BrokerOptions, *, timeout: float = 10.0):
        self.opts = opts
        self.timeout = timeout
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgerun-hub-{uuid.uuid4().hex[:12]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        if opts.username:
            self.client.username_pw_set(opts.username, opts.password)
        if opts.tls:
            ctx = ssl.create_default_context(cafile=str(opts.ca_file) if opts.ca_file else None)
            if opts.cert_file:
                ctx.load_cert_chain(str(opts.cert_file), str(opts.key_file) if opts.key_file else None)
            self.client.tls_set_context(ctx)
        self.client.max_inflight_messages_set(64)
        self._connected = threading.Event()
        self._refused: str | None = None
        self.client.on_connect = self._on_connect

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connected.set()

    def __enter__(self) -> "HubClient":
        try:
            self.client.connect(self.opts.host, self.opts.port, keepalive=30)
        except OSError as exc:
            raise EdgerunError(f"cannot reach the MQTT broker at {self.opts.host}:{self.opts.port}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(self.timeout) or self._refused:
            self.client.loop_stop()
            raise EdgerunError(f"MQTT broker {self.opts.host}:{self.opts.port} refused the connection: "
                               f"{self._refused or 'no answer'}")
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def wait(self, infos: list[mqtt.MQTTMessageInfo], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or max(self.timeout, 60))
        for info in infos:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait(info, left):
                raise EdgerunError("the broker did not acknowledge every message in time")

    def collect(self, topics: list[str], *, quiet: float = 0.5, timeout: float = 5.0) -> dict[str, bytes]:
        """Subscribe and gather the retained messages until none arrived for ``quiet`` seconds."""
        got: dict[str, bytes] = {}
        last = [time.monotonic()]

        def on_message(client, userdata, msg):
            if msg.retain:
                got[msg.topic] = msg.payload
            last[0] = time.monotonic()

        self.client.on_message = on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        done.wait(self.timeout)
        last[0] = time.monotonic()
        end = time.monotonic() + timeout
        while time.monotonic() < end and time.monotonic() - last[0] < quiet:
            time.sleep(0.05)
        self.client.unsubscribe(topics)
        self.client.on_message = None
        return got


def _wait(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        return False
    return info.is_published()
