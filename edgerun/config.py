"""edgerun's configuration: one TOML file, ``EDGERUN_*`` environment overrides, then CLI flags."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgerun.contract import valid_name
from edgerun.errors import ConfigError
from edgerun.tomlfile import Table, read_toml
from edgerun.units import parse_size

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/edgerun/edgerun.toml")
DEFAULT_STATE_DIR = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/edgerun").split(":")[0])


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching for one model: off unless the model has a dynamic batch dimension."""

    enabled: bool | None = None  # None: on when the model's first input dim is dynamic
    max_batch_size: int = 32
    max_queue_delay_us: int = 500


@dataclass(frozen=True)
class ModelConfig:
    """One model to serve from a local package directory."""

    path: Path
    name: str | None = None  # defaults to the package's name
    variant: str | None = None
    backend: str | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_inflight: int = 4  # concurrent runs of this model
    # runs measured shorter than this go on the event loop, not a thread (0: never; None: 200, or 1000 when the
    # server may use one CPU only, see edgerun.serving.batching.policy_for)
    inline_below_us: int | None = None
    max_queue: int = 256  # waiting requests before 503
    tune: str | None = None  # overrides tuning.mode for this model: "off", "first" or "every"
    tune_budget: float | None = None  # overrides tuning.budget for this model (seconds)


@dataclass(frozen=True)
class ServerConfig:
    """The local inference HTTP server."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    uds: Path | None = None
    token_file: Path | None = None  # bearer token (the admin scope); env EDGERUN_API_TOKEN also works
    tokens_file: Path | None = None  # named, scoped tokens as SHA-256 hashes (edgerun token create); re-read on SIGHUP
    max_body: int = 64 << 20
    max_body_total: int = 128 << 20  # request-body bytes held at once, across connections
    max_connections: int = 256
    header_timeout: float = 10.0  # seconds for a request's line and headers
    body_timeout: float = 10.0  # seconds over which a body must keep up body_min_rate
    body_min_rate: int = 16 << 10  # bytes per second
    idle_timeout: float = 30.0  # seconds a connection may wait for its next request
    drain_timeout: float = 30.0
    allow_insecure: bool = False  # allow a non-loopback host without a token or client certificates (logged loudly)
    grpc_port: int = 8001  # KServe v2 gRPC on the same host; 0 turns it off
    grpc_frontend: str = "auto"  # the gRPC server: "loop" (on the event loop, nghttp2), "native" (gRPC's C++ server),
    # "grpcio", or "auto" (the first of them built)
    grpc_workers: int = 32  # grpcio's server: calls handled at once (an open ModelStreamInfer stream holds one)
    repository_dir: Path | None = None  # packages the repository extension may load and unload (needs a token)
    tls_cert_file: Path | None = None  # serve HTTPS and gRPC over TLS with this certificate (PEM)
    tls_key_file: Path | None = None  # its private key (PEM, not encrypted)
    tls_client_ca_file: Path | None = None  # require client certificates signed by this CA (mutual TLS)

    def token(self) -> str | None:
        """The bearer token, from EDGERUN_API_TOKEN or token_file; None when not configured."""
        env = os.environ.get("EDGERUN_API_TOKEN")
        if env:
            return env.strip()
        if self.token_file:
            try:
                return self.token_file.read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read token file: {exc}", key="server.token_file") from None
        return None

    def has_tokens(self) -> bool:
        """Whether requests need a bearer token: the API token or a tokens file is configured."""
        return self.tokens_file is not None or bool(self.token())

    def mutual_tls(self) -> bool:
        """Whether every client must present a certificate from ``tls_client_ca_file``."""
        return self.tls_cert_file is not None and self.tls_client_ca_file is not None


@dataclass(frozen=True)
class MqttConfig:
    """The connection to the fleet's broker and the device's identity in it."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "default"
    device_id: str = field(default_factory=lambda: os.uname().nodename)
    username: str | None = None
    password_file: Path | None = None  # env EDGERUN_MQTT_PASSWORD also works
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    protocol: str = "auto"  # "auto" (MQTT 5, or 3.1.1 when the broker's CONNACK refuses 5), "5" or "3.1.1"
    tags: dict[str, str] = field(default_factory=dict)  # reported in status; hubs select devices by them
    trusted_keys: Path | None = None  # directory of <key_id>.pub (Ed25519, PEM or raw base64)
    clock_skew: int = 300  # seconds of tolerance on a manifest's "expires"
    unload_first: bool = False  # when old and new versions don't both fit: unload first (short outage)
    stall_timeout: int = 600  # seconds without a new chunk (while connected) before a download fails as stalled

    def password(self) -> str | None:
        env = os.environ.get("EDGERUN_MQTT_PASSWORD")
        if env:
            return env
        if self.password_file:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read password file: {exc}", key="mqtt.password_file") from None
        return None


