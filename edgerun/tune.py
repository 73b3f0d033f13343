"""On-device tuning: measure a package's candidates here (variant x backend x options) and pick by what was measured.

Each candidate runs in a child process of its own (``edgerun.trial``); the children are timed in interleaved rounds,
so a drift in the machine's speed falls on all of them alike. All variants are measured at the options serving uses,
then the options that matter (thread count and each backend's ``tuning_options``) on the fastest few. The pick
follows the variant choice's rules (accuracy tier, then latency beyond the errors, then memory) with the device's
figures; a candidate whose answers here disagree with fp32 is dropped. See docs/tuning.md.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from edgerun import choice as choice_mod
from edgerun.contract import TunedCandidate, TuningInfo
from edgerun.errors import TuningFailed
from edgerun.package import Measurement, ModelPackage
from edgerun.trial import Trial, TrialFailed, TrialSpec, class_path

log = logging.getLogger(__name__)

# Device figures are medians of interleaved runs on this very CPU, with their errors: a smaller gap than the hub's
# SPEED_TIE (set for figures that move between packaging runs) tells candidates apart here.
DEVICE_SPEED_TIE = 0.03
TARGET_ERROR = 0.02  # a candidate is timed until its median is known within 2% (or the budget runs out)
MIN_RUNS = 20
BATCH_MS = 20.0  # each turn of a candidate in a round runs about this long
GAP = 0.01  # seconds between two candidates' turns: the worker threads of the one before stop spinning
MAX_ALIVE = 12  # children loaded at once; more candidates are measured in waves
TOP = 2  # variant/backend pairs whose options are tried
# A small model's speed differs from one process to the next by up to 1.7x (where its memory lands): the finalists
# are timed again in CONFIRM fresh processes each, and an exhaustive run times every candidate in PROCESSES.
CONFIRM = 2
PROCESSES = 3


@dataclass(frozen=True)
class TuneSettings:
    """How to tune: the time budget, each candidate's timeout, the memory a candidate may use."""

    budget: float = 30.0  # seconds for the whole tuning of one model
    candidate_timeout: float = 20.0  # seconds a candidate may take to load and check, or to answer a batch of runs
    memory_budget: int | None = None  # bytes a candidate may grow by; default: the runtime's memory budget
    exhaustive: bool = False  # every combination of every option on every pair (benchmarks)
    nice: int = 10


@dataclass(eq=False)
class Measured:
    """One candidate as this device measured it."""

    cand: choice_mod.Candidate
    options: dict[str, Any]
    trial: Trial | None = None
    kept: bool = True
    reason: str = ""
    agreement: float | None = None
    samples: int = 0
    peak: int | None = None
    times: list[float] = field(default_factory=list)  # this process's runs (ms)
    processes: list[list[float]] = field(default_factory=list)  # the runs of earlier processes

    @property
    def key(self) -> tuple[str, str, tuple]:
        return self.cand.variant.id, self.cand.backend, tuple(sorted(self.options.items()))

    def median(self) -> tuple[float, float] | None:
        """The median latency (ms) and its error: the half-width of its 95% confidence interval (order statistics);
        timed in several processes, the median of their medians, the error at least half their spread (a small
        model's speed differs from one process to the next, as its memory lands differently)."""
        per = [m for m in map(_median_ci, [*self.processes, self.times]) if m is not None]
        if len(per) <= 1:
            return per[0] if per else None
        meds = sorted(m for m, _ in per)
        mid = len(meds) // 2
        med = meds[mid] if len(meds) % 2 else (meds[mid - 1] + meds[mid]) / 2
        return med, max(max(e for _, e in per), (meds[-1] - meds[0]) / 2)

    def converged(self) -> bool:
        """This process's (or the last one's) median is known within TARGET_ERROR."""
        times = self.times or (self.processes[-1] if self.processes else [])
        m = _median_ci(times)
        return m is not None and len(times) >= MIN_RUNS and m[1] <= TARGET_ERROR * m[0]

    def new_process(self) -> None:
        """Close this candidate's process; the next ``_measure`` times it in a fresh one."""
        self.close()
        if self.times:
            self.processes.append(self.times)
            self.times = []

    def drop(self, reason: str) -> None:
        self.kept, self.reason = False, reason
        self.close()

    def close(self) -> None:
        if self.trial is not None:
            if self.trial.peak:
                self.peak = self.trial.peak
            self.trial.close()
            self.trial = None

    def result(self) -> TunedCandidate:
        m = self.median()
        return TunedCandidate(self.cand.variant.id, self.cand.backend, dict(self.options),
                              round(m[0], 6) if m else None, round(m[1], 6) if m else None,
                              self.peak, None if self.agreement is None else round(self.agreement, 4), self.kept,
                              self.reason)


