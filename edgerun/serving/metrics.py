"""Prometheus metrics for every front end: requests, failures, latencies, batches, models, connections, process."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgerun.hookspecs import hookimpl
from edgerun.runtime import Runtime
from edgerun.serving.access import REFUSALS

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    """A histogram updated from the event loop only: no lock, one bisect per observation (prometheus_client's
    takes a lock per observation, which the request path would pay on every request)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*(floatToGoString(b) for b in self.bounds), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


class _PerModel:
    """What the request path counts for one model name."""

    __slots__ = ("requests", "latency", "queue", "compute", "batch")

    def __init__(self) -> None:
        self.requests = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.queue = _Histogram(LATENCY_BUCKETS)
        self.compute = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)


class _RequestsCollector(Collector):
    """Requests, failures, latencies and batch sizes, read from the counts at scrape time."""

    def __init__(self, metrics: "ServerMetrics"):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        per_model = self.metrics.per_model
        requests = CounterMetricFamily("edgerun_requests", "Inference requests answered successfully",
                                       labels=["model"])
        failures = CounterMetricFamily("edgerun_request_failures", "Failed requests by reason",
                                       labels=["model", "reason"])
        histograms = [
            (HistogramMetricFamily("edgerun_request_duration_seconds",
                                   "Inference request time from body received to response ready", labels=["model"]),
             "latency"),
            (HistogramMetricFamily("edgerun_queue_duration_seconds", "Time requests wait before their run starts",
                                   labels=["model"]), "queue"),
            (HistogramMetricFamily("edgerun_compute_duration_seconds", "Backend run time per batch",
                                   labels=["model"]), "compute"),
            (HistogramMetricFamily("edgerun_batch_size", "Rows per backend run", labels=["model"]), "batch"),
        ]
        for model, m in sorted(per_model.items()):
            requests.add_metric([model], m.requests)
            for family, name in histograms:
                h = getattr(m, name)
                family.add_metric([model], h.cumulative(), h.sum)
        for (model, reason), n in sorted(self.metrics.failed.items()):
            failures.add_metric([model, reason], n)
        yield requests
        yield failures
        for family, _ in histograms:
            yield family


class _ModelsCollector(Collector):
    """Loaded models, read from the runtime at scrape time."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version", "variant", "backend", "device"]
        loaded = GaugeMetricFamily("edgerun_model_loaded", "Model versions being served (1 each)", labels=labels)
        memory = GaugeMetricFamily("edgerun_model_memory_bytes", "Resident memory added by loading the model",
                                   labels=labels)
        inflight = GaugeMetricFamily("edgerun_model_inflight", "Runs of the model in progress", labels=labels)
        for m in self.runtime.models():
            values = [m.name, str(m.version), m.variant.id, m.backend, str(m.session.device)]
            loaded.add_metric(values, 1)
            memory.add_metric(values, m.memory_bytes)
            inflight.add_metric(values, m.inflight)
        yield loaded
        yield memory
        yield inflight


class _QueueCollector(Collector):
    """Requests waiting per model version, read from the server's schedulers at scrape time."""

    def __init__(self, queues: Callable[[], Iterable[tuple[str, int, int]]]):
        self.queues = queues

    def collect(self) -> Iterator[Any]:
        queued = GaugeMetricFamily("edgerun_model_queued", "Requests waiting for a run of the model",
                                   labels=["model", "version"])
        for name, version, n in self.queues():
            queued.add_metric([name, str(version)], n)
        yield queued


