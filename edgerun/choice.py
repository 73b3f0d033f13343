"""Variant choice: which variant, on which backend, fits this device's memory budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgerun.backend import Backend
from edgerun.errors import NoVariantFits
from edgerun.hookspecs import hookimpl
from edgerun.package import ModelPackage, Variant
from edgerun.profiles import Profile
from edgerun.protect import not_for_here
from edgerun.units import format_size


@dataclass(frozen=True)
class FleetFigure:
    """What devices of one profile (and CPU model) measured of a variant on a backend: ``info.fleet`` of a package."""

    latency_ms: float
    latency_err_ms: float | None
    devices: int
    profile: str
    cpu_model: str = ""  # "": every CPU model of the profile

    def describe(self) -> str:
        where = f"profile {self.profile}" + (f", CPU {self.cpu_model}" if self.cpu_model else "")
        return f"fleet: {self.devices} device{'s' if self.devices != 1 else ''} of {where}"


def fleet_figure(variant: Variant, backend: str, profile: str, cpu_model: str = "") -> FleetFigure | None:
    """The fleet's figure for ``variant`` on ``backend`` on devices of ``profile``: its CPU model's when the package
    has one, else the profile's; None when the package carries none."""
    per = _dict(_dict(_dict(variant.info.get("fleet")).get(profile)).get(backend))
    cpu = _dict(_dict(per.get("cpu_models")).get(cpu_model)) if cpu_model else {}
    for fig, cpu_name in ((cpu, cpu_model), (per, "")):
        lat, err, n = fig.get("latency_ms"), fig.get("latency_err_ms"), fig.get("devices")
        if _number(lat) and lat > 0:
            return FleetFigure(float(lat), float(err) if _number(err) and err >= 0 else None,
                               n if isinstance(n, int) and not isinstance(n, bool) else 0, profile, cpu_name)
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def host_cpu_model() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it (what a device reports in its tuning figures)."""
    from edgerun.device import cpu_model

    return cpu_model()


@dataclass
class Candidate:
    """One variant on one backend, with its memory need and whether it was kept."""

    variant: Variant
    backend: str
    memory_bytes: int
    memory_measured: bool
    kept: bool = True
    reason: str = ""
    chosen: bool = False
    fleet: FleetFigure | None = None  # what devices of this one's profile measured, when the package says
    by_fleet: bool = False  # the package has fleet figures for this device: they rank the candidates, not the hub's

    @property
    def latency_ms(self) -> float | None:
        """The latency that ranks it: the fleet's for this device's profile when the package has them, else the
        hub's."""
        if self.fleet is not None:
            return self.fleet.latency_ms
        m = self.variant.measured.get(self.backend)
        return m.latency_ms if m else None

    @property
    def latency_source(self) -> str:
        """Whose latency ranks it: ``fleet: N devices of profile P[, CPU M]``, ``hub``, or why none does."""
        if self.fleet is not None:
            return self.fleet.describe()
        if self.by_fleet:
            return "no fleet figure for it: a tie on speed"
        return "hub" if self.latency_ms is not None else ""

    @property
    def accuracy(self) -> float | None:
        m = self.variant.measured.get(self.backend)
        if m and m.accuracy is not None:
            return m.accuracy
        return self.variant.accuracy


def memory_need(variant: Variant, backend: Backend) -> tuple[int, bool]:
    """Bytes the variant needs on ``backend`` and whether that figure was measured; unmeasured, the backend's
    ``memory_estimate`` (base + factor * file size, calibrated with benchmarks/calibrate_memory.py)."""
    m = variant.measured.get(backend.name)
    if m and m.memory_bytes:
        return m.memory_bytes, True
    if variant.memory_bytes:
        return variant.memory_bytes, True
    base, factor = backend.memory_estimate
    return int(base + factor * variant.size), False


