"""Tuning beside serving: after a model version starts serving, tune it in the background and swap to the pick.

One model at a time, in one thread; the candidates run in low-priority child processes, so serving goes on at full
speed on the default choice. The swap is the one updates use (``Runtime.prepare`` then ``Runtime.activate``). A
cached result (``edgerun.tunecache``) is applied without measuring again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgerun.config import TuningConfig
from edgerun.contract import TuningInfo
from edgerun.errors import EdgerunError
from edgerun.tune import TuneSettings, Tuner, same_choice
from edgerun.tunecache import TuningCache

log = logging.getLogger(__name__)

DEFER_POLL = 5.0  # seconds between looks at the load while tuning waits for a quieter moment


@dataclass(frozen=True)
class Job:
    model: str
    version: int
    mode: str
    budget: float
    update: bool  # activated by an update (the agent), not from the configuration or a restore


class AutoTuner:
    """Queues activated model versions and tunes them one at a time, beside serving."""

    def __init__(self, runtime: Any, config: TuningConfig, state_dir: str | Path,
                 on_tuned: Callable[[TuningInfo], None] | None = None):
        self.runtime = runtime
        self.config = config
        self.cache = TuningCache(state_dir)
        self.on_tuned = on_tuned
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy: str | None = None  # "model vN" while tuning it
        self.idle = threading.Event()
        self.idle.set()

    # --- from the daemon and the updater ---------------------------------------------------

    def cached(self, pkg: Any) -> TuningInfo | None:
        """The cached pick for a package about to be loaded (restart, reload), when automatic tuning is on."""
        if self.config.mode == "off":
            return None
        info = self.cache.get(self.runtime, pkg)
        if info is not None:
            self.runtime.tuned[pkg.name] = info
        return info

    def activated(self, model: Any, *, mode: str | None = None, budget: float | None = None,
                  update: bool = False) -> None:
        """A model version started serving: tune it (per ``mode``) unless it already runs the tuned pick."""
        mode = mode or self.config.mode
        info = self.runtime.tuned.get(model.name)
        if info is not None and info.version != model.version:
            self.runtime.tuned.pop(model.name, None)  # what serves now was not measured (yet)
            info = None
        if mode == "off":
            return
        if info is not None and info.version == model.version and same_choice(info, model):
            return
        self.idle.clear()
        self._jobs.put(Job(model.name, model.version, mode, budget or self.config.budget, update))
        self.start()

    # --- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="edgerun-tuning", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                if self._jobs.empty():
                    self.idle.set()
                continue
            if job is None:
                break
            try:
                self.busy = f"{job.model} v{job.version}"
                self._run(job)
            except Exception as exc:  # tuning must never take serving down
                reason = str(exc) if isinstance(exc, EdgerunError) else f"{type(exc).__name__}: {exc}"
                log.warning("tuning %s v%d failed; it keeps serving on the default choice: %s", job.model,
                            job.version, reason)
            finally:
                self.busy = None
                if self._jobs.empty():
                    self.idle.set()

    def _serving(self, job: Job) -> Any:
        try:
            m = self.runtime.model(job.model)
        except EdgerunError:
            return None
        return m if m.version == job.version else None

    def _run(self, job: Job) -> None:
        model = self._serving(job)
        if model is None:
            return  # replaced or unloaded while queued
        pkg = model.package
        info = self.cache.get(self.runtime, pkg)
        if info is None:
            if job.mode == "first" and self.cache.tuned_before(job.model):
                log.info("%s v%d: not tuned (tuning.mode = \"first\": an earlier version was tuned here)",
                         job.model, job.version)
                return
            if not self._quiet_enough(job):
                return
            log.info("tuning %s v%d (budget %.0fs) while it serves on %s on %s", job.model, job.version, job.budget,
                     model.variant.id, model.backend)
            settings = TuneSettings(budget=job.budget, candidate_timeout=self.config.candidate_timeout)
            tuner = Tuner(self.runtime, settings, cancelled=lambda: self._stop.is_set() or self._serving(job) is None)
            info = tuner.tune(pkg)
            if self._stop.is_set() or self._serving(job) is None:
                return
            self.cache.put(self.runtime, pkg, info)
            log.info("tuned %s v%d in %.1fs: %s", job.model, job.version, info.seconds, describe(info))
        self.apply(info)

    def _quiet_enough(self, job: Job) -> bool:
        """Wait while the host is busy (tuning.defer_load), at most tuning.max_defer seconds."""
        limit = self.config.defer_load
        if limit <= 0:
            return True
        cores = max(1, self.runtime.facts.cpu_count)
        waited = 0.0
        while os.getloadavg()[0] / cores > limit and waited < self.config.max_defer:
            if waited == 0:
                log.info("tuning %s v%d deferred: load %.2f per core > tuning.defer_load %.2f", job.model,
                         job.version, os.getloadavg()[0] / cores, limit)
            if self._stop.wait(DEFER_POLL):
                return False
            waited += DEFER_POLL
        return not self._stop.is_set()

    def apply(self, info: TuningInfo) -> None:
        """Serve the tuned pick: load it beside the serving session, then swap (no request fails)."""
        rt = self.runtime
        c = info.chosen
        current = self._serving(Job(info.model, info.version, "", 0, False))
        if current is None or c is None:
            return
        rt.tuned[info.model] = info
        if not same_choice(info, current):
            loaded = rt.prepare(current.package, variant=c.variant, backend=c.backend, options=c.options,
                                verify=False)
            if self._serving(Job(info.model, info.version, "", 0, False)) is None:
                loaded.retire()
                return
            rt.activate(loaded, keep_other_versions=True)
            log.info("%s v%d now serves the tuned pick: %s", info.model, info.version, describe(info))
        if self.on_tuned is not None:
            self.on_tuned(info)


def describe(info: TuningInfo) -> str:
    """One line: the pick and its latency against the default's."""
    c, d = info.chosen, info.default
    if c is None:
        return "nothing could be measured"
    opts = ", ".join(f"{k}={v}" for k, v in sorted(c.options.items())) or "default options"
    line = f"{c.variant} on {c.backend} ({opts})"
    if c.latency_ms is not None:
        line += f", {c.latency_ms:.3f} ms"
        if d is not None and d.latency_ms and (d.variant, d.backend, d.options) != (c.variant, c.backend, c.options):
            line += f" (default {d.variant} on {d.backend}: {d.latency_ms:.3f} ms, {d.latency_ms / c.latency_ms:.2f}x)"
    return line