class _FrontDoorCollector(Collector):
    """A listener's connections and held request bytes, at scrape time: the HTTP server's
    (``edgerun.server.http.FrontDoor``) as ``edgerun_connections_*`` and ``edgerun_request_body_bytes_held``, the
    loop gRPC server's as ``edgerun_grpc_connections_*`` and ``edgerun_grpc_request_bytes_held``."""

    NAMES = {"http": ("edgerun_connections", "edgerun_request_body_bytes_held", "HTTP",
                      "Request-body bytes received for requests not answered yet"),
             "grpc": ("edgerun_grpc_connections", "edgerun_grpc_request_bytes_held", "gRPC",
                      "Bytes of the gRPC request messages being received")}

    def __init__(self, door: Any, protocol: str):
        self.door = door
        self.connections, self.held, self.what, self.held_help = self.NAMES[protocol]

    def collect(self) -> Iterator[Any]:
        cut = CounterMetricFamily(f"{self.connections}_cut", f"{self.what} connections the server closed on a "
                                  "client, by reason", labels=["reason"])
        for reason, n in self.door.cut.items():
            cut.add_metric([reason], n)
        yield cut
        yield GaugeMetricFamily(f"{self.connections}_open", f"Open {self.what} connections", value=self.door.open)
        yield GaugeMetricFamily(self.held, self.held_help, value=self.door.held)


class _ModelEvents:
    """A plugin counting model activations and update transitions."""

    def __init__(self, counter: Counter):
        self.counter = counter

    @hookimpl
    def on_model_activated(self, model: str, version: int, variant: str, backend: str) -> None:
        self.counter.labels(model, "activated").inc()

    @hookimpl
    def on_update_event(self, model: str, version: int, state: str, detail: str) -> None:
        self.counter.labels(model, state).inc()


class ServerMetrics:
    """One registry per app, so several servers (or tests) in a process don't collide.

    The request path's counts (``success``, ``failure``, ``batch``) are plain numbers updated from the event
    loop, turned into Prometheus families when ``/metrics`` is read.
    """

    def __init__(self, runtime: Runtime, queues: Callable[[], Iterable[tuple[str, int, int]]] = tuple):
        r = self.registry = CollectorRegistry()
        self.per_model: dict[str, _PerModel] = {}
        self.failed: dict[tuple[str, str], int] = {}
        self._doors: dict[str, Collector] = {}
        self.auth_refusals = Counter("edgerun_auth_refusals", "Requests refused by access control, by reason",
                                     ["reason"], registry=r)
        for reason in REFUSALS:
            self.auth_refusals.labels(reason)
        self.model_events = Counter("edgerun_model_events", "Model activations and update state transitions",
                                    ["model", "event"], registry=r)
        r.register(_RequestsCollector(self))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        PlatformCollector(registry=r)  # python_info
        r.register(_ModelsCollector(runtime))
        r.register(_QueueCollector(queues))
        self._events_plugin = _ModelEvents(self.model_events)
        runtime.pm.register(self._events_plugin)

    def _for(self, model: str) -> _PerModel:
        m = self.per_model.get(model)
        if m is None:
            m = self.per_model[model] = _PerModel()
        return m

    def success(self, model: str, seconds: float) -> None:
        m = self._for(model)
        m.requests += 1
        m.latency.observe(seconds)

    def failure(self, model: str, reason: str) -> None:
        key = (model, reason)
        self.failed[key] = self.failed.get(key, 0) + 1

    def refused(self, reason: str, failure: str) -> None:
        """A request refused by access control: ``reason`` one of REFUSALS, ``failure`` unauthorized or forbidden."""
        self.auth_refusals.labels(reason).inc()
        self.failure("", failure)

    def batch(self, model: str, rows: int, compute: float, waits: list[float]) -> None:
        """One backend run of ``rows`` rows, and how long each request in it waited."""
        m = self._for(model)
        m.batch.observe(rows)
        m.compute.observe(compute)
        queue = m.queue
        for w in waits:
            queue.observe(w)

    def watch_front_door(self, door: Any, protocol: str = "http") -> None:
        """Export a listener's connection counts and held request bytes (``protocol``: "http" or "grpc"); a
        listener started again replaces its protocol's earlier one."""
        old = self._doors.pop(protocol, None)
        if old is not None:
            self.registry.unregister(old)
        self._doors[protocol] = collector = _FrontDoorCollector(door, protocol)
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
