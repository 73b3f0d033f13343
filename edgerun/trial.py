"""One tuning candidate measured in a child process of its own: loaded, checked, timed, watched and killed if need be.

The parent starts ``python -m edgerun.trial`` at low priority and talks to it in JSON lines: the child loads the
variant with the given options, runs the package's warm-up samples and validation sample, then times batches of
runs on request. A crash, a hang (a timeout) or memory past the budget ends the child, never the serving process,
and the peak memory measured is the child's own.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # how often the parent reads the child's resident memory while it waits


class TrialFailed(Exception):
    """The candidate cannot be measured here: it crashed, hung, went over the memory budget or gave wrong answers."""


@dataclass(frozen=True)
class TrialSpec:
    """What the child needs: where the package is, which variant on which backend class, with which options."""

    package: str
    variant: str
    backend: str
    backend_class: str  # module:qualname, importable in the child (a plugin registered in the parent)
    device: str | None
    threads: int | None
    extra: dict[str, Any]
    device_keys: tuple[str, ...] = ()  # the device key and the fleet key: what opens an encrypted variant
    nice: int = 10

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "variant": self.variant, "backend": self.backend,
                "backend_class": self.backend_class, "device": self.device, "threads": self.threads,
                "extra": self.extra, "device_keys": list(self.device_keys), "nice": self.nice}


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Trial:
    """The parent's handle on one child: start it, wait for it to be ready, time runs, close it."""

    def __init__(self, spec: TrialSpec, *, memory_limit: int | None = None, timeout: float = 30.0):
        self.spec = spec
        self.memory_limit = memory_limit  # bytes over the child's resident memory before the model was loaded
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr = tempfile.TemporaryFile()
        self.baseline = 0  # the child's RSS before it loaded the model
        self.peak = 0  # the most the child's RSS grew over the baseline (bytes)
        self.agreement: float | None = None
        self.validation_samples = 0
        self.times_ms: list[float] = []
        self.closed = False

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # plugins registered here import there too
        env.setdefault("EDGERUN_LOG_LEVEL", "WARNING")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgerun.trial"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env, start_new_session=True)
        threading.Thread(target=self._read, name="edgerun-trial-reader", daemon=True).start()
        self._send(self.spec.to_dict())

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                continue
        self._lines.put(None)

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: the next read says why

    def _rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:  # type: ignore[union-attr]
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The child's next message, watching its memory; TrialFailed when it crashes, hangs or overshoots."""
        deadline = time.monotonic() + timeout
        while True:
            if self.baseline and self.memory_limit is not None:
                grown = self._rss() - self.baseline
                self.peak = max(self.peak, grown)
                if grown > self.memory_limit:
                    self.kill()
                    from edgerun.units import format_size

                    raise TrialFailed(f"over the memory budget: it grew by {format_size(grown)} while measured, "
                                      f"the budget is {format_size(self.memory_limit)}")
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TrialFailed(f"timed out: no answer within {timeout:.0f}s while {event.replace('_', ' ')}")
            try:
                msg = self._lines.get(timeout=min(POLL_SECONDS, left))
            except queue.Empty:
                continue
            if msg is None:
                raise TrialFailed(self._crash_reason())
            if msg.get("event") == "failed":
                self.close()
                raise TrialFailed(str(msg.get("reason")))
            if msg.get("event") == "started":
                self.baseline = int(msg.get("rss") or 0)
                continue
            return msg

    def _crash_reason(self) -> str:
        assert self.proc is not None
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        self.closed = True
        if code is not None and code < 0:
            try:
                what = f"signal {signal.Signals(-code).name}"
            except ValueError:
                what = f"signal {-code}"
        else:
            what = f"exit status {code}"
        self._stderr.seek(0)
        tail = [ln.strip() for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return f"crashed ({what})" + (f": {tail[-1]}" if tail else "")

    def ready(self) -> None:
        """Wait until the model is loaded, warmed up and checked on the validation sample."""
        msg = self._expect("loading", self.timeout)
        self.agreement = msg.get("agreement")
        self.validation_samples = int(msg.get("samples") or 0)
        self.peak = max(self.peak, int(msg.get("peak") or 0) - self.baseline)

    def time_runs(self, n: int, timeout: float | None = None) -> list[float]:
        """Time ``n`` runs back to back; each run's milliseconds."""
        self._send({"runs": n})
        msg = self._expect("timing", timeout or self.timeout)
        got = [float(t) for t in msg.get("ms") or ()]
        self.peak = max(self.peak, int(msg.get("peak") or 0) - self.baseline)
        self.times_ms.extend(got)
        return got

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            self.proc.wait()
        self.closed = True
        self._stderr.close()

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not."""
        if self.proc is None or self.closed:
            return
        self._send({"quit": True})
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


# --- the child ---------------------------------------------------------------------------------


def _rss_self() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_self() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timing_inputs(pkg: Any, model: Any) -> dict[str, Any]:
    """One batch-1 input: a validation example, else the first warm-up sample's first row, else zeros."""
    import numpy as np

    if pkg.validation is not None and len(pkg.validation):
        return pkg.validation.rows()[0]
    if pkg.samples:
        out = {}
        for spec in model.inputs:
            arr = pkg.samples[0].inputs[spec.name]
            out[spec.name] = arr[:1] if spec.shape and spec.shape[0] < 0 and arr.ndim and len(arr) > 1 else arr
        return out
    return {s.name: np.zeros(tuple(d if d > 0 else 1 for d in s.shape), dtype=s.dtype) for s in model.inputs}


def _child() -> int:
    import importlib

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what a backend library prints goes to stderr, not into the answers

    def say(**msg: Any) -> None:
        out.write(json.dumps(msg) + "\n")

    spec = json.loads(sys.stdin.readline())
    try:
        os.nice(int(spec.get("nice") or 0))
    except OSError:
        pass
    import numpy as np
    import pluggy

    from edgerun import hookspecs
    from edgerun.backend import LoadOptions
    from edgerun.devicekey import DeviceKey
    from edgerun.errors import EdgerunError
    from edgerun.runtime import LoadedModel, Runtime, _check_interface, _warm_up

    module, _, qualname = spec["backend_class"].partition(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)

    class _One:
        @hookspecs.hookimpl
        def register_backends(self, register: Any) -> None:
            register(cls)

    pm = pluggy.PluginManager("edgerun")
    pm.add_hookspecs(hookspecs)
    pm.register(importlib.import_module("edgerun.choice"), name="edgerun.choice")
    pm.register(_One(), name=spec["backend"])
    keys = [Path(k) for k in spec.get("device_keys") or ()] or [Path(os.devnull)]
    rt = Runtime(plugin_manager=pm, device_key=DeviceKey(keys[0], extra=tuple(keys[1:])))
    backend = rt.backends[spec["backend"]]
    pkg = rt.open_package(spec["package"])
    variant = pkg.variant(spec["variant"])
    opts = LoadOptions(device=spec.get("device"), threads=spec.get("threads"), extra=dict(spec.get("extra") or {}))
    backend.check()  # imports the backend's library: what a serving process holds already is not the model's
    say(event="started", rss=_rss_self())
    try:
        if variant.encrypted:
            session = rt._load_encrypted(pkg, variant, backend, opts)
        else:
            session = backend.load(pkg.path_of(variant.main_file), opts)
        _check_interface(pkg, session)
        model = LoadedModel(pkg, variant, backend.name, session, 0, 0.0)
        _warm_up(model)
        agreement, samples = None, 0
        val = pkg.validation
        if val is not None and len(val):
            first = model.outputs[0].name
            top = np.array([int(np.argmax(model.run(row)[first])) for row in val.rows()])
            agreement, samples = float(np.mean(top == val.top1)), len(val)
        inputs = model.check_inputs(_timing_inputs(pkg, model))
    except (EdgerunError, Exception) as exc:
        say(event="failed", reason=str(exc) if isinstance(exc, EdgerunError) else f"{type(exc).__name__}: {exc}")
        return 0
    say(event="ready", agreement=agreement, samples=samples, peak=_peak_self())
    run = session.run
    clock = time.perf_counter_ns
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            break
        times = []
        for _ in range(int(msg.get("runs") or 1)):
            t0 = clock()
            run(inputs)
            times.append((clock() - t0) / 1e6)
        say(event="timed", ms=times, peak=_peak_self())
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
