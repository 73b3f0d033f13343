"""``edgerun config check`` and ``edgerun config show``: validate and print the effective configuration."""

from __future__ import annotations

from pathlib import Path

import typer

from edgerun.cli.app import app

config_app = typer.Typer(help="Check or show the configuration (file, EDGERUN_* environment, defaults).",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", help="Config file (default /etc/edgerun/edgerun.toml, or EDGERUN_CONFIG).")


@config_app.command("check")
def check(config: Path = ConfigOpt) -> None:
    """Validate the config file and what it points at (model packages, secret files, memory budget).

    Exit 0, or 78 with a message naming the file (or environment variable), the key and the expected value.
    """
    from edgerun.config import DEFAULT_CONFIG_PATH, check_config, load_config

    cfg = load_config(config)
    check_config(cfg)
    where = cfg.source or f"no config file ({config or DEFAULT_CONFIG_PATH} absent): built-in defaults"
    listen = f"{cfg.server.host}:{cfg.server.port}" if cfg.server.host else ""
    if cfg.server.uds:
        listen = ", ".join(p for p in (listen, f"unix:{cfg.server.uds}") if p)
    env = f", environment overrides: {', '.join(cfg.overrides)}" if cfg.overrides else ""
    mqtt = "MQTT off"
    if cfg.mqtt.enabled:
        from edgerun.manifest import load_trusted_keys

        m = cfg.mqtt
        keys = sorted(load_trusted_keys(m.trusted_keys))
        mqtt = (f"MQTT on: broker {m.host}:{m.port}{' (TLS)' if m.tls else ''}, fleet {m.fleet!r}, device "
                f"{m.device_id!r}, {len(keys)} trusted key(s){': ' + ', '.join(keys) if keys else ''}")
    typer.echo(f"ok: {where}: {len(cfg.models)} model(s), HTTP on {listen}, {mqtt}{env}")


@config_app.command("show")
def show(config: Path = ConfigOpt) -> None:
    """Print the effective configuration (file, then EDGERUN_* environment) as TOML; secrets are redacted."""
    from edgerun.config import load_config, to_toml

    typer.echo(to_toml(load_config(config)), nl=False)
