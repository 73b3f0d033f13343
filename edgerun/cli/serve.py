"""``edgerun serve``: the daemon."""

from __future__ import annotations

from pathlib import Path

import typer

from edgerun.cli.app import app


@app.command()
def serve(
    model: list[Path] = typer.Option(None, "--model", "-M", metavar="PATH",
                                     help="Model package directory, or a bare model file, to serve (repeatable)."),
    config: Path = typer.Option(None, "--config", "-c", help="Config file (default /etc/edgerun/edgerun.toml if present)."),
    host: str = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port to listen on (default 8000)."),
    grpc_port: int = typer.Option(None, "--grpc-port", help="gRPC port on the same address (default 8001; 0: off)."),
    uds: Path = typer.Option(None, help="Also/instead listen on this Unix socket."),
    profile: str = typer.Option(None, "--profile", "-p", help="Device profile name or file."),
    memory_budget: str = typer.Option(None, "--memory-budget", "-m", help="Memory budget, e.g. 512MiB or 60%."),
    state_dir: Path = typer.Option(None, help="Where models and update state are kept."),
    token_file: Path = typer.Option(None, "--token-file",
                                    help="File holding the API bearer token (env EDGERUN_API_TOKEN also works)."),
    allow_insecure: bool = typer.Option(None, "--allow-insecure/--no-allow-insecure",
                                        help="Allow a non-loopback --host without an API token."),
    max_body: str = typer.Option(None, "--max-body", help="Largest request body accepted, e.g. 64MiB."),
) -> None:
    """Serve models over HTTP and gRPC (KServe v2) and, when configured, take updates over MQTT.

    Settings: the config file, then EDGERUN_* environment variables, then these flags (docs/configuration.md).
    Under systemd: Type=notify, watchdog, SIGTERM drains, SIGHUP reloads the config (docs/service.md).
    """
    import asyncio

    from edgerun.config import ModelConfig, load_config, with_overrides
    from edgerun.daemon import Daemon
    from edgerun.errors import EdgerunError
    from edgerun.systemd import Notifier

    flags = dict(profile=profile, memory_budget=memory_budget, state_dir=state_dir,
                 **{"server.host": host, "server.port": port, "server.grpc_port": grpc_port, "server.uds": uds,
                    "server.token_file": token_file,
                    "server.allow_insecure": allow_insecure, "server.max_body": _size(max_body)})

    def effective_config():
        """File, then EDGERUN_* environment, then these flags: at start and again on SIGHUP."""
        cfg = with_overrides(load_config(config), **flags)
        if model:
            cfg = with_overrides(cfg, models=cfg.models + tuple(ModelConfig(path=p) for p in model))
        return cfg

    notifier = Notifier.from_env()
    try:
        cfg = effective_config()
        fixed = _apply_log_level(cfg.log_level)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(Daemon(cfg, reload_config=effective_config, notifier=notifier, log_level_fixed=fixed).run())
    except EdgerunError as exc:
        notifier.status(f"failed: {exc}")
        raise


def _apply_log_level(level: str) -> bool:
    """The config's log_level, unless --log-level was given on the command line (then True)."""
    import logging

    from edgerun.cli.app import log_level_given

    if log_level_given():
        return True
    logging.getLogger().setLevel(level)
    return False


def _size(value: str | None) -> int | None:
    if value is None:
        return None
    from edgerun.errors import ConfigError
    from edgerun.units import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--max-body") from None


def _loop_factory():
    """uvloop when installed (uvicorn[standard] brings it), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
