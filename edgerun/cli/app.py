"""The Typer applications every CLI module adds its commands to, and shared CLI helpers."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console

app = typer.Typer(
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


def setup_logging(level: str | None = None) -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) without timestamps, with syslog priority prefixes."""
    from edgerun.logs import configure

    configure(level or os.environ.get("EDGERUN_LOG_LEVEL", "INFO"))


def fail(message: str, code: int = 1) -> "typer.Exit":
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.callback()
def _root(
    log_level: str = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR (env EDGERUN_LOG_LEVEL)."),
) -> None:
    setup_logging(log_level)


def is_tty() -> bool:
    return sys.stdout.isatty()
