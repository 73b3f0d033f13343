"""``edgerun token create | list | revoke``: the scoped API tokens of ``server.tokens_file``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from edgerun.cli.app import app, console, err_console, fail

token_app = typer.Typer(help="Create, list and revoke scoped API tokens (server.tokens_file; SIGHUP applies).",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")

TokensFileOpt = typer.Option(None, "--tokens-file", "-f", help="The tokens file (default: server.tokens_file of "
                                                              "the config).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Config file naming server.tokens_file (default "
                                                      "/etc/edgerun/edgerun.toml, or EDGERUN_CONFIG).")
RELOAD_HINT = "The server applies it on SIGHUP (systemctl reload edgerun), no restart needed."


def _tokens_file(tokens_file: Path | None, config: Path | None) -> Path:
    if tokens_file is not None:
        return tokens_file
    from edgerun.config import load_config
    from edgerun.errors import ConfigError

    cfg = load_config(config)
    if cfg.server.tokens_file is None:
        raise ConfigError("no tokens file: pass --tokens-file PATH, or set server.tokens_file in the config",
                          file=cfg.source, key="server.tokens_file")
    return cfg.server.tokens_file


@token_app.command("create")
def create(name: str = typer.Argument(..., help="A name for the token's holder, e.g. team-a (letters, digits, "
                                                "'.', '_', '-')."),
           scope: list[str] = typer.Option(..., "--scope", "-s", help="infer:MODEL, metadata:MODEL (MODEL may be "
                                                                       "*), metrics or admin; repeat for more."),
           tokens_file: Path = TokensFileOpt, config: Path = ConfigOpt) -> None:
    """Make a new token: printed once on stdout, only its SHA-256 kept in the tokens file (created 0600)."""
    from edgerun.contract import valid_name
    from edgerun.serving.tokens import (TokenEntry, created_now, digest, new_token, read_tokens, scope_problem,
                                        write_tokens)

    if not valid_name(name):
        raise fail(escape(f"{name!r} is not a token name (letters, digits, '.', '_' or '-')"), 2)
    for s in scope:
        problem = scope_problem(s)
        if problem is not None:
            raise fail(escape(problem), 2)
    path = _tokens_file(tokens_file, config)
    entries = read_tokens(path) if path.exists() else []
    if any(e.name == name for e in entries):
        raise fail(escape(f"{path} already has a token named {name!r}: revoke it first (edgerun token revoke "
                          f"{name}), or choose another name"), 1)
    token = new_token()
    write_tokens(path, [*entries, TokenEntry(name, digest(token), tuple(dict.fromkeys(scope)), created_now())])
    err_console.print(f"created token {name!r} (scopes {', '.join(dict.fromkeys(scope))}) in {path}; it is printed "
                      f"below, this once: keep it. {RELOAD_HINT}", style="dim", markup=False, highlight=False)
    print(token)


@token_app.command("list")
def list_tokens(tokens_file: Path = TokensFileOpt, config: Path = ConfigOpt,
                hashes: bool = typer.Option(False, "--hashes", help="Also show each token's SHA-256."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every token's name, scopes and creation time (the tokens themselves are not kept anywhere)."""
    from edgerun.serving.tokens import read_tokens

    path = _tokens_file(tokens_file, config)
    entries = read_tokens(path)
    if as_json:
        print(json.dumps([{"name": e.name, "scopes": list(e.scopes), "created": e.created,
                           **({"sha256": e.sha256} if hashes else {})} for e in entries], indent=1))
        return
    table = Table(title=f"Tokens in {path}")
    for col in ("name", "scopes", "created", *(("sha256",) if hashes else ())):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(escape(e.name), escape(" ".join(e.scopes)), e.created or "-", *((e.sha256,) if hashes else ()))
    console.print(table)


@token_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The token's name."), tokens_file: Path = TokensFileOpt,
           config: Path = ConfigOpt) -> None:
    """Remove a token from the tokens file; the server refuses it (401) once it has re-read the file."""
    from edgerun.serving.tokens import read_tokens, write_tokens

    path = _tokens_file(tokens_file, config)
    entries = read_tokens(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise fail(escape(f"no token named {name!r} in {path}; it has {', '.join(e.name for e in entries) or 'none'}"),
                   66)
    write_tokens(path, kept)
    err_console.print(f"revoked token {name!r} in {path}. {RELOAD_HINT}", markup=False, highlight=False)