TUNING_MODES = ("off", "first", "every")
GRPC_FRONTENDS = ("auto", "loop", "native", "grpcio")  # server.grpc_frontend (edgerun.grpc.server chooses)


@dataclass(frozen=True)
class TuningConfig:
    """On-device tuning when a model version starts serving (docs/tuning.md)."""

    mode: str = "every"  # off; first: only the first version of a model served here; every: every new version
    budget: float = 30.0  # seconds of measuring per model
    candidate_timeout: float = 20.0  # seconds a candidate may take to load, or to answer one batch of runs
    defer_load: float = 0.75  # wait while the 1-minute load average per core is above this (0: never wait)
    max_defer: float = 600.0  # seconds to wait for a quieter moment before tuning anyway


@dataclass(frozen=True)
class Config:
    """Everything ``edgerun serve`` needs."""

    state_dir: Path = DEFAULT_STATE_DIR
    profile: str | None = None
    memory_budget: str | None = None
    threads: int | None = None
    log_level: str = "INFO"
    device_key_file: Path | None = None  # the device's age key; default {state_dir}/device.key, made on first start
    fleet_key_file: Path | None = None  # an age key shared by the fleet, for releases encrypted to @fleet
    models: tuple[ModelConfig, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    source: str | None = None  # the file read, if any
    overrides: tuple[str, ...] = ()  # the EDGERUN_* variables applied on top of it


def _dataclass_from_table(cls: type, t: Table, converters: dict[str, Any] | None = None) -> Any:
    """Build a config dataclass from a TOML table, checking types against the dataclass defaults."""
    converters = converters or {}
    names = [f.name for f in fields(cls) if f.name not in ("source", "overrides")]
    t.only(*names)
    kwargs: dict[str, Any] = {}
    defaults = cls()  # type: ignore[call-arg]
    for name in names:
        if name not in t.data:
            continue
        if name in converters:
            kwargs[name] = converters[name](t, name)
            continue
        default = getattr(defaults, name)
        if isinstance(default, bool):
            kwargs[name] = t.get(name, bool)
        elif isinstance(default, int):
            kwargs[name] = t.get(name, int)
        elif isinstance(default, float):
            kwargs[name] = t.get(name, float)
        elif isinstance(default, Path) or name.endswith(("_file", "_dir", "keys")) or name == "uds":
            kwargs[name] = Path(t.get(name, str))
        else:
            kwargs[name] = t.get(name, str)
    return cls(**kwargs)


def _path(t: Table, name: str) -> Path | None:
    value = t.get(name, str, None)
    return None if value is None else Path(value)


def _size(t: Table, name: str) -> int:
    value = t.get(name, (str, int))
    try:
        return parse_size(value)
    except ValueError as exc:
        raise t.fail(name, str(exc)) from None


def _tags(t: Table, name: str) -> dict[str, str]:
    """``tags = {site = "berlin", line = "3"}``, or ``site=berlin,line=3`` from the environment."""
    value = t.get(name, (dict, str))
    if isinstance(value, str):
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise t.fail(name, f"expected key=value pairs separated by commas, got {value!r}")
        value = {k.strip(): v.strip() for k, _, v in pairs}
    out = {}
    for k, v in value.items():
        if not valid_name(k):
            raise t.fail(f"{name}.{k}", "a tag name is letters, digits, '.', '_' or '-'")
        if not isinstance(v, (str, int, bool)) or isinstance(v, float):
            raise t.fail(f"{name}.{k}", f"expected a string, got {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _inline_below(value: int | None) -> int | None:
    return None if value is None else max(0, value)


def _model(t: Table, base: Path) -> ModelConfig:
    t.only("path", "name", "variant", "backend", "batching", "max_inflight", "max_queue", "inline_below_us", "tune",
           "tune_budget")
    path = Path(t.get("path", str, required=True))
    if not path.is_absolute():
        path = base / path
    b = t.table("batching")
    batching = (_dataclass_from_table(BatchingConfig, b, {"enabled": lambda tt, n: tt.get(n, bool)}) if b.data
                else BatchingConfig())
    for key in ("max_inflight", "max_queue"):
        if key in t.data and t.get(key, int) < 1:
            raise t.fail(key, "expected a positive integer")
    tune = t.get("tune", str, None)
    if tune is not None and tune not in TUNING_MODES:
        raise t.fail("tune", f"expected \"off\", \"first\" or \"every\", got {tune!r}")
    tune_budget = t.get("tune_budget", (int, float), None)
    if tune_budget is not None and tune_budget <= 0:
        raise t.fail("tune_budget", f"expected seconds > 0, got {tune_budget!r}")
    return ModelConfig(path=path, name=t.get("name", str, None), variant=t.get("variant", str, None),
                       backend=t.get("backend", str, None), batching=batching,
                       max_inflight=t.get("max_inflight", int, 4), max_queue=t.get("max_queue", int, 256),
                       inline_below_us=_inline_below(t.get("inline_below_us", int, None)), tune=tune,
                       tune_budget=None if tune_budget is None else float(tune_budget))


def parse_config(data: dict[str, Any], source: str | None = None, base: Path | None = None) -> Config:
    """Check and build a Config from a parsed TOML document."""
    t = Table(data, source)
    t.only("state_dir", "profile", "memory_budget", "threads", "log_level", "device_key_file", "fleet_key_file",
           "models", "server", "mqtt", "tuning")
    base = base or Path.cwd()
    for section, key, where in (("server", "token", "server.token_file or EDGERUN_API_TOKEN"),
                                ("server", "api_token", "server.token_file or EDGERUN_API_TOKEN"),
                                ("mqtt", "password", "mqtt.password_file or EDGERUN_MQTT_PASSWORD")):
        if isinstance(data.get(section), dict) and key in data[section]:
            raise t.fail(f"{section}.{key}", f"secrets are not read from the config file itself; use {where}")
    server = _dataclass_from_table(ServerConfig, t.table("server"),
                                   {"max_body": _size, "max_body_total": _size, "body_min_rate": _size})
    mqtt = _dataclass_from_table(MqttConfig, t.table("mqtt"), {"tags": _tags})
    seconds = {k: (lambda tt, n: float(tt.get(n, (int, float)))) for k in ("budget", "candidate_timeout", "defer_load",
                                                                          "max_defer")}
    tuning = _dataclass_from_table(TuningConfig, t.table("tuning"), seconds)
    if tuning.mode not in TUNING_MODES:
        raise t.fail("tuning.mode", f"expected \"off\", \"first\" or \"every\", got {tuning.mode!r}")
    if server.grpc_frontend not in GRPC_FRONTENDS:
        raise t.fail("server.grpc_frontend",
                     f"expected \"auto\", \"loop\", \"native\" or \"grpcio\", got {server.grpc_frontend!r}")
    if mqtt.protocol not in ("auto", "5", "3.1.1"):
        raise t.fail("mqtt.protocol", f"expected \"auto\", \"5\" or \"3.1.1\", got {mqtt.protocol!r}")
    for key, value, low, high, what in (
            ("server.port", server.port, 1, 65535, "a port number 1-65535"),
            ("server.grpc_port", server.grpc_port, 0, 65535, "a port number 1-65535, or 0 for no gRPC"),
            ("mqtt.port", mqtt.port, 1, 65535, "a port number 1-65535"),
            ("server.max_body", server.max_body, 1, None, "a size above 0, e.g. \"64MiB\""),
            ("server.max_body_total", server.max_body_total, 1, None, "a size above 0, e.g. \"128MiB\""),
            ("server.max_connections", server.max_connections, 1, None, "a positive number of connections"),
            ("server.grpc_workers", server.grpc_workers, 1, None, "a positive number of calls"),
            ("server.header_timeout", server.header_timeout, 0.001, None, "seconds > 0"),
            ("server.body_timeout", server.body_timeout, 0.001, None, "seconds > 0"),
            ("server.idle_timeout", server.idle_timeout, 0.001, None, "seconds > 0"),
            ("server.drain_timeout", server.drain_timeout, 0, None, "seconds >= 0"),
            ("mqtt.keepalive", mqtt.keepalive, 1, 65535, "seconds 1-65535"),
            ("mqtt.clock_skew", mqtt.clock_skew, 0, None, "seconds >= 0"),
            ("mqtt.stall_timeout", mqtt.stall_timeout, 1, None, "seconds >= 1"),
            ("tuning.budget", tuning.budget, 0.001, None, "seconds > 0"),
            ("tuning.candidate_timeout", tuning.candidate_timeout, 0.001, None, "seconds > 0"),
            ("tuning.defer_load", tuning.defer_load, 0, None, "a load per core >= 0 (0: never wait)"),
            ("tuning.max_defer", tuning.max_defer, 0, None, "seconds >= 0"),
            ("threads", t.get("threads", int, None), 1, None, "a positive number of threads")):
        if value is not None and (value < low or (high is not None and value > high)):
            raise t.fail(key, f"expected {what}, got {value!r}")
    level = t.get("log_level", str, "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise t.fail("log_level", f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return Config(state_dir=Path(t.get("state_dir", str, str(DEFAULT_STATE_DIR))),
                  profile=t.get("profile", str, None), memory_budget=t.get("memory_budget", str, None),
                  threads=t.get("threads", int, None), log_level=level,
                  device_key_file=_path(t, "device_key_file"), fleet_key_file=_path(t, "fleet_key_file"),
                  models=tuple(_model(m, base) for m in t.tables("models")),
                  server=server, mqtt=mqtt, tuning=tuning, source=source)


# EDGERUN_<SECTION>_<KEY> (or EDGERUN_<KEY> for top-level keys) override the file.
ENV_PREFIX = "EDGERUN_"
_SECRET_ENV = {"EDGERUN_API_TOKEN", "EDGERUN_MQTT_PASSWORD"}
# "64MiB" or bytes, as in the file: parse_config converts them
_SIZE_KEYS = {"server.max_body", "server.max_body_total", "server.body_min_rate"}


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The overrides as TOML-like data, and which variable set each dotted key."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    sections = {"SERVER": ("server", ServerConfig), "MQTT": ("mqtt", MqttConfig), "TUNING": ("tuning", TuningConfig)}
    top = {f.name.upper(): f.name for f in fields(Config)
           if f.name not in ("models", "server", "mqtt", "tuning", "source", "overrides")}
    for key, value in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or key in _SECRET_ENV:
            continue
        rest = key[len(ENV_PREFIX):]
        section, _, sub = rest.partition("_")
        if section in sections and sub:
            name, cls = sections[section]
            names = {f.name.upper(): f.name for f in fields(cls)}
            if sub not in names:
                log.warning("ignoring %s: %s has no key %r", key, name, sub.lower())
                continue
            dotted = f"{name}.{names[sub]}"
            out.setdefault(name, {})[names[sub]] = (value if dotted in _SIZE_KEYS
                                                    else _coerce(key, value, getattr(cls(), names[sub])))
            origin[dotted] = key
        elif rest in top:
            default = 0 if top[rest] == "threads" else getattr(Config(), top[rest])
            out[top[rest]] = _coerce(key, value, default)
            origin[top[rest]] = key
    return out, origin


def _coerce(var: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        v = value.strip().lower()
        if v not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"environment variable {var}: expected true or false (1/0, yes/no), got {value!r}")
        return v in ("1", "true", "yes", "on")
    for kind, what in ((int, "an integer"), (float, "a number")):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise ConfigError(f"environment variable {var}: expected {what}, got {value!r}") from None
    return value


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None,
                required: bool = False) -> Config:
    """The effective configuration: file (if any), then environment overrides."""
    environ = dict(os.environ if environ is None else environ)
    explicit = path is not None or bool(environ.get("EDGERUN_CONFIG"))
    path = Path(path or environ.get("EDGERUN_CONFIG") or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    source = None
    if path.exists():
        data = read_toml(path)
        source = str(path)
    elif explicit or required:
        raise ConfigError("file not found", file=str(path))
    env, origin = _env_overrides(environ)
    for key, value in env.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    try:
        config = parse_config(data, source=source, base=path.parent if source else Path.cwd())
    except ConfigError as exc:
        var = origin.get(exc.key or "")
        if var is None:
            raise
        detail = str(exc).split(": ", 1)[1] if exc.file or exc.key else str(exc)
        raise ConfigError(f"environment variable {var} (key '{exc.key}'): {detail}") from None
    return replace(config, overrides=tuple(sorted(set(origin.values()))))


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy with CLI flags applied (None means "not given")."""
    top = {k: v for k, v in changes.items() if v is not None and "." not in k}
    server = {k.split(".", 1)[1]: v for k, v in changes.items() if v is not None and k.startswith("server.")}
    mqtt = {k.split(".", 1)[1]: v for k, v in changes.items() if v is not None and k.startswith("mqtt.")}
    return replace(config, **top, server=replace(config.server, **server), mqtt=replace(config.mqtt, **mqtt))


# --- checking and showing ----------------------------------------------------------------------

def check_config(config: Config) -> None:
    """What loading cannot see: model packages, secret files and the budget; raises the first problem."""
    from edgerun.package import PACKAGE_FILE, ModelPackage
    from edgerun.units import parse_budget

    src = config.source
    for i, m in enumerate(config.models):
        if m.path.is_file() and m.path.name != PACKAGE_FILE:
            _check_model_file(m.path, src, f"models[{i}].path")
            continue
        if not m.path.is_dir():
            raise ConfigError(f"expected a model package directory or a model file, but {m.path} does not exist "
                              "or is neither", file=src, key=f"models[{i}].path")
        try:
            ModelPackage.load(m.path)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"not a valid model package: {exc}", file=src, key=f"models[{i}].path") from None
    for key, path in (("server.token_file", config.server.token_file),
                      ("server.tokens_file", config.server.tokens_file),
                      ("server.tls_cert_file", config.server.tls_cert_file),
                      ("server.tls_key_file", config.server.tls_key_file),
                      ("server.tls_client_ca_file", config.server.tls_client_ca_file),
                      ("mqtt.password_file", config.mqtt.password_file),
                      ("mqtt.ca_file", config.mqtt.ca_file), ("mqtt.cert_file", config.mqtt.cert_file),
                      ("mqtt.key_file", config.mqtt.key_file)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"expected a readable file, cannot read {path}", file=src, key=key)
    _check_access(config)
    for key in ("device_key_file", "fleet_key_file"):
        path = getattr(config, key)
        if path is not None:
            from edgerun.devicekey import read_key_file
            from edgerun.errors import DeviceKeyError

            try:
                read_key_file(path)
            except DeviceKeyError as exc:
                raise ConfigError(str(exc), file=src, key=key) from None
    if config.mqtt.enabled and config.mqtt.trusted_keys is None:
        raise ConfigError("MQTT updates are on but no trusted_keys directory is set: every release would be "
                          "rejected", file=src, key="mqtt.trusted_keys")
    if config.mqtt.enabled and config.mqtt.trusted_keys is not None:
        from edgerun.manifest import read_trusted_keys

        if not config.mqtt.trusted_keys.is_dir():
            raise ConfigError(f"expected a directory of <key_id>.pub files, {config.mqtt.trusted_keys} is not one",
                              file=src, key="mqtt.trusted_keys")
        keys, problems = read_trusted_keys(config.mqtt.trusted_keys)
        if problems:
            raise ConfigError(f"not a usable release-signing key: {problems[0]}", file=src, key="mqtt.trusted_keys")
        if not keys:
            raise ConfigError(f"no <key_id>.pub file in {config.mqtt.trusted_keys}: every release would be "
                              f"rejected (copy the hub's public key there: edgerun hub pubkey KEY > DIR/ID.pub)",
                              file=src, key="mqtt.trusted_keys")
    if config.mqtt.enabled:
        from edgerun.contract import valid_name

        for key, value in (("fleet", config.mqtt.fleet), ("device_id", config.mqtt.device_id)):
            if not valid_name(value):
                raise ConfigError(f"expected letters, digits, '.', '_' or '-' (one MQTT topic level), got {value!r}",
                                  file=src, key=f"mqtt.{key}")
    if config.memory_budget is not None:
        try:
            parse_budget(config.memory_budget, 1 << 30)
        except ValueError as exc:
            raise ConfigError(f"expected a size or a percentage, e.g. \"512MiB\" or \"60%\": {exc}",
                              file=src, key="memory_budget") from None


def _check_access(config: Config) -> None:
    """The tokens file's entries and the TLS files, as ``edgerun serve`` checks them at start."""
    from edgerun.serving.access import Access
    from edgerun.serving.tls import server_tls

    for check in (Access.from_config, server_tls):
        try:
            check(config.server)
        except ConfigError as exc:
            if exc.file is not None or exc.key is None:
                raise
            raise ConfigError(str(exc).split(": ", 1)[1], file=config.source, key=exc.key) from None


def _check_model_file(path: Path, source: str | None, key: str) -> None:
    """A bare model file must have a suffix an installed backend reads (the model itself is read when loading)."""
    from edgerun.bare import format_of
    from edgerun.errors import PackageError
    from edgerun.runtime import Runtime

    try:
        format_of(path, Runtime().backends)
    except PackageError as exc:
        raise ConfigError(str(exc), file=source, key=key) from None


_SECRETS = {"server": ("api token", "EDGERUN_API_TOKEN", "token_file"),
            "mqtt": ("password", "EDGERUN_MQTT_PASSWORD", "password_file")}


def to_toml(config: Config, environ: dict[str, str] | None = None) -> str:
    """The configuration as a TOML document that ``load_config`` reads back; secret values never appear."""
    environ = dict(os.environ if environ is None else environ)
    lines = [f"# edgerun effective configuration: {config.source or 'no config file (built-in defaults)'}"]
    if config.overrides:
        lines.append(f"# overridden by the environment: {', '.join(config.overrides)}")
    _emit(lines, config, skip=("models", "server", "mqtt", "tuning", "source", "overrides"))
    for section in ("server", "mqtt"):
        lines += ["", f"[{section}]"]
        value = getattr(config, section)
        _emit(lines, value)
        what, var, file_key = _SECRETS[section]
        if environ.get(var):
            lines.append(f"# {what}: <from {var}>")
        elif getattr(value, file_key) is not None:
            lines.append(f"# {what}: <from {file_key} {getattr(value, file_key)}>")
        else:
            lines.append(f"# {what}: not set")
    lines += ["", "[tuning]"]
    _emit(lines, config.tuning)
    for m in config.models:
        lines += ["", "[[models]]"]
        _emit(lines, m, skip=("batching",))
        lines.append("[models.batching]")
        _emit(lines, m.batching)
    return "\n".join(lines) + "\n"


def _emit(lines: list[str], obj: Any, skip: tuple[str, ...] = ()) -> None:
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if value is None:
            lines.append(f"# {f.name} = (not set)")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
