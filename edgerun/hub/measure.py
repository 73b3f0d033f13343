"""Measuring variants in fresh subprocesses: peak memory and outputs of each, then latencies side by side.

``measure`` runs one variant on one backend: the child (``python -m edgerun.hub.measure JOB.json``) loads it with
``Runtime.prepare`` on one thread, reads its peak RSS, runs the whole validation set (batch 1) and the package's
warm-up samples and saves the outputs for the parent to score. ``time_side_by_side`` then loads every
(variant, backend) pair in one child and times them interleaved (round after round, in a shuffled order, so a
noisy moment of a shared machine hits them all alike), in several such children one after the other. A child's
figure for a pair is its fastest timing sample: noise on a shared machine only ever adds time. The latency is the
median of the children's figures and its error their median absolute deviation from it (for three, the distance to
the nearer of the other two): what differs from one process to the next (memory layout, the core it ran on, a busy
neighbour) is in the error, and one process that ran a variant several times slower moves neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.errors import EdgerunError


@dataclass(frozen=True)
class Timing:
    """A latency from ``processes`` timing processes and its error (their median absolute deviation; half their range
    from two; None from one)."""

    latency_ms: float
    error_ms: float | None
    processes: int


@dataclass
class Measured:
    """What one (variant, backend) run produced; ``error`` is set instead when it could not run."""

    backend: str
    latency_ms: float | None = None
    memory_bytes: int | None = None
    outputs: np.ndarray | None = None  # first output over the whole validation set
    sample_outputs: list[dict[str, np.ndarray]] | None = None
    error: str | None = None


def measure(package_dir: Path, variant: str, backend: str, inputs_npz: Path, work: Path, *, repeats: int = 50,
            max_seconds: float = 3.0, timeout: float = 600.0) -> Measured:
    """Run the measuring child for ``variant`` on ``backend``; never raises for a variant that fails to run."""
    work.mkdir(parents=True, exist_ok=True)
    job = work / f"{variant}.{backend}.json"
    out = work / f"{variant}.{backend}.npz"
    job.write_text(json.dumps({"package": str(package_dir), "variant": variant, "backend": backend,
                               "inputs": str(inputs_npz), "out": str(out), "repeats": repeats,
                               "max_seconds": max_seconds}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGERUN_LOG_LEVEL": "ERROR"}
    try:
        proc = subprocess.run([sys.executable, "-m", "edgerun.hub.measure", str(job)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=work)
    except subprocess.TimeoutExpired:
        return Measured(backend, error=f"measurement timed out after {timeout:.0f}s")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return Measured(backend, error=lines[-1] if lines else f"measuring process exited with {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out, allow_pickle=False) as z:
        outputs = z["__outputs__"]
        samples: list[dict[str, np.ndarray]] = []
        for key in z.files:
            if key.startswith("sample"):
                i, name = key[len("sample"):].split("/", 1)
                while len(samples) <= int(i):
                    samples.append({})
                samples[int(i)][name] = z[key]
    return Measured(backend, result["latency_ms"], result["memory_bytes"], outputs, samples)


@dataclass
class Timings:
    """Latencies timed side by side, by (variant, backend), and why a timing process failed, if one did."""

    by_pair: dict[tuple[str, str], Timing]
    failures: list[str]


TIMING_PROCESSES = 3


def time_side_by_side(package_dir: Path, pairs: list[tuple[str, str]], inputs_npz: Path, work: Path, *,
                      budget: float = 10.0, rel_error: float = 0.02, processes: int = TIMING_PROCESSES,
                      timeout: float = 900.0) -> Timings:
    """Time every (variant, backend) pair interleaved in one child, backends mixed, in ``processes`` children one
    after the other (``budget`` seconds in all); each latency is the median of the children's fastest samples and its
    error their median absolute deviation. A pair timed by a single child has no error: it never counts as faster."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGERUN_LOG_LEVEL": "ERROR"}
    figures: dict[tuple[str, str], list[float]] = {tuple(p): [] for p in pairs}
    failures: list[str] = []
    for i in range(processes):
        job = work / f"timing{i}.json"
        job.write_text(json.dumps({"mode": "timing", "package": str(package_dir), "pairs": pairs, "seed": i,
                                   "inputs": str(inputs_npz), "budget": budget / processes, "rel_error": rel_error}))
        try:
            proc = subprocess.run([sys.executable, "-m", "edgerun.hub.measure", str(job)], capture_output=True,
                                  text=True, timeout=timeout, env=env, cwd=work)
        except subprocess.TimeoutExpired:
            failures.append(f"timing process {i + 1} timed out after {timeout:.0f}s")
            continue
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            failures.append(f"timing process {i + 1} failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
            continue
        for t in json.loads(proc.stdout.strip().splitlines()[-1]):
            figures[(t["variant"], t["backend"])].append(t["fastest_ms"])
    by_pair = {}
    for pair, xs in figures.items():
        if xs:
            med = float(np.median(xs))
            error = float(np.median([abs(x - med) for x in xs])) if len(xs) > 2 else (
                abs(xs[1] - xs[0]) / 2 if len(xs) == 2 else None)
            by_pair[pair] = Timing(med, error, len(xs))
    return Timings(by_pair, failures)


def median_interval(samples: list[float]) -> tuple[float, float]:
    """The median and the half-width of its distribution-free 95% confidence interval (order statistics)."""
    xs = sorted(samples)
    n = len(xs)
    med = float(np.median(xs))
    half_band = 0.98 * n ** 0.5  # 1.96 * sqrt(n) / 2
    lo, hi = max(0, int(np.floor(n / 2 - half_band))), min(n - 1, int(np.ceil(n / 2 + half_band)))
    return med, (xs[hi] - xs[lo]) / 2


# --- the child ---------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import psutil

    from edgerun.runtime import Runtime

    rt = Runtime(threads=1)
    b = rt.backends.get(job["backend"])
    if b is None:
        raise EdgerunError(f"backend {job['backend']!r} is not installed")
    avail = b.availability()
    if not avail.available:
        raise EdgerunError(f"backend {job['backend']}: {avail}")
    rt.explain(job["package"], memory_budget=1 << 40)  # device facts and every backend library, before the baseline
    with np.load(job["inputs"], allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    n = len(next(iter(data.values())))
    first = {k: v[:1] for k, v in data.items()}
    proc = psutil.Process()
    peak_resettable = _reset_peak()
    rss0 = proc.memory_info().rss
    model = rt.prepare(job["package"], variant=job["variant"], backend=job["backend"], verify=False, warmup=False,
                       memory_budget=1 << 40)
    for _ in range(3):
        model.run_unchecked(first)
    times = []
    deadline = time.perf_counter() + float(job["max_seconds"])
    for i in range(int(job["repeats"])):
        row = {k: v[i % n:i % n + 1] for k, v in data.items()}
        t0 = time.perf_counter()
        model.run_unchecked(row)
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 and time.perf_counter() > deadline:
            break
    hwm = _status_kib("VmHWM")
    peak = hwm * 1024 if (hwm is not None and peak_resettable) else proc.memory_info().rss
    memory = max(0, peak - rss0)
    # accuracy: the whole validation set one example at a time, like the timed runs and a device serving single
    # requests (dynamic int8 quantizes activations per run, so a row's output depends on what else is in its batch)
    first_out = model.outputs[0].name
    chunks = [model.run_unchecked({k: v[i:i + 1] for k, v in data.items()})[first_out] for i in range(n)]
    arrays: dict[str, np.ndarray] = {"__outputs__": np.concatenate(chunks)}
    for i, sample in enumerate(model.package.samples):
        for name, arr in model.run(sample.inputs).items():
            arrays[f"sample{i}/{name}"] = arr
    np.savez(job["out"], **arrays)
    model.retire()
    return {"latency_ms": float(np.median(times) * 1000.0), "memory_bytes": int(memory)}


MIN_SAMPLES = 15
SAMPLE_SECONDS = 0.002  # a timing sample is the mean of enough runs to last this long


def _timing_child(job: dict[str, Any]) -> list[dict[str, Any]]:
    import random

    from edgerun.runtime import Runtime

    rt = Runtime(threads=1)
    with np.load(job["inputs"], allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    first = {k: v[:1] for k, v in data.items()}
    models, runs = {}, {}
    for vid, backend in map(tuple, job["pairs"]):
        m = rt.prepare(job["package"], variant=vid, backend=backend, verify=False, warmup=False,
                       memory_budget=1 << 40)
        for _ in range(5):
            m.run_unchecked(first)
        t0 = time.perf_counter()
        m.run_unchecked(first)
        once = max(time.perf_counter() - t0, 1e-6)
        models[(vid, backend)], runs[(vid, backend)] = m, max(1, int(SAMPLE_SECONDS / once))
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    order = list(models)
    rng = random.Random(int(job.get("seed", 0)))
    deadline = time.perf_counter() + float(job["budget"])
    while True:
        rng.shuffle(order)
        for key in order:
            m, k = models[key], runs[key]
            t0 = time.perf_counter()
            for _ in range(k):
                m.run_unchecked(first)
            samples[key].append((time.perf_counter() - t0) / k)
        if min(len(s) for s in samples.values()) < MIN_SAMPLES:
            continue
        done = all(e <= float(job["rel_error"]) * med for med, e in map(median_interval, samples.values()))
        if done or time.perf_counter() > deadline:
            break
    return [{"variant": vid, "backend": backend, "fastest_ms": min(s) * 1000.0,
             "median_ms": float(np.median(s)) * 1000.0, "samples": len(s)} for (vid, backend), s in samples.items()]


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = _timing_child(job) if job.get("mode") == "timing" else _child(job)
    except EdgerunError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
