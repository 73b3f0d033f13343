"""``edgerun serve`` parsed without typer's machinery, so the long-running daemon stays small.

typer coerces every option through a pydantic ``TypeAdapter``: about 6 MB the daemon would carry for
its whole life, for one parse. A plain ``edgerun [--log-level L] serve --option value ...`` is parsed
here from the same typer declarations (they stay the one definition of the options and their help);
anything else (``--help``, a value that is not plainly valid, an unknown option) is left to typer,
which parses it with its usual messages.
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

_SKIP = object()  # "not plainly valid: let typer parse it"


def _int(text: str) -> Any:
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else _SKIP


_CONVERT: dict[Any, Callable[[str], Any]] = {str: str, Path: Path, int: _int}


def direct_serve(args: Sequence[str]) -> Callable[[], Any] | None:
    """A call doing what typer would do for ``args``, when they are a plain ``serve``; else None."""
    if "serve" not in args:
        return None
    from edgerun.cli.app import root
    from edgerun.cli.serve import serve

    root_kwargs, rest = parse_options(root, args)
    if root_kwargs is None or rest[:1] != ["serve"]:
        return None
    kwargs, extra = parse_options(serve, rest[1:])
    if kwargs is None or extra:
        return None

    def run() -> Any:
        root(**root_kwargs)
        return serve(**kwargs)

    return run


def parse_options(func: Callable[..., Any], args: Sequence[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """``func``'s keyword arguments from the options leading ``args``, and the arguments after them.

    None instead of the arguments when ``func`` or ``args`` need more than this parser knows.
    """
    import typer

    hints = typing.get_type_hints(func)
    options: dict[str, tuple[str, Any]] = {}  # "--opt" -> (parameter, its type; or a flag's value)
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(func).parameters.items():
        info = param.default
        if not isinstance(info, typer.models.OptionInfo) or any(
                (info.envvar, info.callback, info.is_eager, info.prompt, info.count)):
            return None, []
        kind, many = hints[name], typing.get_origin(hints[name]) is list
        if many:
            kind = typing.get_args(kind)[0]
        if kind is not bool and kind not in _CONVERT:
            return None, []
        flag = name.replace("_", "-")
        decls = info.param_decls or ((f"--{flag}/--no-{flag}",) if kind is bool else (f"--{flag}",))
        for decl in decls:
            on, _, off = decl.partition("/")
            if kind is bool:
                options[on] = (name, True)
                if off:
                    options[off] = (name, False)
            else:
                options[decl] = (name, kind)
        kwargs[name] = () if many else info.default
    i = 0
    while i < len(args) and args[i].startswith("-"):
        opt, eq, value = args[i].partition("=") if args[i].startswith("--") else (args[i], "", "")
        if opt not in options:
            return None, []
        name, kind = options[opt]
        if isinstance(kind, bool):
            if eq:
                return None, []
            kwargs[name] = kind
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                return None, []
            value = args[i + 1]
            i += 1
        converted = _CONVERT[kind](value) if value else _SKIP
        if converted is _SKIP:
            return None, []
        if typing.get_origin(hints[name]) is list:
            kwargs[name] = [*kwargs[name], converted]
        else:
            kwargs[name] = converted
        i += 1
    return kwargs, list(args[i:])
