"""Private RabbitMQ (MQTT plugin) and NATS (MQTT listener) brokers for tests, with the interface of `Mosquitto`.

Each object starts its own broker process on free 127.0.0.1 ports, with config, data and logs under ``workdir``,
and never touches the system-wide services. ``start()`` returns once an MQTT 3.1.1 CONNECT gets a successful CONNACK.

>>> with start_broker("rabbitmq", tmp_path) as broker:   # doctest: +SKIP
...     broker.url; broker.restart()
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
import weakref
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgerun.testing.mosquitto import Mosquitto, find_mosquitto, free_port

log = logging.getLogger(__name__)

# The Debian /usr/sbin/rabbitmq-server is a wrapper that, run as root, `su`s to the rabbitmq user: HOME (so the
# Erlang cookie) becomes /var/lib/rabbitmq and a root-only workdir is unreadable. The real scripts come first.
RABBITMQ_PATHS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/local/sbin/rabbitmq-server",
                  "/opt/homebrew/sbin/rabbitmq-server", "/usr/sbin/rabbitmq-server")
NATS_PATHS = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server",
              "/opt/homebrew/bin/nats-server")


def _first_executable(paths: tuple[str, ...], name: str, *, prefer_paths: bool) -> str | None:
    found = shutil.which(name)
    candidates = (*paths, found) if prefer_paths else (found, *paths)
    return next((p for p in candidates if p and os.access(p, os.X_OK)), None)


def find_rabbitmq() -> str | None:
    """The rabbitmq-server start script (not the Debian su wrapper), or None."""
    return _first_executable(RABBITMQ_PATHS, "rabbitmq-server", prefer_paths=True)


def find_nats() -> str | None:
    """The nats-server binary, or None."""
    return _first_executable(NATS_PATHS, "nats-server", prefer_paths=False)


def mqtt_connack(port: int, *, protocol: int = mqtt.MQTTv311, timeout: float = 2.0) -> ReasonCode | None:
    """One CONNECT to 127.0.0.1:port: the CONNACK's reason code, or None if the broker sent none."""
    codes: list[ReasonCode] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgerun-probe-{uuid.uuid4().hex[:12]}",
                         protocol=protocol)
    client.on_connect = lambda _c, _u, _flags, code, _props: codes.append(code)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    try:
        while not codes and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    finally:
        client.disconnect()
    return codes[0] if codes else None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left in the child's process group, reap the child, wait until the group is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _BrokerProcess:
    """A broker child in its own process group; whatever is left of the group is killed on stop and at exit."""

    kind = "broker"

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / f"{self.kind}.log"
        self.console_path = self.workdir / f"{self.kind}.console.log"
        self.started_in: float | None = None  # seconds the last start() took, until the first CONNACK
        self.proc: subprocess.Popen | None = None
        self._reap: weakref.finalize | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def start(self, timeout: float = 60.0) -> "_BrokerProcess":
        """Start the broker and wait until an MQTT CONNECT on `port` gets a successful CONNACK."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        began = time.monotonic()
        with open(self.console_path, "ab") as console:
            self.proc = subprocess.Popen(self._command(), env=self._env(), cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._reap = weakref.finalize(self, _kill_group, self.proc)
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        log.info("%s on port %d ready in %.2fs", self.kind, self.port, self.started_in)
        return self

    def _wait_ready(self, deadline: float) -> None:
        last: ReasonCode | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: "
                                   f"{_tail(self.console_path)}\n(log: {self.log_path})")
            last = mqtt_connack(self.port, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if last is not None and not last.is_failure:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} gave no successful CONNACK on port {self.port} (last: {last}); "
                           f"log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful shutdown that flushes the broker's stores), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs, killing it", self.kind, timeout)
        if self._reap is not None:
            self._reap()  # also a beam.smp whose start script is gone
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "_BrokerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RabbitMq(_BrokerProcess):
    """A private RabbitMQ node with the MQTT plugin (3.1/3.1.1 only before RabbitMQ 3.13), anonymous login as guest.

    Retained messages live in the plugin's DETS store, a file in the node's data (mnesia) dir, so they survive
    ``restart()``: ``stop()`` is a graceful shutdown that closes the store (a crash loses up to its 2 s auto-save).
    RabbitMQ sends them only to subscriptions of the exact topic, never to wildcard filters. Sessions with
    clean_session=False are durable queues there too, with their QoS 1 messages. All of it is keyed by the node
    name, so a new object on the same workdir starts empty unless given the same ``node_name``.
    """

    kind = "rabbitmq"

    def __init__(self, workdir: Path, port: int | None = None, *, node_name: str | None = None):
        binary = find_rabbitmq()
        if binary is None:
            raise RuntimeError("rabbitmq-server not found (apt install rabbitmq-server)")
        super().__init__(workdir, port)
        self.binary = binary
        self.ctl_binary = str(Path(binary).with_name("rabbitmqctl"))
        self.node = node_name or f"edgerun-test-{secrets.token_hex(4)}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.data_dir = self.workdir / "data"
        self.log_dir = self.workdir / "log"
        self.config_path = self.workdir / "rabbitmq.conf"
        self.plugins_file = self.workdir / "enabled_plugins"
        for d in (self.data_dir, self.log_dir):
            d.mkdir(exist_ok=True)
        self.plugins_file.write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
        cookie = self.workdir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        self.config_path.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "mqtt.default_user = guest\n"
            "mqtt.default_pass = guest\n"
            "mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_dets\n"
            f"log.file = {self.log_path}\n"
            "log.file.level = info\n"
            "log.console = false\n")

    def _command(self) -> list[str]:
        return [self.binary]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RABBITMQ_") and k not in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS")}
        w = self.workdir
        env.update({
            "HOME": str(w),  # the Erlang cookie: $HOME/.erlang.cookie, for the node and for rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.config_path),
            "RABBITMQ_CONFIG_FILES": str(w / "conf.d" / "*.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
            "RABBITMQ_MNESIA_BASE": str(self.data_dir),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(w / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run rabbitmqctl against this node (same HOME, so the same cookie) and return its output."""
        done = subprocess.run([self.ctl_binary, "-n", self.node, *args], env=self._env(), cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, check=True)
        return done.stdout


