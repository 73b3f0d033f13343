"""The tokens file (``server.tokens_file``): named API tokens as SHA-256 hashes with their scopes.

A token is 32 random bytes (``secrets.token_urlsafe(32)``), so a plain SHA-256 of it cannot be inverted nor
guessed: unlike a password it needs no slow, salted hash (docs/protection.md#scoped-access). The file never
holds a clear token; ``edgerun token create`` prints the token once and writes only its hash here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgerun.contract import valid_name
from edgerun.errors import ConfigError
from edgerun.tomlfile import Table, read_toml

HEX64 = re.compile(r"[0-9a-f]{64}")
MODEL_SCOPES = ("infer", "metadata")  # infer:<model> and metadata:<model>, <model> a name or *
PLAIN_SCOPES = ("metrics", "admin")
HEADER = ("# edgerun API tokens: the SHA-256 of each token, never the token itself.\n"
          "# Managed by `edgerun token create | list | revoke`; the server re-reads it on SIGHUP.\n")


@dataclass(frozen=True)
class TokenEntry:
    """One named token: its hash and what it may do."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created: str = ""


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


def scope_problem(scope: object) -> str | None:
    """What is wrong with a scope, or None when it is one edgerun knows."""
    if not isinstance(scope, str):
        return f"expected a string, got {scope!r}"
    if scope in PLAIN_SCOPES:
        return None
    kind, sep, model = scope.partition(":")
    if sep and kind in MODEL_SCOPES:
        if model == "*" or valid_name(model):
            return None
        return f"scope {scope!r}: the model is a name (letters, digits, '.', '_', '-') or *"
    return (f"unknown scope {scope!r}; expected infer:<model>, metadata:<model> (<model> may be *), metrics "
            "or admin")


def read_tokens(path: Path) -> list[TokenEntry]:
    """The entries of a tokens file, checked: every problem names the file, the entry and what is wrong."""
    file = str(path)
    if not path.exists():
        raise ConfigError("file not found (create it with: edgerun token create NAME --scope ... --tokens-file "
                          f"{path})", file=file, key="server.tokens_file")
    try:
        t = Table(read_toml(path), file)
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror}; the server's user must be able to read it (it holds only "
                          "hashes, so mode 0644 is safe)", file=file) from None
    if isinstance(t.data.get("token"), str):
        raise ConfigError("a tokens file holds SHA-256 hashes, never a clear token: remove this key and create "
                          "tokens with edgerun token create", file=file, key="token")
    t.only("token")
    entries: list[TokenEntry] = []
    names: set[str] = set()
    hashes: set[str] = set()
    for i, e in enumerate(t.tables("token")):
        name = e.data.get("name")
        if "token" in e.data:
            raise _entry_error(file, i, name, "token", "a tokens file holds SHA-256 hashes, never a clear token: "
                               "remove this key, revoke the token and create a new one with edgerun token create")
        e.only("name", "sha256", "scopes", "created")
        name = e.get("name", str, required=True)
        if not valid_name(name):
            raise _entry_error(file, i, name, "name", "a token name is letters, digits, '.', '_' or '-'")
        if name in names:
            raise _entry_error(file, i, name, "name", "a second token of this name; names are unique")
        sha = e.get("sha256", str, required=True)
        if not HEX64.fullmatch(sha):
            raise _entry_error(file, i, name, "sha256",
                               f"expected the token's SHA-256 as 64 lowercase hex digits, got {_short(sha)}")
        if sha in hashes:
            raise _entry_error(file, i, name, "sha256", "the same hash as an earlier entry: one token, two names")
        scopes = e.list_of("scopes", str)
        if not scopes:
            raise _entry_error(file, i, name, "scopes", "expected at least one scope, e.g. [\"infer:digits\"]")
        for j, scope in enumerate(scopes):
            problem = scope_problem(scope)
            if problem is not None:
                raise _entry_error(file, i, name, f"scopes[{j}]", problem)
        names.add(name)
        hashes.add(sha)
        entries.append(TokenEntry(name, sha, tuple(dict.fromkeys(scopes)), e.get("created", str, "")))
    return entries


def write_tokens(path: Path, entries: list[TokenEntry]) -> None:
    """Replace the file atomically with ``entries``: a new file is 0600, an existing one keeps its mode and owner."""
    import tomli_w

    doc = {"token": [{"name": e.name, "sha256": e.sha256, "scopes": list(e.scopes),
                      **({"created": e.created} if e.created else {})} for e in entries]}
    text = HEADER + ("\n" + tomli_w.dumps(doc) if entries else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            if st is not None:
                os.fchmod(f.fileno(), st.st_mode & 0o7777)
                if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                    try:
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
                    except PermissionError:
                        pass  # not root: the file becomes ours, as any edit would make it
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _entry_error(file: str, index: int, name: object, key: str, message: str) -> ConfigError:
    """An error naming the file, the entry (its index, and its name when it has one) and the key."""
    entry = f"token {name!r}: " if isinstance(name, str) else ""
    return ConfigError(entry + message, file=file, key=f"token[{index}].{key}")


def created_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(value: str) -> str:
    """A value for an error message: a mistyped hash is shown, a pasted token is not."""
    return f"{len(value)} characters" if len(value) > 16 else repr(value)
