"""Per-model scheduling: a bounded queue, a limit on runs in flight, and dynamic batching on a thread pool."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from time import perf_counter, thread_time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgerun.config import BatchingConfig, ModelConfig
from edgerun.errors import Busy

if TYPE_CHECKING:
    from edgerun.runtime import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """How one model is scheduled: resolved from its ModelConfig and its interface."""

    batching: bool
    max_batch_size: int
    max_queue_delay: float  # seconds
    max_inflight: int
    max_queue: int
    inline_below: float = 0.0  # seconds: a run predicted shorter goes on the event loop (0: always a thread)


def has_batch_dim(model: LoadedModel) -> bool:
    """Whether every input and output has a dynamic first dimension (so requests can be stacked)."""
    return all(len(s.shape) >= 1 and s.shape[0] < 0 for s in (*model.inputs, *model.outputs))


INLINE_BELOW_US = 200  # inline_below_us by default
INLINE_BELOW_ONE_CPU_US = 1000  # ... when the server may use one CPU only


def policy_for(model: LoadedModel, cfg: ModelConfig | None, cpus: int = 2) -> Policy:
    """The model's policy from its config; ``cpus``: the CPUs the server may use.

    Unless configured, runs measured shorter than 200 µs go on the event loop, and with one CPU shorter than
    1 ms: there a worker thread cannot run beside the loop, so handing it a run buys no parallelism and costs two
    thread switches and the GIL's hand-over both ways (~100 µs of CPU per run, measured with the digits MLP),
    while a run of up to 1 ms on the loop delays the loop's other work by no more than that.
    """
    cfg = cfg or ModelConfig(path=model.package.root or ".")  # type: ignore[arg-type]
    b: BatchingConfig = cfg.batching
    batchable = has_batch_dim(model)
    enabled = batchable if b.enabled is None else b.enabled
    if b.enabled is None and batchable and model.batching_pays is False:
        enabled = False  # measured at load: stacking requests saves no compute here, it only adds copies and waits
    if enabled and not batchable:
        log.warning("model %s: batching is configured but not every input and output has a dynamic first "
                    "dimension; serving without batching", model.name)
        enabled = False
    inline = cfg.inline_below_us
    if inline is None:
        inline = INLINE_BELOW_ONE_CPU_US if cpus == 1 else INLINE_BELOW_US
    return Policy(enabled and b.max_batch_size > 1, max(1, b.max_batch_size), max(0, b.max_queue_delay_us) / 1e6,
                  max(1, cfg.max_inflight), max(1, cfg.max_queue), max(0, inline) / 1e6)


Done = Callable[[Any, "BaseException | None"], None]  # (result, None) or (None, error)


class _Item:
    """A queued request: its answer goes to a future (``submit``) or straight to a callback (``submit_call``)."""

    __slots__ = ("inputs", "future", "call", "rows", "key", "enqueued")

    def __init__(self, inputs: dict[str, np.ndarray], future: asyncio.Future | None, call: Done | None, rows: int,
                 key: Any, enqueued: float):
        self.inputs = inputs
        self.future = future
        self.call = call
        self.rows = rows
        self.key = key
        self.enqueued = enqueued

    def live(self) -> bool:
        """False once its requester has gone (the future cancelled, or ``cancel()``)."""
        future = self.future
        return self.call is not None if future is None else not future.done()

    def cancel(self) -> None:
        """The requester of a ``submit_call`` request left: it is not run if it has not started, never answered."""
        self.call = None

    def resolve(self, result: Any, exc: BaseException | None) -> None:
        future = self.future
        if future is None:
            call, self.call = self.call, None
            if call is not None:
                try:
                    call(result, exc)
                except Exception:
                    log.exception("answering a request failed")
        elif not future.done():
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)


def _no_clock() -> float:
    return 0.0


def _run_batch(model: LoadedModel, items: list[dict[str, np.ndarray]], rows: list[int],
               cpu_clock: Callable[[], float] = thread_time
               ) -> tuple[list[dict[str, np.ndarray]], float, float, float, float]:
    """Stack the requests along the first dimension, run once, split the outputs back (in a worker thread).

    Returns the outputs per request, the seconds spent stacking, running and splitting, and the CPU seconds this
    thread spent running: unlike the run's wall time, they leave out the wait for the GIL once the run is done
    (on a busy one-core device, up to the interpreter's 5 ms switch interval), so they say what the run would
    cost the event loop. A run on the loop passes ``_no_clock`` (0 CPU seconds): only its wall time is used, and
    the thread's CPU clock is a system call.
    """
    if len(items) == 1:
        t0, c0 = perf_counter(), cpu_clock()
        out = model.run_unchecked(items[0])
        return [out], 0.0, perf_counter() - t0, 0.0, cpu_clock() - c0
    t0 = perf_counter()
    merged = {name: np.concatenate([x[name] for x in items]) for name in items[0]}
    t1, c1 = perf_counter(), cpu_clock()
    out = model.run_unchecked(merged)
    t2, c2 = perf_counter(), cpu_clock()
    results = []
    start = 0
    for n in rows:
        end = start + n
        results.append({k: v[start:end] for k, v in out.items()})
        start = end
    return results, t1 - t0, t2 - t1, perf_counter() - t2, c2 - c1


class _Cost:
    """Moving averages of runs' wall time, CPU time and rows, to predict a run's time from its rows."""

    __slots__ = ("wall", "cpu", "rows")

    def __init__(self, wall: float, cpu: float, rows: int):
        self.wall, self.cpu, self.rows = wall, cpu, float(rows)

    @classmethod
    def update(cls, cost: _Cost | None, wall: float, cpu: float, rows: int) -> _Cost:
        if cost is None:
            return cls(wall, cpu, rows)
        cost.wall += (wall - cost.wall) * 0.2
        cost.cpu += (cpu - cost.cpu) * 0.2
        cost.rows += (rows - cost.rows) * 0.2
        return cost

    def seconds(self, rows: int) -> float:
        return self.wall * rows / self.rows

    def cpu_seconds(self, rows: int) -> float:
        return self.cpu * rows / self.rows


class ModelScheduler:
    """Queue and run one loaded model's requests, batching concurrent ones when the policy says so.

    A batch starts at once when no run of this model is in flight; while runs are in flight, a free slot
    waits until the batch is full or its oldest request has waited ``max_queue_delay``.

    A run goes to a worker thread, unless the model's runs are measured shorter than ``inline_below``: handing
    such a run to a thread and back costs more than the run (two thread switches, and on a one-core device the
    loop and the worker take turns), so it runs on the event loop, one batch per loop iteration. The first runs
    always go to a thread, and a model whose runs grow longer goes back to threads.

    A run on a thread is timed until it has the GIL back, and while the loop is busy that wait (up to the
    interpreter's switch interval, 5 ms) can be most of it, so a short model served from threads could look
    long for good. Runs on the loop are timed apart from runs on threads; when no loop run says otherwise and
    the threads' CPU time says the run is short, one run in PROBE_EVERY tries the loop (a probe that measures
    long doubles the wait before the next).
    """

    PROBE_EVERY = 32
    PROBE_EVERY_MAX = 4096

    def __init__(self, model: LoadedModel, policy: Policy, executor: Executor,
                 observe: Callable[[LoadedModel, int, float, float, float, list[float]], None] | None = None):
        self.model = model
        self.policy = policy
        self._executor = executor
        self._observe = observe
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._inflight = 0
        self._kick_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_cost: _Cost | None = None  # runs on the event loop: wall time
        self._thread_cost: _Cost | None = None  # runs on threads: wall time (with the GIL wait) and CPU time
        self._probe_every = self.PROBE_EVERY
        self._since_probe = 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, inputs: dict[str, np.ndarray]) -> asyncio.Future:
        """Queue checked inputs; the future resolves to (this request's outputs, seconds it waited, seconds its
        run took)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue(_Item(inputs, fut, None, 0, None, 0.0))
        return fut

    def submit_call(self, inputs: dict[str, np.ndarray], call: Done) -> _Item:
        """``submit`` without a future: ``call(result, None)`` or ``call(None, error)`` when the run is over, from
        the scheduler itself (perhaps before this returns), which saves a loop iteration per request. ``cancel()``
        on what it returns drops the request."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        item = _Item(inputs, None, call, 0, None, 0.0)
        self._queue(item)
        return item

    def _queue(self, item: _Item) -> None:
        inputs = item.inputs
        p = self.policy
        if len(self._pending) >= p.max_queue:
            raise Busy(f"model {self.model.name!r} is busy: its queue is full ({p.max_queue} requests waiting, "
                       f"{self._inflight} runs in flight); retry later")
        if p.batching:
            key: Any
            if len(inputs) == 1:  # the common case, without the loops below
                ((name, first),) = inputs.items()
                rows, key = (first.shape[0], ((name, first.shape[1:]),)) if first.ndim else (1, object())
            else:
                first = next(iter(inputs.values()))
                rows = first.shape[0] if first.ndim else 1
                if all(v.ndim and v.shape[0] == rows for v in inputs.values()):
                    key = tuple((k, v.shape[1:]) for k, v in inputs.items())
                else:
                    key = object()  # inputs disagree on the batch size: run alone, never split
        else:
            rows, key = 1, None
        item.rows, item.key, item.enqueued = rows, key, perf_counter()
        self._pending.append(item)
        self._pending_rows += rows
        if not p.batching and self._inflight < p.max_inflight:
            self._kick()
        elif not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)  # type: ignore[union-attr]  # requests read in this iteration join

    def _kick(self) -> None:
        self._kick_scheduled = False
        p = self.policy
        while self._pending and self._inflight < p.max_inflight:
            if p.batching and self._inflight and self._pending_rows < p.max_batch_size:
                wait = self._pending[0].enqueued + p.max_queue_delay - perf_counter()
                if wait > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(wait, self._on_timer)  # type: ignore[union-attr]
                    return
            if self._start(self._take()) and self._pending:
                # it ran on the event loop: let the loop read more requests (and answer others) before the next
                self._kick_scheduled = True
                self._loop.call_soon(self._kick)  # type: ignore[union-attr]
                return

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _take(self) -> list[_Item]:
        pending = self._pending
        batch = [pending.popleft()]
        rows = batch[0].rows
        if self.policy.batching:
            limit, key = self.policy.max_batch_size, batch[0].key
            while pending and pending[0].key == key and rows + pending[0].rows <= limit:
                item = pending.popleft()
                rows += item.rows
                batch.append(item)
        self._pending_rows -= rows
        return batch

    def _start(self, batch: list[_Item]) -> bool:
        """Run a batch: on the event loop when its run is predicted short, else on a worker thread; True when it
        ran on the loop (and is done)."""
        live = [it for it in batch if it.live()]  # drop requests whose client went away
        if not live:
            return False
        self._inflight += 1
        now = perf_counter()
        waits = [now - it.enqueued for it in live]
        inputs, rows = [it.inputs for it in live], [it.rows for it in live]
        total = sum(rows)
        if self._on_loop(total):
            try:
                result = _run_batch(self.model, inputs, rows, _no_clock)
            except Exception as exc:
                self._finish(live, waits, None, exc)
            else:
                self._finish(live, waits, result, None)
                self._loop_cost = _Cost.update(self._loop_cost, result[2], result[4], total)
                if result[2] >= self.policy.inline_below:  # a probe that measured long
                    self._probe_every = min(self._probe_every * 2, self.PROBE_EVERY_MAX)
            return True
        fut = self._executor.submit(_run_batch, self.model, inputs, rows)
        call_back = self._loop.call_soon_threadsafe  # type: ignore[union-attr]
        fut.add_done_callback(lambda f: call_back(self._done, live, waits, f))
        return False

    def _on_loop(self, rows: int) -> bool:
        """Whether a run of ``rows`` rows goes on the event loop (see the class's description)."""
        limit = self.policy.inline_below
        if not limit or self._thread_cost is None:
            return False
        if self._loop_cost is not None:
            if self._loop_cost.seconds(rows) < limit:
                return True
        elif self._thread_cost.seconds(rows) < limit:
            return True
        if self._thread_cost.cpu_seconds(rows) < limit:
            self._since_probe += 1
            if self._since_probe >= self._probe_every:
                self._since_probe = 0
                return True
        return False

    def _done(self, batch: list[_Item], waits: list[float], fut: Future) -> None:
        exc = fut.exception()
        result = None if exc is not None else fut.result()
        self._finish(batch, waits, result, exc)
        if result is not None:
            self._thread_cost = _Cost.update(self._thread_cost, result[2], result[4], sum(it.rows for it in batch))
        if self._pending:
            self._kick()

    def _finish(self, batch: list[_Item], waits: list[float], result: Any, exc: BaseException | None) -> None:
        self._inflight -= 1
        if exc is not None:
            for it in batch:
                it.resolve(None, exc)
            return
        results, merge, compute, split, _ = result
        for it, r, wait in zip(batch, results, waits):
            it.resolve((r, wait, compute), None)
        rows = sum(it.rows for it in batch)
        if self._observe is not None:
            self._observe(self.model, rows, merge, compute, split, waits)
