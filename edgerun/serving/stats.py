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
    """One loaded model version's counters; updated on the event loop only."""

    __slots__ = ("name", "version", "last_inference", "inference_count", "execution_count", "success", "fail",
                 "queue", "compute_input", "compute_infer", "compute_output", "batches")

    def __init__(self, name: str, version: int):
        self.name = name
        self.version = version
        self.last_inference = 0  # ms since the epoch
        self.inference_count = 0  # rows inferred: a batched request counts each of its rows
        self.execution_count = 0  # backend runs: a batch of several requests is one
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}

    def request(self, rows: int, total: float, decode: float, wait: float, compute: float, encode: float) -> None:
        """A request answered successfully."""
        self.last_inference = int(time.time() * 1000)
        self.inference_count += rows
        self.success.add(total)
        self.compute_input.add(decode)
        self.queue.add(wait)
        self.compute_infer.add(compute)
        self.compute_output.add(encode)

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
        return {
            "name": self.name, "version": str(self.version), "last_inference": self.last_inference,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {"success": self.success.to_dict(), "fail": self.fail.to_dict(),
                                "queue": self.queue.to_dict(), "compute_input": self.compute_input.to_dict(),
                                "compute_infer": self.compute_infer.to_dict(),
                                "compute_output": self.compute_output.to_dict(),
                                "cache_hit": zero, "cache_miss": zero},
            "batch_stats": [{"batch_size": size, "compute_input": b.compute_input.to_dict(),
                             "compute_infer": b.compute_infer.to_dict(), "compute_output": b.compute_output.to_dict()}
                            for size, b in sorted(self.batches.items())],
            "memory_usage": [],
        }
