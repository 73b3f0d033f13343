"""The device's MQTT connection: MQTT 5 (3.1.1 fallback), persistent session, TLS, birth/will, backoff with jitter.

paho's own reconnect has exponential backoff but no jitter, so this module runs the network loop itself in
one thread (``client.loop()`` as ``loop_forever`` does) and waits ``uniform(0, min(cap, base * 2**n))``
between attempts ("full jitter"): a fleet that lost its broker does not reconnect in lock-step.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgerun.config import MqttConfig

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5  # seconds
BACKOFF_CAP = 30.0
SESSION_EXPIRY = 7 * 24 * 3600  # MQTT 5: the broker keeps our subscriptions and queued QoS 1 messages a week
UNSUPPORTED_PROTOCOL = 0x84  # CONNACK reason "Unsupported protocol version" (3.1.1's return code 1)
MessageHandler = Callable[[str, bytes, bool], None]


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 16))))


def state_payload(online: bool, session: int) -> bytes:
    return json.dumps({"online": online, "session": session, "ts": time.time()}).encode()


class Connection:
    """One device connection; ``on_connected`` runs (in the network thread) after every (re)connect."""

    def __init__(self, cfg: MqttConfig, *, client_id: str, state_topic: str, next_session: Callable[[], int],
                 on_message: MessageHandler, on_connected: Callable[[], None]):
        self.cfg = cfg
        self.client_id = client_id
        self.state_topic = state_topic
        self._next_session = next_session
        self._on_message = on_message
        self._on_connected = on_connected
        self.session = 0
        self.protocol = MQTTProtocolVersion.MQTTv5
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._connack_ok = False
        self._refused: ReasonCode | None = None

    # --- public -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgerun-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Say offline (retained), disconnect cleanly and end the network thread."""
        self._stop.set()
        c = self._client
        if c is not None and self.connected.is_set():
            try:
                c.publish(self.state_topic, state_payload(False, self.session), qos=1, retain=True).wait_for_publish(1.0)
            except (RuntimeError, ValueError):
                pass
            c.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; QoS 1 messages published while offline are sent after the reconnect."""
        c = self._client
        if c is None:
            return
        c.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topics: list[str]) -> None:
        c = self._client
        if c is None or not topics or not self.connected.is_set():
            return  # on_connected subscribes again
        for i in range(0, len(topics), 100):
            c.subscribe([(t, 1) for t in topics[i:i + 100]])

    def unsubscribe(self, topics: list[str]) -> None:
        c = self._client
        if c is None or not topics or not self.connected.is_set():
            return
        for i in range(0, len(topics), 100):
            c.unsubscribe(topics[i:i + 100])

    # --- the network thread -----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        v5 = self.protocol == MQTTProtocolVersion.MQTTv5
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol,
                        clean_session=None if v5 else False, reconnect_on_failure=False)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, self.cfg.password())
        if self.cfg.tls:
            ctx = ssl.create_default_context(cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None)
            if self.cfg.cert_file:
                ctx.load_cert_chain(str(self.cfg.cert_file), str(self.cfg.key_file) if self.cfg.key_file else None)
            c.tls_set_context(ctx)
        c.max_inflight_messages_set(50)
        c.max_queued_messages_set(0)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        return c

    def _run(self) -> None:
        from edgerun.agent.agent import background_priority

        background_priority()  # chunk writes happen in this thread
        attempt = 0
        while not self._stop.is_set():
            if self._client is None:
                self._client = self._make_client()
            c = self._client
            self.session = self._next_session()
            c.will_set(self.state_topic, state_payload(False, self.session), qos=1, retain=True)
            self._connack_ok, self._refused = False, None
            tcp_ok = False
            try:
                if self.protocol == MQTTProtocolVersion.MQTTv5:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = SESSION_EXPIRY
                    c.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive, clean_start=False,
                              properties=props)
                else:
                    c.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive)
                tcp_ok = True
                while not self._stop.is_set():
                    rc = c.loop(timeout=0.5)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                    if self._connack_ok:
                        attempt = 0
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.info("MQTT broker %s:%d unreachable: %s", self.cfg.host, self.cfg.port, exc)
            except Exception:  # a bug in a handler must not end the connection thread
                log.exception("MQTT network loop failed")
            was_connected = self.connected.is_set()
            self.connected.clear()
            if self._stop.is_set():
                break
            try:
                c.disconnect()
            except Exception:
                pass
            if tcp_ok and not self._connack_ok and not was_connected and \
                    (self._refused is None or self._refused.value == UNSUPPORTED_PROTOCOL):
                # the broker closed without a CONNACK, or refused the protocol version: try the other one
                # (a refusal for another reason, e.g. a wrong password, keeps the version)
                self.protocol = (MQTTProtocolVersion.MQTTv311 if self.protocol == MQTTProtocolVersion.MQTTv5
                                 else MQTTProtocolVersion.MQTTv5)
                log.info("MQTT connection refused; next attempt with %s", self.protocol.name)
                self._client = None
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("MQTT disconnected; reconnecting in %.1fs (attempt %d)", delay, attempt)
            self._stop.wait(delay)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection: %s", reason_code)
            self._refused = reason_code
            return
        self._connack_ok = True
        self.connected.set()
        log.info("MQTT connected to %s:%d (%s, session %d, resumed=%s)", self.cfg.host, self.cfg.port,
                 self.protocol.name, self.session, flags.session_present)
        client.publish(self.state_topic, state_payload(True, self.session), qos=1, retain=True)
        try:
            self._on_connected()
        except Exception:
            log.exception("MQTT on-connect handler failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT connection lost: %s", reason_code)

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(msg.topic, msg.payload, bool(msg.retain))
        except Exception:
            log.exception("handling MQTT message on %s failed", msg.topic)
