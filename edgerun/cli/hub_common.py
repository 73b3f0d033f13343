"""What every fleet command of ``edgerun hub`` shares: broker, fleet and registry options, read once."""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer

if TYPE_CHECKING:
    from edgerun.contract import Topics
    from edgerun.hub.registry import Registry
    from edgerun.mqtt import Broker

HUB_OPTIONS = [
    ("config", Path, typer.Option(None, "--config", "-c", help="Take broker and fleet defaults from this config's [mqtt].")),
    ("fleet", str, typer.Option(None, "--fleet", "-f", help="Fleet name (default: config, else 'default').")),
    ("host", str, typer.Option(None, "--host", help="MQTT broker host (default: config, else 127.0.0.1).")),
    ("port", int, typer.Option(None, "--port", help="MQTT broker port (default: config, else 1883).")),
    ("username", str, typer.Option(None, "--username", help="MQTT user name.")),
    ("password_file", Path, typer.Option(None, "--password-file",
                                         help="File holding the MQTT password (or EDGERUN_MQTT_PASSWORD).")),
    ("tls", bool, typer.Option(None, "--tls/--no-tls", help="Connect with TLS.")),
    ("ca_file", Path, typer.Option(None, "--ca-file", help="CA bundle for the broker's certificate.")),
    ("db", str, typer.Option(None, "--db", help="Registry database URL: sqlite:///FILE or postgresql://USER@HOST/DB "
                                                "(default: EDGERUN_HUB_DB, else ~/.local/share/edgerun/hub.db; "
                                                "a password comes from EDGERUN_HUB_DB_PASSWORD).")),
]


@dataclass(frozen=True)
class Hub:
    """The broker, fleet and registry a hub command works with."""

    broker: "Broker"
    fleet: str
    db: str | None

    @property
    def topics(self) -> "Topics":
        from edgerun.contract import Topics

        return Topics(self.fleet)

    def registry(self) -> "Registry":
        from edgerun.hub.registry import Registry

        return Registry(self.db)


def _hub(config: Path | None, fleet: str | None, host: str | None, port: int | None, username: str | None,
         password_file: Path | None, tls: bool | None, ca_file: Path | None, db: str | None) -> Hub:
    from edgerun.config import load_config
    from edgerun.mqtt import Broker

    m = load_config(config).mqtt
    password = os.environ.get("EDGERUN_MQTT_PASSWORD")
    if password is None and password_file:
        password = Path(password_file).read_text().strip()
    if password is None and not username:
        password = m.password()
    broker = Broker(host=host or m.host, port=port or m.port, username=username or m.username, password=password,
                    tls=m.tls if tls is None else tls, ca_file=ca_file or m.ca_file, cert_file=m.cert_file,
                    key_file=m.key_file, protocol=m.protocol)
    return Hub(broker, fleet or m.fleet, db)


def hub_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the shared hub options; it receives them as one ``hub: Hub`` argument."""
    sig = inspect.signature(fn)
    own = [p for name, p in sig.parameters.items() if name != "hub"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
             for name, kind, opt in HUB_OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name, _, _ in HUB_OPTIONS}
        return fn(*args, hub=_hub(**values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
    return wrapper


def signing_key(key: Path | None, key_id: str | None) -> tuple[Any, str]:
    """The Ed25519 private key from --key or EDGERUN_HUB_KEY, and its key id (the file's name by default)."""
    from edgerun.cli.app import fail
    from edgerun.manifest import load_private_key

    key = key or (Path(os.environ["EDGERUN_HUB_KEY"]) if os.environ.get("EDGERUN_HUB_KEY") else None)
    if key is None:
        raise fail("a signing key is needed: --key FILE (from `edgerun hub keygen`) or EDGERUN_HUB_KEY", 2)
    return load_private_key(key), key_id or key.name.removesuffix(".key")
