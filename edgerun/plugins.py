"""Load edgerun plugins: the built-in defaults and every entry point in group ``edgerun``."""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from edgerun import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgerun"
DEFAULT_PLUGINS = ("edgerun.choice",)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    error: str


def _strict() -> bool:
    """Under tests a broken plugin raises instead of being skipped."""
    return os.environ.get("EDGERUN_STRICT_PLUGINS") == "1"


def make_plugin_manager(load_entry_points: bool = True) -> tuple[pluggy.PluginManager, list[PluginFailure]]:
    """A plugin manager with the default plugins and, unless disabled, every installed plugin."""
    pm = pluggy.PluginManager("edgerun")
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points and os.environ.get("EDGERUN_DISABLE_PLUGINS") != "1":
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
                pm.check_pending()  # a misspelt hook name is this plugin's: the earlier ones passed
            except Exception as exc:  # one broken plugin must not take the runtime down
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                if _strict():
                    raise
                log.warning("plugin %r failed to load and is skipped: %s", ep.name, exc)
                failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}"))
    pm.check_pending()
    return pm, failures


@functools.lru_cache(maxsize=1)
def backend_classes() -> tuple[type, ...]:
    """The Backend classes every installed plugin registers (what profiles and packages may name)."""
    pm, _ = make_plugin_manager()
    classes: list[type] = []
    call_each(pm, "register_backends", register=classes.append)
    return tuple(classes)


def call_each(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> tuple[list[Any], list[PluginFailure]]:
    """Call every implementation of a collecting hook; one that raises is skipped and reported by plugin name."""
    results: list[Any] = []
    failures: list[PluginFailure] = []
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):  # the order pluggy calls them in
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception as exc:  # one broken plugin must not take the runtime down
            if _strict():
                raise
            log.warning("plugin %r failed in %s and is skipped: %s", impl.plugin_name, hook, exc)
            failures.append(PluginFailure(impl.plugin_name, f"{hook}: {type(exc).__name__}: {exc}"))
            continue
        if result is not None:
            results.append(result)
    return results, failures
