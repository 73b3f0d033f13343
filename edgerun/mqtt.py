"""edgerun's one MQTT connection, for devices and hubs alike: MQTT 5 (3.1.1 when the broker's CONNACK
refuses 5), TLS, persistent sessions, birth and last will, reconnects with jittered backoff.

paho's own reconnect has exponential backoff but no jitter, so the network loop runs here in one thread
(``client.loop()``, as ``loop_forever`` does) and waits ``uniform(0, min(cap, base * 2**n))`` between
attempts ("full jitter"): a fleet that lost its broker does not reconnect in lock-step.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgerun.contract import State
from edgerun.errors import EdgerunError

if TYPE_CHECKING:
    from edgerun.config import MqttConfig

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5  # seconds
BACKOFF_CAP = 30.0
SESSION_EXPIRY = 7 * 24 * 3600  # MQTT 5: the broker keeps our subscriptions and queued QoS 1 messages a week
UNSUPPORTED_PROTOCOL = 0x84  # CONNACK "Unsupported protocol version" (paho maps 3.1.1's return code 1 to it)
SUBSCRIBE_BATCH = 100  # topic filters per SUBSCRIBE packet
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
MessageHandler = Callable[[str, bytes, bool], None]


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 16))))


def background_priority(nice: int = 10) -> None:
    """Lower the calling thread's CPU priority so network work and hashing never slow requests down."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