Progress = Callable[[float, str], None]


def _median_ci(times: list[float]) -> tuple[float, float] | None:
    """The median of ``times`` and the half-width of its 95% confidence interval (order statistics)."""
    n = len(times)
    if n < 3:
        return None
    xs = sorted(times)
    half = 0.98 * n ** 0.5
    lo, hi = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half + 0.999))
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return med, (xs[hi] - xs[lo]) / 2


class Tuner:
    """Tunes one package on a runtime's device, profile and backends."""

    def __init__(self, runtime: Any, settings: TuneSettings | None = None, *, progress: Progress | None = None,
                 cancelled: Callable[[], bool] | None = None):
        self.runtime = runtime
        self.settings = settings or TuneSettings()
        self.progress = progress or (lambda fraction, message: None)
        self.cancelled = cancelled or (lambda: False)
        self.notes: list[str] = []

    # --- what to measure -------------------------------------------------------------------

    def option_sets(self, backend: str, *, every: bool = False) -> list[dict[str, Any]]:
        """The options to try on ``backend`` besides its defaults, one change at a time; ``every``: all combinations
        (the defaults first)."""
        rt = self.runtime
        facts = rt.facts
        b = rt.backends[backend]
        configured = rt.load_options(backend)
        n = max(1, facts.cpu_count)
        threads = sorted({1, n // 2 if n >= 4 else 1, n} - {configured.threads})
        dims: list[tuple[str, list[Any]]] = [("threads", threads)]
        for name, values in b.tuning_options(facts).items():
            current = configured.extra.get(name, values[0] if values else None)
            dims.append((name, [v for v in values if v != current]))
        if not every:
            return [{name: v} for name, values in dims for v in values]
        axes = [[None, *values] for _, values in dims]
        out = []
        for combo in itertools.product(*axes):
            opts = {name: v for (name, _), v in zip(dims, combo) if v is not None}
            if opts:
                out.append(opts)
        return out

    def _spec(self, pkg: ModelPackage, m: Measured) -> TrialSpec:
        rt = self.runtime
        b = rt.backends[m.cand.backend]
        lo = rt.load_options(b.name, m.options)
        dk = rt.device_key
        keys = tuple(str(k) for k in (dk.path, *dk.extra)) if m.cand.variant.encrypted else ()
        return TrialSpec(str(pkg.model_file or pkg.root), m.cand.variant.id, b.name, class_path(type(b)), lo.device,
                         lo.threads, lo.extra, keys, self.settings.nice)

    # --- measuring -------------------------------------------------------------------------

    def _check(self, m: Measured, val_len: int) -> None:
        """Drop a candidate whose top-1 on the validation sample agrees with fp32 clearly less than the hub measured."""
        from edgerun.runtime import VALIDATION_SLACK

        if m.agreement is None or not val_len:
            return
        v = m.cand.variant
        hub = float((v.info.get("validation") or {}).get("agreement", 1.0)) if v.precision != "fp32" else 1.0
        if m.agreement < hub - max(VALIDATION_SLACK, 2 / val_len) - 1e-9:
            m.drop(f"wrong on this device: agrees with fp32 on {m.agreement:.0%} of the {val_len} validation "
                   f"examples, {hub:.0%} expected")

    def _measure(self, pkg: ModelPackage, group: list[Measured], deadline: float, budget: int) -> None:
        """Start, check and time ``group`` in interleaved rounds until each median is known or the deadline."""
        s = self.settings
        val_len = len(pkg.validation) if pkg.validation is not None else 0
        fresh = [m for m in group if m.trial is None and m.kept]
        for m in fresh:
            m.trial = Trial(self._spec(pkg, m), memory_limit=budget, timeout=s.candidate_timeout)
            m.trial.start()

        def ready(m: Measured) -> None:
            try:
                m.trial.ready()  # type: ignore[union-attr]
                m.agreement, m.samples = m.trial.agreement, m.trial.validation_samples  # type: ignore[union-attr]
                m.trial.time_runs(3)  # type: ignore[union-attr]  # warm: not counted
            except TrialFailed as exc:
                m.drop(str(exc))

        if fresh:  # the children load side by side: one that hangs costs its timeout once, not once per candidate
            with ThreadPoolExecutor(len(fresh), thread_name_prefix="edgerun-tune") as pool:
                list(pool.map(ready, fresh))
        for m in fresh:
            if m.kept:
                self._check(m, val_len)
        rng = random.Random()  # a fresh order each time: no candidate is always timed after the same one
        first = True  # every candidate gets one turn, even past the deadline
        while not self.cancelled() and (first or time.monotonic() < deadline):
            live = [m for m in group if m.kept and m.trial is not None and not m.converged()]
            if not live:
                break
            rng.shuffle(live)
            for m in live:
                if (not first and time.monotonic() >= deadline) or self.cancelled():
                    break
                est = m.median()
                per = est[0] if est else 1.0
                n = max(3, min(1000, int(BATCH_MS / max(per, 1e-3))))
                time.sleep(GAP)  # the last candidate's worker threads stop spinning before this one is timed
                try:
                    m.times.extend(m.trial.time_runs(n))  # type: ignore[union-attr]
                except TrialFailed as exc:
                    m.drop(str(exc))
            first = False

    # --- the whole tuning ------------------------------------------------------------------

    def tune(self, package: str | Path | ModelPackage) -> TuningInfo:
        """Measure and pick; the result names the chosen candidate, the default one and every one measured."""
        rt = self.runtime
        s = self.settings
        t0 = time.monotonic()
        pkg = rt.open_package(package)
        choice = rt.explain(pkg)
        if choice.chosen is None:
            raise choice_mod.no_fit_error(pkg, choice.candidates, choice.budget)
        budget = s.memory_budget if s.memory_budget is not None else choice.budget
        from edgerun.runtime import _files_present

        pairs = [c for c in choice.candidates if c.kept and _files_present(pkg, c.variant)]
        absent = sorted({c.variant.id for c in choice.candidates if c.kept and not _files_present(pkg, c.variant)})
        if absent:
            self.notes.append(f"not measured: {', '.join(absent)} (files not on this device)")
        if pkg.validation is None or not len(pkg.validation):
            self.notes.append("the package has no validation sample: latency and memory tuned, answers checked on "
                              "the warm-up samples only")
        deadline = t0 + s.budget
        everything: list[Measured] = []
        try:
            if s.exhaustive:  # every candidate in PROCESSES processes, in waves
                everything = [Measured(c, o) for c in pairs for o in [{}, *self.option_sets(c.backend, every=True)]]
                waves = [everything[i:i + MAX_ALIVE] for i in range(0, len(everything), MAX_ALIVE)] * PROCESSES
                for i, wave in enumerate(waves):
                    self.progress(i / len(waves), f"measuring {len(wave)} candidates")
                    self._measure(pkg, wave, time.monotonic() + (deadline - time.monotonic()) / (len(waves) - i),
                                  budget)
                    for m in wave:
                        m.new_process()
            else:
                everything = [Measured(c, {}) for c in pairs]
                self.progress(0.0, f"measuring {len(everything)} variant/backend pairs")
                self._measure(pkg, everything, t0 + s.budget * 0.5, budget)
                best = self.pick(everything, choice)
                ranked = sorted((m for m in everything if m.kept and m.median() is not None and m is not best),
                                key=lambda m: m.median()[0])  # type: ignore[index]
                top = ([best] if best else []) + ranked[:TOP - 1]
                for m in everything:
                    if m not in top:
                        m.close()
                extra = [Measured(m.cand, o) for m in top for o in self.option_sets(m.cand.backend)]
                everything += extra
                if extra and time.monotonic() < deadline:
                    self.progress(0.4, f"measuring {len(extra)} option settings of {len(top)} pair(s)")
                    self._measure(pkg, top + extra, t0 + s.budget * 0.7, budget)
                # the finalists again, each in a fresh process: a gap that was one process's luck closes
                best = self.pick(everything, choice)
                default = next((m for m in everything if m.cand is choice.chosen and not m.options), None)
                rest = sorted((m for m in everything if m.kept and m.median() is not None
                               and m is not best and m is not default), key=lambda m: m.median()[0])  # type: ignore[index]
                finalists = list(dict.fromkeys(m for m in (best, default, *rest[:1]) if m is not None and m.kept))
                for m in everything:
                    if m not in finalists:
                        m.close()
                for r in range(CONFIRM):
                    if not finalists or time.monotonic() >= deadline:
                        break
                    for m in finalists:
                        m.new_process()
                    self.progress(0.7 + 0.25 * r / CONFIRM, f"confirming {len(finalists)} finalist(s) in fresh "
                                                             f"processes ({r + 1} of {CONFIRM})")
                    self._measure(pkg, finalists, t0 + s.budget * (0.7 + 0.25 * (r + 1) / CONFIRM), budget)
        finally:
            for m in everything:
                m.close()
        complete = True
        for m in everything:
            if m.kept and m.median() is None:
                m.kept, m.reason = False, "not measured: the time budget ran out"
                complete = False
            elif m.kept and not m.converged():
                complete = False
        self.progress(1.0, "picking")
        chosen = self.pick(everything, choice)
        default = next((m for m in everything if m.cand is choice.chosen and not m.options), None)
        info = TuningInfo(pkg.name, pkg.version, chosen.result() if chosen else None,
                          default.result() if default else TunedCandidate(choice.chosen.variant.id,
                                                                          choice.chosen.backend, {}, kept=False,
                                                                          reason="not measured"),
                          tuple(m.result() for m in everything), rt.facts.cpu_model, rt.facts.cpu_class,
                          rt.profile.name, round(time.monotonic() - t0, 3), complete, time.time())
        if chosen is None:
            raise TuningFailed(f"tuning {pkg.name!r}: no candidate could be measured here: "
                               + "; ".join(f"{m.cand.variant.id} on {m.cand.backend}: {m.reason}"
                                           for m in everything[:4]))
        return info

    def side_by_side(self, package: str | Path | ModelPackage, wanted: list[tuple[str, str, dict[str, Any]]],
                     seconds: float, processes: int = PROCESSES) -> list[TunedCandidate]:
        """Time the given (variant, backend, options) candidates against each other: interleaved rounds, each in
        ``processes`` fresh processes in turn, ``seconds`` in all (comparisons, e.g. benchmarks/tune.py)."""
        pkg = self.runtime.open_package(package)
        choice = self.runtime.explain(pkg)
        pairs = {(c.variant.id, c.backend): c for c in choice.candidates if c.kept}
        group = [Measured(pairs[(v, b)], dict(o)) for v, b, o in wanted]
        end = time.monotonic() + seconds
        try:
            for r in range(processes):
                for m in group:
                    m.new_process()
                self._measure(pkg, group, time.monotonic() + (end - time.monotonic()) / (processes - r),
                              choice.budget)
        finally:
            for m in group:
                m.close()
        return [m.result() for m in group]

    def pick(self, measured: list[Measured], choice: Any) -> Measured | None:
        """The variant choice's rules on this device's figures: accuracy tier, latency beyond the errors, memory."""
        kept = [m for m in measured if m.kept and m.median() is not None]
        if not kept:
            return None
        by_id: dict[int, Measured] = {}
        cands = []
        for m in kept:
            med, err = m.median()  # type: ignore[misc]
            c = m.cand
            hub = c.variant.measured.get(c.backend)
            figures = Measurement(latency_ms=med, latency_err_ms=err, memory_bytes=m.peak or c.memory_bytes,
                                  accuracy=hub.accuracy if hub else None)
            v = replace(c.variant, measured={**c.variant.measured, c.backend: figures})
            cand = choice_mod.Candidate(v, c.backend, m.peak or c.memory_bytes, m.peak is not None)
            by_id[id(cand)] = m
            cands.append(cand)
        best = choice_mod.best_of(cands, self.runtime.profile, speed_tie=DEVICE_SPEED_TIE, by_precision=False)
        return by_id[id(best)]


def tune(runtime: Any, package: str | Path | ModelPackage, settings: TuneSettings | None = None,
         progress: Progress | None = None) -> TuningInfo:
    """Tune ``package`` on ``runtime``'s device (see Tuner)."""
    return Tuner(runtime, settings, progress=progress).tune(package)


def same_choice(info: TuningInfo, model: Any) -> bool:
    """Whether a loaded model already runs the tuned pick."""
    c = info.chosen
    return c is not None and (model.variant.id, model.backend, model.options) == (c.variant, c.backend, c.options)
