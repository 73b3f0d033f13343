"""Per model version inference statistics, in the shape of Triton's statistics extension.

Durations are cumulative nanoseconds with a count, as Triton reports them: ``success`` is a request's whole
time from its decoded body to its encoded answer, ``queue`` its wait for a run, ``compute_input`` the decode
and checks of its inputs, ``compute_infer`` the backend run it was part of, ``compute_output`` the encode of
its answer. ``batch_stats`` has one entry per batch size the scheduler ran.
"""

from __future__ import annotations

import time
from typing import Any


class Duration:
    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": int(self.seconds * 1e9)}


class BatchStats:
    __slots__ = ("compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()


class ModelStats:
    """One loaded model version's counters; updated on the event loop only.

    Every successful request adds to the same five durations, so they share one count (``answered``) and are
    kept as plain sums: this runs once per request."""

    __slots__ = ("name", "version", "last_inference", "inference_count", "execution_count", "answered", "success_s",
                 "queue_s", "input_s", "infer_s", "output_s", "fail", "batches")

    def __init__(self, name: str, version: int):
        self.name = name
        self.version = version
        self.last_inference = 0.0  # seconds since the epoch
        self.inference_count = 0  # rows inferred: a batched request counts each of its rows
        self.execution_count = 0  # backend runs: a batch of several requests is one
        self.answered = 0  # requests answered successfully; the count of the five sums below
        self.success_s = self.queue_s = self.input_s = self.infer_s = self.output_s = 0.0
        self.fail = Duration()
        self.batches: dict[int, BatchStats] = {}

    def request(self, rows: int, total: float, decode: float, wait: float, compute: float, encode: float) -> None:
        """A request answered successfully."""
        self.last_inference = time.time()
        self.inference_count += rows
        self.answered += 1
        self.success_s += total
        self.input_s += decode
        self.queue_s += wait
        self.infer_s += compute
        self.output_s += encode

    def failed(self, total: float) -> None:
        self.fail.add(total)

    def batch(self, rows: int, merge: float, compute: float, split: float) -> None:
        """A backend run over ``rows`` rows (one request or several stacked)."""
        self.execution_count += 1
        b = self.batches.get(rows)
        if b is None:
            b = self.batches[rows] = BatchStats()
        b.compute_input.add(merge)
        b.compute_infer.add(compute)
        b.compute_output.add(split)

    def to_dict(self) -> dict[str, Any]:
        """Triton's JSON form (``GET /v2/models/{m}/stats``); numbers, not strings, for every count."""
        zero = Duration().to_dict()
        n = self.answered

        def answered(seconds: float) -> dict[str, int]:
            return {"count": n, "ns": int(seconds * 1e9)}

        return {
            "name": self.name, "version": str(self.version), "last_inference": int(self.last_inference * 1000),
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {"success": answered(self.success_s), "fail": self.fail.to_dict(),
                                "queue": answered(self.queue_s), "compute_input": answered(self.input_s),
                                "compute_infer": answered(self.infer_s), "compute_output": answered(self.output_s),
                                "cache_hit": zero, "cache_miss": zero},
            "batch_stats": [{"batch_size": size, "compute_input": b.compute_input.to_dict(),
                             "compute_infer": b.compute_infer.to_dict(), "compute_output": b.compute_output.to_dict()}
                            for size, b in sorted(self.batches.items())],
            "memory_usage": [],
        }
