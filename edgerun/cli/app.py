"""The Typer applications every CLI module adds its commands to, and shared CLI helpers."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.console import Console


class _App(typer.Typer):
    """The root app: a plain ``edgerun serve ...`` runs without typer's parsing (see ``edgerun.cli.direct``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from edgerun.cli.direct import direct_serve

        argv = kwargs.get("args", args[0] if args else None)
        run = direct_serve(sys.argv[1:] if argv is None else argv)
        if run is not None:
            return run()
        return super().__call__(*args, **kwargs)


app = _App(
    name="edgerun",
    help="Deploy and serve ML models on edge devices.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
hub_app = typer.Typer(help="Package, sign and publish model releases; watch the fleet.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")

console = Console()
err_console = Console(stderr=True)
_log_level_flag: str | None = None  # --log-level as given


def setup_logging(level: str | None = None) -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) without timestamps, with syslog priority prefixes."""
    from edgerun.logs import configure

    configure(level or os.environ.get("EDGERUN_LOG_LEVEL") or "INFO")


def fail(message: str, code: int = 1) -> "typer.Exit":
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.callback()
def root(
    log_level: str = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR (env EDGERUN_LOG_LEVEL)."),
) -> None:
    global _log_level_flag
    _log_level_flag = log_level
    setup_logging(log_level)


def log_level_given() -> bool:
    """True when --log-level was on the command line: a config file's log_level then does not apply."""
    return _log_level_flag is not None


def is_tty() -> bool:
    return sys.stdout.isatty()