@dataclass(frozen=True)
class Broker:
    """Where the broker is and how to log in; the password is read from a file or the environment first."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    protocol: str = "auto"  # "auto": MQTT 5, or 3.1.1 when the broker's CONNACK refuses 5; "5"; "3.1.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" + (" (TLS)" if self.tls else "")

    @classmethod
    def from_config(cls, cfg: "MqttConfig") -> "Broker":
        return cls(host=cfg.host, port=cfg.port, username=cfg.username, password=cfg.password(), tls=cfg.tls,
                   ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file, keepalive=cfg.keepalive,
                   protocol=cfg.protocol)

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


class _Collector:
    """Retained messages matching some filters, gathered for ``Connection.collect``."""

    def __init__(self, filters: list[str]):
        self.filters = filters
        self.got: dict[str, bytes] = {}
        self.last = time.monotonic()

    def offer(self, topic: str, payload: bytes, retained: bool) -> None:
        if any(mqtt.topic_matches_sub(f, topic) for f in self.filters):
            if retained:
                self.got[topic] = payload
            self.last = time.monotonic()


class Connection:
    """One MQTT connection kept up in a thread; ``on_connected`` runs in that thread after every (re)connect.

    With ``presence_topic`` the connection publishes a retained online ``State`` on connect and leaves the
    offline one as its last will; ``next_session`` numbers the connections so a stale will can be told apart.
    Used as a context manager it connects at once and raises ``EdgerunError`` when the broker cannot be used.
    """

    def __init__(self, broker: Broker, *, client_id: str | None = None, persistent: bool = True,
                 presence_topic: str | None = None, next_session: Callable[[], int] | None = None,
                 on_message: MessageHandler | None = None, on_connected: Callable[[], None] | None = None,
                 max_inflight: int = 50, background: bool = False, connect_timeout: float = 10.0,
                 session_expiry: int = SESSION_EXPIRY):
        if broker.protocol not in ("auto", *PROTOCOLS):
            raise EdgerunError(f"MQTT protocol {broker.protocol!r}: expected 'auto', '5' or '3.1.1'")
        self.broker = broker
        self.client_id = client_id or f"edgerun-{uuid.uuid4().hex[:12]}"
        self.persistent = persistent
        self.session_expiry = session_expiry
        self.presence_topic = presence_topic
        self._next_session = next_session or (lambda: self.session + 1)
        self._on_message = on_message
        self._on_connected = on_connected
        self.max_inflight = max_inflight
        self.background = background
        self.connect_timeout = connect_timeout
        self.session = 0
        self.protocol = self._first_protocol()
        self.connected = threading.Event()
        self._ready = threading.Event()  # connected, and on_connected (its subscriptions) has run
        self.last_error: str | None = None
        self._gave_up = threading.Event()  # an attempt failed: what a context manager reports at once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._connack_ok = False
        self._probe_ok = False
        self._refused: ReasonCode | None = None
        self._step = "normal"  # normal | probe311 | confirm5 | fallback311: see _choose_protocol
        self._collectors: list[_Collector] = []
        self._subacks: dict[int, threading.Event] = {}
        self._unacked: list[threading.Event] = []
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Connection":
        self._thread = threading.Thread(target=self._run, name="edgerun-mqtt", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Say offline (retained, when there is a presence topic), disconnect cleanly, end the thread."""
        self._stop.set()
        c = self._client
        if c is not None and self.connected.is_set():
            if self.presence_topic:
                try:
                    c.publish(self.presence_topic, State(False, self.session).to_payload(), qos=1,
                              retain=True).wait_for_publish(1.0)
                except (RuntimeError, ValueError):
                    pass
            c.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until connected; raise EdgerunError naming the broker and the reason when that fails."""
        deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
        while not self._ready.is_set():
            if self._gave_up.is_set() and not self.connected.is_set():
                raise EdgerunError(f"cannot use the MQTT broker at {self.broker.address}: {self.last_error}")
            if time.monotonic() > deadline:
                raise EdgerunError(f"the MQTT broker at {self.broker.address} did not answer within "
                                   f"{deadline - time.monotonic() + (timeout or self.connect_timeout):.0f}s")
            self._ready.wait(0.05)

    def __enter__(self) -> "Connection":
        self.start()
        try:
            self.wait_connected()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- messages ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Queue a message; QoS 1 messages published while offline are sent after the reconnect."""
        c = self._client
        if c is None:
            return None
        return c.publish(topic, payload, qos=qos, retain=retain)

    def wait(self, infos: Iterable[mqtt.MQTTMessageInfo | None], timeout: float = 60.0) -> None:
        """Wait until the broker acknowledged every message; raise EdgerunError when it does not in time."""
        deadline = time.monotonic() + timeout
        for info in infos:
            if info is None:
                raise EdgerunError(f"not connected to the MQTT broker at {self.broker.address}")
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise EdgerunError(f"the MQTT broker at {self.broker.address} did not take a message: "
                                   f"{exc}") from None
            if not info.is_published():
                raise EdgerunError(f"the MQTT broker at {self.broker.address} did not acknowledge every "
                                   f"message within {timeout:.0f}s")

    def subscribe(self, topics: list[str], *, wait: float | None = None) -> bool:
        """Subscribe (QoS 1); with ``wait``, block until the broker acknowledged. Offline, a no-op:
        the owner subscribes again in ``on_connected``."""
        c = self._client
        if c is None or not topics or not self.connected.is_set():
            return False
        events = []
        for i in range(0, len(topics), SUBSCRIBE_BATCH):
            rc, mid = c.subscribe([(t, 1) for t in topics[i:i + SUBSCRIBE_BATCH]])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                with self._lock:  # the SUBACK may have arrived before subscribe() returned its mid
                    events.append(self._subacks.setdefault(mid, threading.Event()))
                    self._unacked.append(events[-1])
        if wait is None:
            return True
        deadline = time.monotonic() + wait
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait for the SUBACK of every subscription made so far (retained messages come right after it)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending, self._unacked = self._unacked, []
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in pending)

    def unsubscribe(self, topics: list[str]) -> None:
        c = self._client
        if c is None or not topics or not self.connected.is_set():
            return
        for i in range(0, len(topics), SUBSCRIBE_BATCH):
            c.unsubscribe(topics[i:i + SUBSCRIBE_BATCH])

    def collect(self, filters: list[str], *, quiet: float = 0.5, timeout: float = 5.0) -> dict[str, bytes]:
        """Subscribe and gather the retained messages until none arrived for ``quiet`` seconds."""
        col = _Collector(filters)
        with self._lock:
            self._collectors.append(col)
        try:
            self.subscribe(filters, wait=self.connect_timeout)
            col.last = time.monotonic()
            end = time.monotonic() + timeout
            while time.monotonic() < end and time.monotonic() - col.last < quiet:
                time.sleep(0.02)
            self.unsubscribe(filters)
        finally:
            with self._lock:
                self._collectors.remove(col)
        return col.got

    # --- the network thread -----------------------------------------------------------------

    def _first_protocol(self) -> MQTTProtocolVersion:
        return PROTOCOLS.get(self.broker.protocol, MQTTProtocolVersion.MQTTv5)

    def _make_client(self) -> mqtt.Client:
        v5 = self.protocol == MQTTProtocolVersion.MQTTv5
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol,
                        clean_session=None if v5 else not self.persistent, reconnect_on_failure=False)
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            c.tls_set_context(self.broker.tls_context())
        c.max_inflight_messages_set(self.max_inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe
        return c

    def _connect(self, c: mqtt.Client) -> None:
        b = self.broker
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = self.session_expiry
            c.connect(b.host, b.port, b.keepalive, clean_start=not self.persistent, properties=props)
        else:
            c.connect(b.host, b.port, b.keepalive)

    def _run(self) -> None:
        if self.background:
            background_priority()  # a device's chunk writes happen in this thread
        attempt = 0
        while not self._stop.is_set():
            if self._client is None or self._client.protocol != self.protocol:
                self._client = self._make_client()
            c = self._client
            self.session = self._next_session()
            if self.presence_topic:
                c.will_set(self.presence_topic, State(False, self.session).to_payload(), qos=1, retain=True)
            self._connack_ok, self._refused, self._probe_ok = False, None, False
            outcome = "unreachable"
            try:
                self._connect(c)
                outcome = "dropped"
                while not self._stop.is_set():
                    if c.loop(timeout=0.5) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                    if self._connack_ok:
                        attempt = 0
                if self._connack_ok:
                    outcome = "connected"
                elif self._probe_ok:
                    outcome = "probe_ok"
                elif self._refused is not None:
                    outcome = "refused_protocol" if self._refused.value == UNSUPPORTED_PROTOCOL else "refused"
                else:
                    self.last_error = "the broker closed the connection before its CONNACK"
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"unreachable: {exc}"
                log.info("MQTT broker %s unreachable: %s", self.broker.address, exc)
            except Exception:  # a bug in a handler must not end the connection thread
                self.last_error = "the network loop failed"
                log.exception("MQTT network loop failed")
            self.connected.clear()
            self._ready.clear()
            if self._stop.is_set():
                break
            try:
                c.disconnect()
            except Exception:
                pass
            if self._choose_protocol(outcome):
                continue  # the next attempt is part of finding the version: no backoff
            if outcome != "connected" and self._step == "normal":
                self._gave_up.set()  # every version was tried: a context manager reports last_error
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("MQTT disconnected; reconnecting in %.1fs (attempt %d)", delay, attempt)
            self._stop.wait(delay)

    def _choose_protocol(self, outcome: str) -> bool:
        """Pick the version of the next attempt from how this one ended; True to retry at once.

        Only a CONNACK decides: MQTT 5 refused by the broker's CONNACK means 3.1.1. A socket closed before
        any CONNACK (a 3.1.1-only broker that does not answer 5 at all, or a load balancer in front of a
        restarting broker) is followed by a 3.1.1 probe; when the probe gets a CONNACK, MQTT 5 is asked once
        more at once, and 3.1.1 is used only when that is closed again. Every new connection after a loss
        starts from MQTT 5 again.
        """
        if self.broker.protocol != "auto":
            return False
        v5, v311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
        step, self._step = self._step, "normal"
        if outcome == "refused_protocol":
            if step in ("normal", "confirm5"):
                self.protocol, self._step = v311, "fallback311"
                log.info("the MQTT broker refused MQTT 5 in its CONNACK; using 3.1.1")
                return True
        elif outcome == "dropped":
            if step == "normal" and self.protocol == v5:
                self.protocol, self._step = v311, "probe311"
                return False
            if step == "confirm5":
                self.protocol, self._step = v311, "fallback311"
                log.info("the MQTT broker answers 3.1.1 and closes MQTT 5 connections; using 3.1.1")
                return True
        elif outcome == "probe_ok":
            self.protocol, self._step = v5, "confirm5"
            return True
        elif outcome == "connected" and step == "fallback311":
            pass  # the 3.1.1 connection was used until it was lost: the next one asks for 5 again
        self.protocol = v5
        return False

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s refused the connection: %s", self.broker.address, reason_code)
            self._refused = reason_code
            self.last_error = f"refused: {reason_code}"
            return
        if self._step == "probe311":
            self._probe_ok = True  # the broker speaks 3.1.1; whether it speaks 5 is asked next
            client.disconnect()
            return
        self._connack_ok = True
        self.last_error = None
        self.connected.set()
        log.info("MQTT connected to %s (%s, session %d, resumed=%s)", self.broker.address, self.protocol.name,
                 self.session, flags.session_present)
        if self.presence_topic:
            client.publish(self.presence_topic, State(True, self.session).to_payload(), qos=1, retain=True)
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:
                log.exception("MQTT on-connect handler failed")
        self._ready.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self._ready.clear()
        if not self._stop.is_set() and self._connack_ok:
            log.warning("MQTT connection lost: %s", reason_code)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self._subacks.setdefault(mid, threading.Event()).set()
            if len(self._subacks) > 4096:  # acknowledgements nobody waited for: drop the oldest half
                for k in list(self._subacks)[:2048]:
                    del self._subacks[k]

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        retained = bool(msg.retain)
        with self._lock:  # under the lock: once collect() has returned, its dict no longer changes
            for col in self._collectors:
                col.offer(msg.topic, msg.payload, retained)
        if self._on_message is None:
            return
        try:
            self._on_message(msg.topic, msg.payload, retained)
        except Exception:
            log.exception("handling MQTT message on %s failed", msg.topic)
