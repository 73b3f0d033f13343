"""Fleet figures: what devices measured when they tuned a model, aggregated per profile and CPU model.

``aggregate`` turns the registry's tuning records of one model version into one group per (profile, CPU model)
and one per profile over all its CPU models; ``fleet_info`` turns them into what a package's variant carries in
``info.fleet``, so that a device's variant choice can rank candidates by what devices like it measured
(docs/fleet.md, "Tuning figures").
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from edgerun.errors import EdgerunError

if TYPE_CHECKING:
    from edgerun.hub.registry import TuningRecord

NUMBER = re.compile(r"\d+(?:\.\d+)?")
ALL_CPUS = ""  # the cpu_model of a group that holds every CPU model of its profile


class FiguresError(EdgerunError):
    """Fleet figures that cannot be read (a file that is not what ``edgerun hub tuning --json`` writes)."""

    exit_code = 65


def options_key(options: dict[str, Any]) -> str:
    """A candidate's options as one comparable string (``threads=2 hint=LATENCY``; empty: the defaults)."""
    return " ".join(f"{k}={options[k]}" for k in sorted(options))


@dataclass(frozen=True)
class CandidateFigures:
    """One candidate (variant, backend, options) over the devices of a group."""

    variant: str
    backend: str
    options: dict[str, Any]
    latency_ms: float | None  # the median of the devices' median latencies
    latency_p25_ms: float | None  # the devices' spread: first and third quartile of their medians
    latency_p75_ms: float | None
    latency_err_ms: float | None  # what one device can expect around latency_ms: half the quartile range, or the
    # devices' own median error when that is larger
    peak_rss_bytes: int | None  # median over the devices
    agreement: float | None  # median top-1 agreement with fp32 over the devices that had a validation sample
    agreement_min: float | None
    measured: int  # devices that kept it, with a latency
    dropped: int  # devices that dropped it
    drop_reason: str  # the commonest reason they gave (reasons that differ only in their numbers count as one)
    picked: int  # devices that serve it after tuning

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CandidateFigures":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GroupFigures:
    """The devices of one profile and CPU model (``cpu_model`` ALL_CPUS: all of the profile's) and their figures."""

    profile: str
    cpu_model: str
    cpu_class: str  # their CPU class (x86-vnni, x86, arm64); several, comma-separated, when they differ
    devices: int
    incomplete: int  # devices whose time budget ran out before every candidate was measured
    candidates: tuple[CandidateFigures, ...]  # fastest first; those no device kept last

    @property
    def pick(self) -> CandidateFigures | None:
        """The candidate most of the group's devices picked (the faster one on a tie)."""
        best = max(self.candidates, key=lambda c: c.picked, default=None)
        return best if best is not None and best.picked else None

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "cpu_model": self.cpu_model, "cpu_class": self.cpu_class,
                "devices": self.devices, "incomplete": self.incomplete,
                "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GroupFigures":
        return cls(d["profile"], d.get("cpu_model") or ALL_CPUS, d.get("cpu_class") or "", int(d["devices"]),
                   int(d.get("incomplete") or 0), tuple(CandidateFigures.from_dict(c) for c in d["candidates"]))


