"""The daemon's command line: parsed as typer would, without typer's pydantic coercion; help that reads well."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer.main

from edgerun.cli import app
from edgerun.cli.direct import direct_serve, parse_options
from edgerun.cli.app import root
from edgerun.cli.serve import serve

CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"

PLAIN = [
    ["serve"],
    ["serve", "--config", "/etc/edgerun/edgerun.toml"],
    ["--log-level", "DEBUG", "serve", "-c", "x.toml", "--port", "8080", "--host=0.0.0.0"],
    ["--log-level=WARNING", "serve", "--model", "a", "-M", "b", "--model=c", "--uds", "/run/e.sock"],
    ["serve", "--allow-insecure", "--no-allow-insecure", "--max-body", "1MiB", "--token-file", "t",
     "--state-dir", "s", "-p", "rpi5", "-m", "60%", "--memory-budget", "512MiB"],
]
NOT_PLAIN = [
    ["serve", "--help"], ["serve", "-h"], ["--help"], ["serve", "--port", "eighty"], ["serve", "--port", "8_000"],
    ["serve", "--bogus", "1"], ["serve", "-Mdir"], ["serve", "--port"], ["serve", "--model="], ["serve", "extra"],
    ["serve", "--allow-insecure=yes"], ["config", "show"], ["hub", "serve"], ["serve", "--", "--port", "1"],
]


def typer_parse(args: list[str]) -> tuple[dict, dict]:
    """What typer itself makes of ``args``: the root's and serve's parameters (parsed, not run)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("edgerun", list(args))
    rest = [*ctx._protected_args, *ctx.args]
    sub = group.get_command(ctx, rest[0]).make_context(rest[0], rest[1:], parent=ctx)
    return ctx.params, sub.params


@pytest.mark.parametrize("args", PLAIN, ids=" ".join)
def test_plain_serve_arguments_parse_exactly_as_typer_would(args):
    root_kwargs, rest = parse_options(root, args)
    kwargs, extra = parse_options(serve, rest[1:])
    assert rest[0] == "serve" and extra == []
    assert (root_kwargs, kwargs) == typer_parse(args)
    assert direct_serve(args) is not None


@pytest.mark.parametrize("args", NOT_PLAIN, ids=" ".join)
def test_anything_else_is_left_to_typer(args):
    assert direct_serve(args) is None


def test_typer_still_reports_bad_arguments_as_usage_errors():
    r = subprocess.run([sys.executable, "-c", CLI, "serve", "--port", "eighty"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 2 and "Invalid value for '--port'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_running_daemon_never_imports_pydantic(service):
    """typer's parameter coercion would keep ~6 MB of pydantic in the idle daemon for its whole life."""
    s = service([], env={"PYTHONPROFILEIMPORTTIME": "1"})
    s.wait_ready()
    assert s.stop() == 0
    imported = {ln.rsplit("|", 1)[1].strip() for ln in s.output().splitlines() if ln.startswith("import time:")}
    assert "edgerun.daemon" in imported and "uvicorn" in imported  # the hook works: the serve path was traced
    assert not {m for m in imported if m.split(".")[0] in ("pydantic", "pydantic_core")}


@pytest.mark.parametrize("command, expected", [
    (["serve"], ["--config", "--model", "--port", "--state-dir", "--token-file", "SIGHUP reloads"]),
    (["config"], ["check", "show", "EDGERUN_*"]),
    (["service", "install"], ["--dry-run", "--prefix", "--user", "--exec", "--force"]),
])
def test_help_reads_well(command, expected):
    r = subprocess.run([sys.executable, "-c", CLI, *command, "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
    assert r.returncode == 0, r.stderr
    for text in expected:
        assert text in r.stdout, (text, r.stdout)
    assert max(len(ln) for ln in r.stdout.splitlines()) <= 100
