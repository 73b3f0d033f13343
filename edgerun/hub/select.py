"""Selecting devices by their tags, profile, name or connection: ``--select`` of ``hub status`` and ``hub rollout``."""

from __future__ import annotations

import fnmatch

from edgerun.errors import EdgerunError
from edgerun.hub.registry import DeviceRecord


class SelectorError(EdgerunError):
    """A ``--select`` term that is not one of the forms a selector takes."""

    exit_code = 65


def _values(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def check_selector(selector: list[str]) -> None:
    """Refuse a term that is not tag:NAME=VALUE, profile=NAME, devices=ID or online."""
    for s in selector:
        key, sep, value = s.partition("=")
        if s == "online":
            continue
        if not sep or not value or not (key in ("profile", "devices") or key.startswith("tag:") and key[4:]):
            raise SelectorError(f"--select {s!r}: expected tag:NAME=VALUE, profile=NAME, devices=ID,ID or online "
                                f"(values may be patterns such as pi-*)")


def matches(device: DeviceRecord, selector: list[str]) -> bool:
    """True when ``device`` matches every selector term (values separated by commas: any of them)."""
    for s in selector:
        if s == "online":
            if not device.online:
                return False
            continue
        key, _, value = s.partition("=")
        if key == "profile":
            have = device.profile
        elif key == "devices":
            have = device.device
        else:
            have = device.tags.get(key[4:])
            if have is None:
                return False
        if not any(fnmatch.fnmatchcase(have, pat) for pat in _values(value)):
            return False
    return True
