"""Read TOML files and check their keys and types, naming the file, the key and what was expected."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

from edgerun.errors import ConfigError, EdgerunError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "an array", dict: "a table"}


def read_toml(path: Path, error: type[EdgerunError] = ConfigError) -> dict[str, Any]:
    """Parse a TOML file, reporting a syntax error with the file name and line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise _make(error, "file not found", str(path), None) from None
    except tomllib.TOMLDecodeError as exc:
        raise _make(error, f"invalid TOML: {exc}", str(path), None) from None


def _make(error: type[EdgerunError], message: str, file: str | None, key: str | None) -> EdgerunError:
    if issubclass(error, ConfigError):
        return error(message, file=file, key=key)
    where = ", ".join(p for p in (f"file {file}" if file else "", f"key '{key}'" if key else "") if p)
    return error(f"{where}: {message}" if where else message)


class Table:
    """A TOML table being read: typed access that reports the file and dotted key on error."""

    def __init__(self, data: dict[str, Any], file: str | None, prefix: str = "",
                 error: type[EdgerunError] = ConfigError):
        self.data = data
        self.file = file
        self.prefix = prefix
        self.error = error

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str | None, message: str) -> EdgerunError:
        return _make(self.error, message, self.file, self.key(name) if name is not None else self.prefix.rstrip(".") or None)

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        if name not in self.data:
            if required or default is ...:
                raise self.fail(name, "is required")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(name, f"expected {expected}, got {type(value).__name__} {value!r}")
        return value

    def list_of(self, name: str, kind: type, default: Any = ...) -> list:
        value = self.get(name, list, default)
        for i, item in enumerate(value or []):
            if not isinstance(item, kind) or (isinstance(item, bool) and kind is not bool):
                raise self.fail(f"{name}[{i}]", f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {item!r}")
        return value

    def table(self, name: str, required: bool = False) -> "Table":
        value = self.get(name, dict, {} if not required else ..., required=required)
        return Table(value, self.file, f"{self.key(name)}.", self.error)

    def tables(self, name: str, required: bool = False) -> list["Table"]:
        value = self.get(name, list, [] if not required else ..., required=required)
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{name}[{i}]", f"expected a table, got {item!r}")
            out.append(Table(item, self.file, f"{self.key(name)}[{i}].", self.error))
        return out

    def only(self, *allowed: str) -> None:
        """Reject keys not in ``allowed`` (a misspelt key must not be silently ignored)."""
        for name in self.data:
            if name not in allowed:
                raise self.fail(name, f"unknown key; expected one of: {', '.join(allowed)}")