class NatsMqtt(_BrokerProcess):
    """A private nats-server with JetStream and its MQTT listener (MQTT 3.1.1 only), no authentication.

    Sessions, QoS 1 messages and retained messages are JetStream streams in ``store_dir``, so they survive
    ``restart()``; retained messages are also sent to matching wildcard subscriptions.
    """

    kind = "nats"

    def __init__(self, workdir: Path, port: int | None = None):
        binary = find_nats()
        if binary is None:
            raise RuntimeError("nats-server not found (apt install nats-server)")
        super().__init__(workdir, port)
        self.binary = binary
        self.client_port = free_port()
        self.server_name = f"edgerun-test-{secrets.token_hex(4)}"  # the MQTT listener requires one
        self.store_dir = self.workdir / "jetstream"
        self.config_path = self.workdir / "nats.conf"
        self.config_path.write_text(
            f'server_name: "{self.server_name}"\n'
            f'listen: "127.0.0.1:{self.client_port}"\n'
            f'log_file: "{self.log_path}"\n'
            f'pid_file: "{self.workdir / "nats.pid"}"\n'
            f'jetstream {{\n  store_dir: "{self.store_dir}"\n}}\n'
            f'mqtt {{\n  listen: "127.0.0.1:{self.port}"\n}}\n')

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]


BROKERS: dict[str, type] = {"mosquitto": Mosquitto, "rabbitmq": RabbitMq, "nats": NatsMqtt}
_FINDERS = {"mosquitto": find_mosquitto, "rabbitmq": find_rabbitmq, "nats": find_nats}


def find_broker(kind: str) -> str | None:
    """The binary behind a broker kind, or None when it is not installed."""
    return _FINDERS[kind]()


def start_broker(kind: str, workdir: Path, port: int | None = None) -> Mosquitto | RabbitMq | NatsMqtt:
    """A started broker of `kind` ("mosquitto", "rabbitmq" or "nats") in `workdir`."""
    if kind not in BROKERS:
        raise ValueError(f"unknown broker kind {kind!r}, expected one of {', '.join(BROKERS)}")
    return BROKERS[kind](workdir, port).start()
