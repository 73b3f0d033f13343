"""Device profiles: TOML files describing a kind of device, and matching the host to one."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgerun.device import DeviceFacts, normalize_arch
from edgerun.errors import ConfigError
from edgerun.tomlfile import Table, read_toml
from edgerun.units import format_size, parse_budget, parse_size

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
# Installed from a wheel the profiles are package data; in a source checkout they are the repository's top level.
BUNDLED_DIR = _HERE / "device_profiles" if (_HERE / "device_profiles").is_dir() else _HERE.parent / "device_profiles"
SYSTEM_DIR = Path("/etc/edgerun/device_profiles")
MATCH_KEYS = ("arch", "cpu_flags", "device_tree_model", "accelerators", "cpu_model", "min_memory")
# Older names people write for a backend, mapped to the backend's registered name.


def _backend_tables() -> tuple[dict[str, str], dict[str, dict[str, type | tuple[type, ...]]]]:
    """Backend names by alias, and the options each backend reads: both come from the Backend classes."""
    from edgerun.plugins import backend_classes

    aliases: dict[str, str] = {}
    options: dict[str, dict[str, type | tuple[type, ...]]] = {}
    for cls in backend_classes():
        for alias in getattr(cls, "aliases", ()):
            aliases[alias] = cls.name
        if getattr(cls, "options", None) is not None:
            options[cls.name] = cls.options
    return aliases, options

# How much each kind of match key says about a host: a board model or an accelerator says more than an arch.
_WEIGHTS = {"arch": 1, "min_memory": 1, "cpu_model": 3, "device_tree_model": 8}
_PER_ITEM = {"cpu_flags": 1, "accelerators": 4}


@dataclass(frozen=True)
class Profile:
    """A kind of device: how to recognise it and how to run models on it."""

    name: str
    description: str = ""
    match: dict[str, Any] = field(default_factory=dict)
    memory_budget: str | int = "60%"
    threads: int | None = None
    prefer: tuple[str, ...] = ()
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str | None = None

    def budget_bytes(self, memory_available: int) -> int:
        """The memory budget in bytes given the host's available memory."""
        return parse_budget(self.memory_budget, memory_available)

    def options_for(self, backend: str) -> dict[str, Any]:
        """A copy of the ``[backends.<backend>]`` table."""
        return dict(self.backend_options.get(backend, {}))

    def matches(self, facts: DeviceFacts) -> tuple[bool, list[str]]:
        """Whether every match key holds for ``facts``, with one line of reasoning per key."""
        reasons: list[str] = []
        ok = True
        for key, want in self.match.items():
            hit, reason = _MATCHERS[key](want, facts)
            reasons.append(reason)
            ok = ok and hit
        return ok, reasons

    def cpu_classes(self) -> tuple[str, ...]:
        """The int8 CPU classes the devices of this profile can have (x86-vnni, x86, arm64)."""
        from edgerun.device import VNNI_FLAGS

        arches = self.match.get("arch") or ["x86_64", "aarch64"]
        out: list[str] = []
        for arch in arches:
            if arch == "x86_64":
                out += ["x86-vnni"] if set(self.match.get("cpu_flags", ())) & VNNI_FLAGS else ["x86-vnni", "x86"]
            elif arch == "aarch64":
                out.append("arm64")
        return tuple(out)

    @property
    def specificity(self) -> int:
        """How much a match says: each key counts, each flag or accelerator required counts, a board model most."""
        return sum(_WEIGHTS[k] if k in _WEIGHTS else 1 + _PER_ITEM[k] * len(v) for k, v in self.match.items())


def _match_arch(want: list[str], facts: DeviceFacts) -> tuple[bool, str]:
    arch = normalize_arch(facts.arch)
    hit = arch in want
    return hit, f"arch {arch} {'in' if hit else 'not in'} {want}"