def candidates(package: ModelPackage, profile: Profile, backends: dict[str, Backend], budget: int,
               cpu_class: str | None = None, keys: frozenset[str] | str = frozenset(),
               cpu_model: str | None = None) -> list[Candidate]:
    """Every (variant, backend) pair, each marked kept or dropped with the reason; an int8 variant made for other
    CPUs than this one's ``cpu_class`` (x86-vnni, x86, arm64) is dropped, and so is an encrypted variant that none of
    this device's ``keys`` (fingerprints, or why there are none) opens, or that the backend cannot load from memory.
    Each carries the fleet's figure for ``profile`` and ``cpu_model`` (default: this host's) when the package has one."""
    order = list(profile.prefer) + [b for b in backends if b not in profile.prefer]
    rank = {name: i for i, name in enumerate(order)}
    out: list[Candidate] = []
    for variant in package.variants:
        able = sorted((b for b in backends.values() if variant.format in b.formats), key=lambda b: rank.get(b.name, 99))
        if not able:
            known = sorted({f for b in backends.values() for f in b.formats})
            out.append(Candidate(variant, "-", 0, False, False, f"no installed backend loads format "
                                 f"{variant.format!r} (the backends here load {', '.join(known)})"))
            continue
        for backend in able:
            need, measured = memory_need(variant, backend)
            avail = backend.check()
            if not avail.available:
                out.append(Candidate(variant, backend.name, need, measured, False, f"backend {avail}"))
            elif (wrong := wrong_cpu(variant, cpu_class)):
                out.append(Candidate(variant, backend.name, need, measured, False, wrong))
            elif backend.name in (variant.info.get("not_for") or {}):
                out.append(Candidate(variant, backend.name, need, measured, False,
                                     f"not for {backend.name}: {variant.info['not_for'][backend.name]}"))
            elif backend.name in variant.failed:
                out.append(Candidate(variant, backend.name, need, measured, False,
                                     f"the hub could not run it on {backend.name}: {variant.failed[backend.name]}"))
            elif unusable := unsupported_tensors(package, backend):
                out.append(Candidate(variant, backend.name, need, measured, False, unusable))
            elif locked := not_for_here(variant, backend, keys):
                out.append(Candidate(variant, backend.name, need, measured, False, locked))
            elif need > budget:
                out.append(Candidate(variant, backend.name, need, measured, False,
                                     f"needs {format_size(need)} > budget {format_size(budget)}"))
            else:
                out.append(Candidate(variant, backend.name, need, measured, True, "fits"))
    return with_fleet_figures(out, profile, host_cpu_model() if cpu_model is None else cpu_model)


def with_fleet_figures(cands: list[Candidate], profile: Profile, cpu_model: str) -> list[Candidate]:
    """Give each candidate the fleet's figure for this device's profile and CPU model, when the package has one."""
    for c in cands:
        if c.backend != "-":
            c.fleet = fleet_figure(c.variant, c.backend, profile.name, cpu_model)
    by_fleet = any(c.fleet is not None for c in cands)
    for c in cands:
        c.by_fleet = by_fleet
    return cands


def wrong_cpu(variant: Variant, cpu_class: str | None) -> str:
    """Why ``variant`` is not for this CPU ('' when it is): int8 made for other CPUs' kernels."""
    targets = (variant.info.get("int8") or {}).get("targets")
    if not targets or cpu_class is None or cpu_class in targets:
        return ""
    return f"int8 made for {', '.join(targets)} CPUs, not this one ({cpu_class}): its kernels may saturate"


def unsupported_tensors(package: ModelPackage, backend: Backend) -> str:
    """Why ``backend`` cannot run the package's tensors ('' when it can)."""
    bad = getattr(backend, "unsupported_datatypes", frozenset())
    if not bad:
        return ""
    names = [f"{t.name} ({t.datatype})" for t in (*package.inputs, *package.outputs) if t.datatype in bad]
    return f"{backend.name} cannot run {'/'.join(sorted(bad))} tensors: {', '.join(names)}" if names else ""


# Accuracies this close to the best one count as equal: on a validation set of a few hundred examples
# a difference of one or two examples is noise, and should not buy a slower, less precise variant.
ACCURACY_TIE = 0.005


# Latencies this close count as equal, on top of their measured errors: a gap that small flips between
# packaging runs, and must not decide between a backend that needs 11 MiB and one that needs 50.
SPEED_TIE = 0.15
# A candidate needing 20% (and 1 MiB) less memory than another is lighter; closer figures are a tie (peak RSS moves
# by a few hundred KiB from one measurement to the next).
MEMORY_GAIN = 0.2
MEMORY_NOISE = 1 << 20


