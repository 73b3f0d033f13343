"""The ``edgerun`` command line: ``main`` turns edgerun's errors into messages and exit codes."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.markup import escape

from edgerun.cli.app import app, err_console
from edgerun.errors import EdgerunError

COMMAND_MODULES = ("core", "tune", "serve", "hub_package", "hub_fleet", "hub_keys", "hub_rollout", "hub_tuning",
                   "hub_dashboard", "config", "service", "token")

for _name in COMMAND_MODULES:
    try:
        importlib.import_module(f"edgerun.cli.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"edgerun.cli.{_name}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors meant for the user print one line and exit with their code."""
    try:
        rc = app(args=argv, prog_name="edgerun", standalone_mode=False)
    except EdgerunError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        return 130
    except typer.Abort:
        return 1
    except Exception as exc:  # usage errors of the click inside typer (typer._click), or of click itself
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