def _match_all(label: str, attr: str) -> Callable[[list[str], DeviceFacts], tuple[bool, str]]:
    def match(want: list[str], facts: DeviceFacts) -> tuple[bool, str]:
        have = getattr(facts, attr)
        missing = [w for w in want if w not in have]
        return not missing, (f"{label} {', '.join(want)} present" if not missing
                             else f"{label} missing: {', '.join(missing)}")
    return match


def _match_any_substring(label: str, attr: str) -> Callable[[list[str], DeviceFacts], tuple[bool, str]]:
    def match(want: list[str], facts: DeviceFacts) -> tuple[bool, str]:
        have = getattr(facts, attr)
        found = next((w for w in want if w.lower() in have.lower()), None)
        if found is not None:
            return True, f"{label} {have!r} contains {found!r}"
        wanted = " or ".join(repr(w) for w in want)
        return False, f"{label} {have!r} lacks {wanted}" if have else f"no {label} (wanted {wanted})"
    return match


def _match_min_memory(want: str | int, facts: DeviceFacts) -> tuple[bool, str]:
    need = parse_size(want)
    hit = facts.memory_total >= need
    return hit, f"memory {format_size(facts.memory_total)} {'>=' if hit else '<'} {format_size(need)}"


_MATCHERS: dict[str, Callable[[Any, DeviceFacts], tuple[bool, str]]] = {
    "arch": _match_arch,
    "cpu_flags": _match_all("cpu flags", "cpu_flags"),
    "accelerators": _match_all("accelerators", "accelerators"),
    "device_tree_model": _match_any_substring("board", "device_tree_model"),
    "cpu_model": _match_any_substring("cpu model", "cpu_model"),
    "min_memory": _match_min_memory,
}


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file; a ConfigError names the file, the key and what was expected."""
    path = Path(path)
    t = Table(read_toml(path), str(path))
    t.only("name", "description", "match", "resources", "backends")
    name = t.get("name", str, required=True)
    if not name or "/" in name or name != name.strip():
        raise t.fail("name", f"expected a profile name such as 'raspberry-pi-4', got {name!r}")
    match = _read_match(t.table("match"))
    r = t.table("resources")
    r.only("memory_budget", "threads")
    budget = r.get("memory_budget", (str, int), "60%")
    _check(r, "memory_budget", lambda v: parse_budget(v, 1 << 30),
           "expected a percentage of available memory such as '60%' or a size such as '1.5GiB'")
    threads = r.get("threads", int, None)
    if threads is not None and threads < 1:
        raise r.fail("threads", f"expected a positive integer, got {threads}")
    prefer, options = _read_backends(t.table("backends"))
    return Profile(name=name, description=t.get("description", str, ""), match=match, memory_budget=budget,
                   threads=threads, prefer=prefer, backend_options=options, source=str(path))


def _read_match(m: Table) -> dict[str, Any]:
    """The ``[match]`` table, normalised: lists for every key but ``min_memory``."""
    m.only(*MATCH_KEYS)
    match: dict[str, Any] = {}
    for key in ("arch", "cpu_flags", "accelerators", "device_tree_model", "cpu_model"):
        if key not in m.data:
            continue
        value = m.get(key, (list, str))
        values = m.list_of(key, str) if isinstance(value, list) else [value]
        if not values or any(not v.strip() for v in values):
            raise m.fail(key, f"expected a non-empty string or array of non-empty strings, got {value!r}")
        if key == "arch":  # "arm64" is "aarch64": list each normalised name once
            values = list(dict.fromkeys(normalize_arch(v) for v in values))
        match[key] = values
    if "min_memory" in m.data:
        match["min_memory"] = m.get("min_memory", (str, int))
        _check(m, "min_memory", parse_size, "expected a size such as '2GiB'")
    return match


def _read_backends(b: Table) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """The ``[backends]`` table: the preference order and each backend's options."""
    aliases, known_options = _backend_tables()
    prefer = tuple(aliases.get(n, n) for n in b.list_of("prefer", str, []))
    if len(set(prefer)) != len(prefer):
        raise b.fail("prefer", f"expected each backend once, got {list(prefer)}")
    options: dict[str, dict[str, Any]] = {}
    for key in b.data:
        if key == "prefer":
            continue
        name = aliases.get(key, key)
        table = b.table(key)
        known = known_options.get(name)
        if known is not None:
            table.only(*known)
            for option, kind in known.items():
                if option == "providers" and option in table.data:
                    table.list_of(option, str)
                elif option in table.data:
                    table.get(option, kind)
        options[name] = dict(table.data)
    return prefer, options