def _latency(c: Candidate) -> tuple[float, float | None]:
    """The latency and its error that rank ``c``: the fleet's figure for this device when the package carries
    one; when it carries some for this device but not for ``c``, the hub's latency without an error (a tie: hub
    and devices measured on different CPUs); else the hub's."""
    if c.fleet is not None:
        return c.fleet.latency_ms, c.fleet.latency_err_ms
    m = c.variant.measured.get(c.backend)
    if c.by_fleet:
        return (m.latency_ms if m and m.latency_ms is not None else float("inf")), None
    if m is None or m.latency_ms is None:
        return float("inf"), None
    return m.latency_ms, m.latency_err_ms


def clearly_faster(a: Candidate, b: Candidate, speed_tie: float = SPEED_TIE) -> bool:
    """``a`` is faster than ``b`` beyond both measured errors and by more than ``speed_tie``; a latency without an
    error (an older package, or one the hub could not time side by side) cannot be told from noise: a tie."""
    (la, ea), (lb, eb) = _latency(a), _latency(b)
    if ea is None or eb is None:
        return False
    return la + ea < lb - eb and la < lb * (1 - speed_tie)


def clearly_lighter(a: Candidate, b: Candidate) -> bool:
    """``a`` needs clearly less memory than ``b``."""
    return a.memory_bytes < b.memory_bytes * (1 - MEMORY_GAIN) and b.memory_bytes - a.memory_bytes > MEMORY_NOISE


def best_of(kept: list[Candidate], profile: Profile, *, speed_tie: float = SPEED_TIE,
            by_precision: bool = True) -> Candidate:
    """Most accurate (within ACCURACY_TIE of the best), then most precise, then fastest; latencies within their
    errors (or ``speed_tie``) are a tie, decided by memory when one is clearly lighter, then by the profile's order.
    On-device tuning passes its own ``speed_tie`` and ``by_precision=False``: a variant that agrees with fp32 on
    this device competes on latency whatever its precision (docs/tuning.md)."""
    rank = {name: i for i, name in enumerate(profile.prefer)}
    accuracies = [c.accuracy for c in kept if c.accuracy is not None]
    best = max(accuracies) if accuracies else None

    def tier(c: Candidate) -> tuple:
        acc = c.accuracy
        if acc is None:
            t = (2, 0.0)
        elif best is not None and best - acc <= ACCURACY_TIE:
            t = (0, 0.0)
        else:
            t = (1, -acc)
        return (*t, c.variant.precision_rank if by_precision else 0)

    top = min(tier(c) for c in kept)
    group = [c for c in kept if tier(c) == top]
    # no candidate clearly faster than them: every one no other beats beyond the errors and SPEED_TIE
    tied = [c for c in group if not any(clearly_faster(o, c, speed_tie) for o in group)]
    lightest = min(tied, key=lambda c: c.memory_bytes)
    light = [c for c in tied if not clearly_lighter(lightest, c)]
    return min(light, key=lambda c: (rank.get(c.backend, 99), c.variant.id, c.backend))


@hookimpl(trylast=True)
def choose_variant(package: ModelPackage, profile: Profile, candidates: list[Candidate]) -> Candidate | None:
    """The built-in rule: among kept candidates, the most accurate, then precise, then fast."""
    kept = [c for c in candidates if c.kept]
    return best_of(kept, profile) if kept else None


def no_fit_error(package: ModelPackage, cands: list[Candidate], budget: int) -> NoVariantFits:
    """The error when nothing fits: the smallest need and the budget, or why no backend can run it."""
    sized = [c for c in cands if c.backend != "-" and "budget" in c.reason]
    if sized:
        smallest = min(sized, key=lambda c: c.memory_bytes)
        return NoVariantFits(
            f"no variant of {package.name!r} fits the memory budget of {format_size(budget)}: the smallest, "
            f"{smallest.variant.id!r} on {smallest.backend}, needs {format_size(smallest.memory_bytes)}")
    grouped: dict[tuple[str, str], list[str]] = {}  # one entry per (backend, reason), naming its variants
    for c in cands:
        grouped.setdefault((c.backend, c.reason), []).append(c.variant.id)
    reasons = "; ".join(f"{', '.join(ids)}{'' if backend == '-' else f' on {backend}'}: {reason}"
                        for (backend, reason), ids in grouped.items()) or "the package has no variants"
    return NoVariantFits(f"no variant of {package.name!r} can run here ({reasons})")