@dataclass(frozen=True)
class ModelFigures:
    """A model version's fleet figures: per (profile, CPU model), and per profile over all its CPU models."""

    fleet: str
    model: str
    version: int
    versions: dict[int, int] = field(default_factory=dict)  # every version devices tuned -> how many devices
    groups: tuple[GroupFigures, ...] = ()
    profiles: tuple[GroupFigures, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "model": self.model, "version": self.version,
                "versions": {str(v): n for v, n in self.versions.items()},
                "groups": [g.to_dict() for g in self.groups], "profiles": [g.to_dict() for g in self.profiles]}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelFigures":
        try:
            return cls(d["fleet"], d["model"], int(d["version"]), {int(v): n for v, n in d.get("versions", {}).items()},
                       tuple(GroupFigures.from_dict(g) for g in d["groups"]),
                       tuple(GroupFigures.from_dict(g) for g in d["profiles"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FiguresError(f"not the fleet figures `edgerun hub tuning --json` writes ({type(exc).__name__}: "
                               f"{exc})") from None

    @classmethod
    def load(cls, path: Path) -> "ModelFigures":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise FiguresError(f"fleet figures {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except FiguresError as exc:
            raise FiguresError(f"fleet figures {path}: {exc}") from None


def figures(fleet: str, model: str, version: int, records: Iterable["TuningRecord"],
            versions: dict[int, int] | None = None) -> ModelFigures:
    """The figures of one model version from its devices' tuning records."""
    records = list(records)
    by_group: dict[tuple[str, str], list[TuningRecord]] = {}
    by_profile: dict[str, list[TuningRecord]] = {}
    for r in records:
        by_group.setdefault((r.profile, r.cpu_model), []).append(r)
        by_profile.setdefault(r.profile, []).append(r)
    groups = tuple(aggregate(p, cpu, rs) for (p, cpu), rs in sorted(by_group.items()))
    profiles = tuple(aggregate(p, ALL_CPUS, rs) for p, rs in sorted(by_profile.items()))
    return ModelFigures(fleet, model, version, dict(versions or {}), groups, profiles)


def aggregate(profile: str, cpu_model: str, records: list["TuningRecord"]) -> GroupFigures:
    """One group's figures: per candidate, the median of the devices' medians and its spread, memory, agreement,
    how many devices dropped it (and why, most often) and how many picked it."""
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        chosen = (r.chosen.variant, r.chosen.backend, options_key(r.chosen.options)) if r.chosen else None
        for c in r.candidates:
            key = (c.variant, c.backend, options_key(c.options))
            s = seen.setdefault(key, {"options": dict(c.options), "lat": [], "err": [], "rss": [], "agr": [],
                                      "dropped": 0, "reasons": Counter(), "example": {}, "picked": 0})
            if c.kept and c.latency_ms is not None:
                s["lat"].append(c.latency_ms)
                if c.latency_err_ms is not None:
                    s["err"].append(c.latency_err_ms)
            if not c.kept:
                s["dropped"] += 1
                reason = c.reason or "no reason given"
                kind = NUMBER.sub("#", reason)
                s["reasons"][kind] += 1
                s["example"].setdefault(kind, reason)
            if c.peak_rss_bytes is not None:
                s["rss"].append(c.peak_rss_bytes)
            if c.agreement is not None:
                s["agr"].append(c.agreement)
            if key == chosen:
                s["picked"] += 1
    cands = [_candidate(key, s) for key, s in seen.items()]
    cands.sort(key=lambda c: (c.latency_ms is None, c.latency_ms or 0.0, -c.picked, c.variant, c.backend,
                              options_key(c.options)))
    classes = sorted({r.cpu_class for r in records if r.cpu_class})
    return GroupFigures(profile, cpu_model, ", ".join(classes), len(records),
                        sum(1 for r in records if not r.complete), tuple(cands))


def _candidate(key: tuple[str, str, str], s: dict[str, Any]) -> CandidateFigures:
    lat = sorted(s["lat"])
    med = p25 = p75 = err = None
    if lat:
        med = statistics.median(lat)
        p25, p75 = _quantile(lat, 0.25), _quantile(lat, 0.75)
        err = max((p75 - p25) / 2, statistics.median(s["err"]) if s["err"] else 0.0)
    reason = s["example"][s["reasons"].most_common(1)[0][0]] if s["reasons"] else ""
    return CandidateFigures(key[0], key[1], s["options"], _round(med), _round(p25), _round(p75), _round(err),
                            int(statistics.median(s["rss"])) if s["rss"] else None,
                            round(statistics.median(s["agr"]), 4) if s["agr"] else None,
                            round(min(s["agr"]), 4) if s["agr"] else None,
                            len(lat), s["dropped"], reason, s["picked"])


def _quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``xs``, interpolated between the two nearest."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


# --- into a package ---------------------------------------------------------------------------------------------

def fleet_info(figs: ModelFigures, variant: str) -> dict[str, Any]:
    """What ``variant``'s ``info.fleet`` records: per profile and backend, the fastest options the devices kept
    (median latency, its error, how many devices), and the same per CPU model under ``cpu_models``."""
    out: dict[str, Any] = {}
    for g in figs.profiles:
        per = _best_per_backend(g, variant)
        if not per:
            continue
        for cg in figs.groups:
            if cg.profile != g.profile or not cg.cpu_model:
                continue
            for backend, fig in _best_per_backend(cg, variant).items():
                if backend in per:
                    per[backend].setdefault("cpu_models", {})[cg.cpu_model] = fig
        out[g.profile] = per
    return out


def _best_per_backend(g: GroupFigures, variant: str) -> dict[str, dict[str, Any]]:
    best: dict[str, CandidateFigures] = {}
    for c in g.candidates:
        if c.variant != variant or c.latency_ms is None or not c.measured:
            continue
        if c.backend not in best or c.latency_ms < best[c.backend].latency_ms:  # type: ignore[operator]
            best[c.backend] = c
    out = {}
    for backend, c in sorted(best.items()):
        fig: dict[str, Any] = {"latency_ms": c.latency_ms, "latency_err_ms": c.latency_err_ms, "devices": c.measured}
        if c.options:
            fig["options"] = dict(c.options)
        if c.dropped:
            fig["dropped"] = c.dropped  # devices that dropped it (wrong there, crashed...): for people reading it
        out[backend] = fig
    return out