def _check(t: Table, key: str, parse: Callable[[Any], object], expected: str) -> None:
    if key not in t.data:
        return
    try:
        parse(t.data[key])
    except ValueError:
        raise t.fail(key, f"{expected}, got {t.data[key]!r}") from None


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, later ones overriding earlier ones of the same name."""
    dirs = [BUNDLED_DIR, SYSTEM_DIR]
    extra = os.environ.get("EDGERUN_PROFILE_PATH")
    if extra:
        dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def load_profiles(dirs: list[Path] | None = None) -> dict[str, Profile]:
    """Every profile in the profile directories, by name; a later directory overrides an earlier one."""
    found: dict[str, Profile] = {}
    for d in dirs if dirs is not None else profile_dirs():
        if not d.is_dir():
            continue
        here: dict[str, Profile] = {}
        for path in sorted(d.glob("*.toml")):
            profile = load_profile(path)
            if profile.name in here:
                raise ConfigError(f"profile name {profile.name!r} is also used by {here[profile.name].source}; "
                                  f"expected each profile name once per directory", file=str(path), key="name")
            here[profile.name] = profile
            if profile.name in found:
                log.debug("profile %s from %s overrides %s", profile.name, path, found[profile.name].source)
        found.update(here)
    return found


@dataclass
class ProfileChoice:
    """The chosen profile and the reasoning, for ``edgerun device``."""

    profile: Profile
    why: str
    considered: list[tuple[Profile, bool, list[str]]]


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or os.sep in text or (os.altsep is not None and os.altsep in text)


def choose_profile(facts: DeviceFacts, override: str | Path | None = None,
                   profiles: dict[str, Profile] | None = None) -> ProfileChoice:
    """The most specific profile matching ``facts``, or the one named by ``override`` (a name or a file)."""
    if override:
        text = str(override)
        if isinstance(override, Path) or _looks_like_path(text):
            p = load_profile(text)
            return ProfileChoice(p, f"requested profile file {text}", [])
        profiles = load_profiles() if profiles is None else profiles
        if text not in profiles:
            raise ConfigError(f"unknown profile {text!r}; expected one of: {', '.join(sorted(profiles))} "
                              f"(or the path of a profile .toml file)", key="profile")
        return ProfileChoice(profiles[text], f"requested by name ({text})", [])
    profiles = load_profiles() if profiles is None else profiles
    considered = []
    for p in profiles.values():
        ok, reasons = p.matches(facts)
        considered.append((p, ok, reasons))
    matching = [(p, r) for p, ok, r in considered if ok]
    if not matching:
        fallback = Profile(name="generic", description="no profile matched; built-in defaults", source=None)
        return ProfileChoice(fallback, "no profile matched this host; using built-in defaults", considered)
    matching.sort(key=lambda pr: (-pr[0].specificity, pr[0].name))
    best, reasons = matching[0]
    why = f"most specific matching profile (specificity {best.specificity}): {'; '.join(reasons) or 'matches any host'}"
    others = [p for p, _ in matching[1:]]
    ties = [p.name for p in others if p.specificity == best.specificity]
    if ties:
        log.warning("profiles %s match this host as specifically as %s; %s wins by name", ties, best.name, best.name)
        why += f"; tied with {', '.join(ties)} (chosen by name)"
    less = [p.name for p in others if p.name not in ties]
    if less:
        why += f"; less specific matches: {', '.join(less)}"
    return ProfileChoice(best, why, considered)
