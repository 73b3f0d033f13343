"""The inference service every front end calls: model look-up, input and output checks, scheduling, statistics.

A front end (HTTP, gRPC) is glue around ``InferenceService.infer``: it hands over a ``decode`` callable that
turns its request into input arrays for the model found, and an ``encode`` callable that turns the outputs
into its answer. The service does the rest the same way for all of them: it looks the model up (again, if a
swap retired the version between look-up and run), refuses unknown outputs before the model runs, checks the
inputs, queues them on the model's scheduler (batching), and records metrics and statistics.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, TypeVar

import numpy as np

from edgerun.config import Config, ModelConfig
from edgerun.errors import ClientGone, EdgerunError, Forbidden, ModelNotFound, ModelNotReady, Retired, Unauthenticated
from edgerun.serving.access import Access, Grant, bearer
from edgerun.serving.batching import ModelScheduler, Policy, has_batch_dim, policy_for
from edgerun.serving.metrics import ServerMetrics
from edgerun.serving.modelconfig import model_config
from edgerun.serving.repository import ModelRepository
from edgerun.serving.stats import ModelStats
from edgerun.tensors import TensorSpec
from edgerun.units import decimal

if TYPE_CHECKING:
    from edgerun.runtime import LoadedModel, Runtime

log = logging.getLogger(__name__)

ATTEMPTS = 3  # look-ups per request when swaps keep retiring the version found
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics", "metrics"]
T = TypeVar("T")


class Decoded(Protocol):
    """What a front end's ``decode`` returns: input arrays and the outputs asked for (None: all)."""

    inputs: dict[str, Any]

    @property
    def output_names(self) -> list[str] | None: ...


class InternalError(EdgerunError):
    """An unexpected failure while serving a request (logged with its traceback)."""


class _Served:
    """What the service keeps per loaded model version."""

    __slots__ = ("scheduler", "specs", "out_types", "batched", "stats")

    def __init__(self, model: LoadedModel, scheduler: ModelScheduler):
        self.scheduler = scheduler
        self.specs = {t.name: t for t in model.inputs}
        self.out_types = {t.name: t.datatype for t in model.outputs}
        self.batched = has_batch_dim(model)
        self.stats = ModelStats(model.name, model.version)


class InferenceService:
    """Serve a Runtime's models to any number of front ends; one per server process."""

    def __init__(self, runtime: Runtime, config: Config, *, workers: int = 32, access: Access | None = None):
        self.runtime = runtime
        self.config = config
        self.access = access if access is not None else Access.from_config(config.server)
        self.metrics = ServerMetrics(runtime, self._queues)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgerun-infer")
        self._model_configs = _ModelConfigs(runtime, config.models)
        self._served: dict[LoadedModel, _Served] = {}
        self.repository = ModelRepository(runtime, config.server.repository_dir, admin=self.access.enabled)

    # --- access ----------------------------------------------------------------------------

    def identify(self, authorization: str | bytes | None) -> Grant:
        """The grant of a request's ``authorization`` header (or gRPC metadata); refusals are counted."""
        try:
            return self.access.identify(bearer(authorization) if self.access.enabled else None)
        except Unauthenticated as exc:
            self.metrics.refused(getattr(exc, "refusal", "unknown_token"), exc.reason)
            raise

    def check(self, grant: Grant, action: str, model: str | None = None) -> None:
        """Forbidden unless ``grant`` allows ``action`` on ``model`` (None: every model); refusals are counted."""
        try:
            self.access.check(grant, action, model)
        except Forbidden as exc:
            self.metrics.refused(getattr(exc, "refusal", "scope"), exc.reason)
            raise

    def authorize(self, authorization: str | bytes | None, action: str, model: str | None = None) -> Grant:
        grant = self.identify(authorization)
        self.check(grant, action, model)
        return grant

    # --- models ----------------------------------------------------------------------------

    def model(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The loaded model for a name and version (the highest when None), or ModelNotFound naming what is."""
        if isinstance(version, str):
            number = decimal(version)
            if number is None:
                raise ModelNotFound(f"model {name!r} has no version {version[:40]!r}; versions are positive "
                                    "integers")
            version = number
        return self.runtime.model(name, version)

    def versions(self, name: str) -> list[int]:
        return [m.version for m in self.runtime.models() if m.name == name]

    def policy(self, model: LoadedModel) -> Policy:
        return policy_for(model, self._model_configs.get(model), self.runtime.facts.cpu_count)

    def served(self, model: LoadedModel) -> _Served:
        s = self._served.get(model)
        if s is None:
            live = set(self.runtime.models())
            for old in [m for m in self._served if m not in live]:
                del self._served[old]
            s = self._served[model] = _Served(model, ModelScheduler(model, self.policy(model), self.executor,
                                                                      self._observe))
        return s

    def specs(self, model: LoadedModel) -> tuple[dict[str, TensorSpec], dict[str, str]]:
        """Input specs by name and output datatypes by name."""
        s = self.served(model)
        return s.specs, s.out_types

    def model_config(self, model: LoadedModel) -> dict[str, Any]:
        """Triton's model configuration for a loaded version (see edgerun.serving.modelconfig)."""
        return model_config(model, self.policy(model), self.served(model).batched)

    def statistics(self, name: str | None = None, version: str | int | None = None) -> list[dict[str, Any]]:
        """Triton's statistics of every loaded version, of a model's, or of one version."""
        if name is None:
            models = self.runtime.models()
        elif version is None:
            self.model(name)  # ModelNotFound when it is not loaded
            models = [m for m in self.runtime.models() if m.name == name]
        else:
            models = [self.model(name, version)]
        return [self.served(m).stats.to_dict() for m in models]

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config's per-model settings (SIGHUP); models scheduled from now on use them."""
        self.config = config
        self._model_configs = _ModelConfigs(self.runtime, config.models)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)

    # --- inference -------------------------------------------------------------------------

    async def infer(self, name: str, version: str | int | None,
                    decode: Callable[[LoadedModel], Decoded | Awaitable[Decoded]],
                    encode: Callable[[LoadedModel, dict[str, np.ndarray]], T], *,
                    wait: Callable[[Any], Awaitable[Any]] | None = None) -> T:
        """Decode, check, queue (batched), run, select the outputs asked for and encode them.

        ``decode`` may be a coroutine function (a large body decoded off the event loop). ``wait`` awaits the
        scheduler's future (a front end that watches for its client leaving passes its own); errors are
        EdgerunErrors, each carrying its HTTP status and gRPC code.
        """
        run = _Run(self, name, version)
        try:
            for _ in range(ATTEMPTS):
                model = run.look_up()
                request = decode(model)
                if asyncio.iscoroutine(request):
                    request = await request
                fut = run.submit(request)
                try:
                    result = await (fut if wait is None else wait(fut))
                    break
                except Retired:
                    continue  # swapped out between look-up and run: look the model up again
            else:
                raise ModelNotReady(f"model {name!r} is being replaced; retry")
            return run.finish(result, encode)
        except Exception as exc:
            error = run.failed(exc)
            if error is exc:
                raise
            raise error from None

    def infer_soon(self, name: str, version: str | int | None, decode: Callable[[LoadedModel], Decoded],
                   encode: Callable[[LoadedModel, dict[str, np.ndarray]], T],
                   done: Callable[[T | None, EdgerunError | None], None]) -> _Run:
        """What :meth:`infer` does, without a task of its own: ``decode`` is plain, and ``done(answer, None)`` or
        ``done(None, error)`` is called on the event loop when the request is over (perhaps before this returns).
        A front end that answers many small calls saves a task per call this way. The request's ``cancel()``
        says its client left: a queued run is dropped and ``done`` gets ClientGone."""
        run = _Run(self, name, version)
        run.start(decode, encode, done)
        return run

    def _observe(self, model: LoadedModel, rows: int, merge: float, compute: float, split: float,
                 waits: list[float]) -> None:
        self.metrics.batch(model.name, rows, compute, waits)
        s = self._served.get(model)
        if s is not None:
            s.stats.batch(rows, merge, compute, split)

    def _queues(self) -> list[tuple[str, int, int]]:
        """(model, version, requests waiting) per scheduler, for /metrics."""
        live = set(self.runtime.models())
        return [(m.name, m.version, s.scheduler.queued) for m, s in list(self._served.items()) if m in live]


class _Run:
    """One inference request's way through the service: look-up, checks and queueing, then the answer and its
    metrics; or the failure, counted."""

    __slots__ = ("service", "name", "version", "t0", "t1", "label", "served", "model", "wanted", "checked",
                 "attempts", "decode", "encode", "done", "queued", "gone")

    def __init__(self, service: InferenceService, name: str, version: str | int | None):
        self.service, self.name, self.version = service, name, version
        self.t0 = self.t1 = perf_counter()
        self.label = ""
        self.served: _Served | None = None
        self.model: LoadedModel | None = None
        self.wanted: list[str] | None = None
        self.checked: dict[str, np.ndarray] = {}
        self.queued: Any = None  # the scheduler's item while a started request waits for its run
        self.gone = False

    def start(self, decode: Callable[[LoadedModel], Decoded], encode: Callable[[LoadedModel, dict], Any],
              done: Callable[[Any, EdgerunError | None], None]) -> None:
        """InferenceService.infer_soon's request: no closure refers back to another (no garbage cycle per call)."""
        self.attempts, self.decode, self.encode, self.done = ATTEMPTS, decode, encode, done
        try:
            self._attempt()
        except Exception as exc:
            done(None, self.failed(exc))

    def cancel(self) -> None:
        """The client left (a request started with ``start``): its run is dropped if it has not started, and it
        fails with ClientGone now."""
        self.gone = True
        item, self.queued = self.queued, None
        if item is not None and item.live():
            item.cancel()
            self.done(None, self.failed(ClientGone()))

    def _attempt(self) -> None:
        self.attempts -= 1
        request = self.decode(self.look_up())
        self.wanted_and_checked(request)
        item = self.served.scheduler.submit_call(self.checked, self._ran)  # type: ignore[union-attr]
        if item.live():  # (not answered already)
            self.queued = item

    def _retry(self) -> None:
        if self.gone:
            self.done(None, self.failed(ClientGone()))
            return
        try:
            self._attempt()
        except Exception as exc:
            self.done(None, self.failed(exc))

    def _ran(self, result: Any, exc: BaseException | None) -> None:
        """The scheduler's answer to ``_attempt``'s request (called by the scheduler, not by the loop)."""
        self.queued = None
        try:
            if isinstance(exc, Retired):
                if self.attempts > 0 and not self.gone:
                    # swapped out between look-up and run: look the model up again, from the loop (not from
                    # inside the scheduler that ran the retired version)
                    asyncio.get_running_loop().call_soon(self._retry)
                    return
                raise ModelNotReady(f"model {self.name!r} is being replaced; retry")
            if exc is not None:
                raise exc
            answer = self.finish(result, self.encode)
        except Exception as exc:
            self.done(None, self.failed(exc))
            return
        self.done(answer, None)

    def look_up(self) -> LoadedModel:
        model = self.model = self.service.model(self.name, self.version)
        self.label = model.name
        self.served = self.service.served(model)
        return model

    def submit(self, request: Decoded) -> asyncio.Future:
        self.wanted_and_checked(request)
        return self.served.scheduler.submit(self.checked)  # type: ignore[union-attr]

    def wanted_and_checked(self, request: Decoded) -> None:
        """The outputs asked for (unknown names refused) and the checked inputs, before the request is queued."""
        model = self.model
        self.wanted = model.select_outputs(request.output_names)  # type: ignore[union-attr]
        self.checked = model.check_inputs(request.inputs)  # type: ignore[union-attr]
        self.t1 = perf_counter()

    def finish(self, result: tuple, encode: Callable[[LoadedModel, dict[str, np.ndarray]], T]) -> T:
        outputs, waited, computed = result
        t2 = perf_counter()
        wanted = self.wanted
        answer = encode(self.model, outputs if wanted is None else {k: outputs[k] for k in wanted})  # type: ignore
        t3 = perf_counter()
        served, t0 = self.served, self.t0
        self.service.metrics.success(self.label, t3 - t0)
        first = next(iter(self.checked.values()))
        rows = first.shape[0] if served.batched and first.ndim else 1  # type: ignore[union-attr]
        served.stats.request(rows, t3 - t0, self.t1 - t0, waited, computed, t3 - t2)  # type: ignore[union-attr]
        return answer

    def failed(self, exc: Exception) -> EdgerunError:
        """Count a failure; the EdgerunError to give the client (``exc`` itself when it is one)."""
        if isinstance(exc, EdgerunError):
            error = exc
        else:
            log.error("inference on %s failed", self.name, exc_info=exc)
            error = InternalError(f"inference failed: {type(exc).__name__}: {exc}")
        self.service.metrics.failure(self.label, error.reason)
        if self.served is not None:
            self.served.stats.failed(perf_counter() - self.t0)
        return error


class _ModelConfigs:
    """Each loaded model's [[models]] entry: the one naming its package directory, else the last with its name.

    Two entries may hold two versions of one model (each with its own batching and limits), so the package
    directory decides first; a version that arrived later by an update, from a directory no entry names,
    takes the settings of the model's name.
    """

    def __init__(self, runtime: Runtime, models: tuple[ModelConfig, ...]):
        roots = {Path(m.package.root).resolve(): m.name for m in runtime.models() if m.package.root is not None}
        self.by_root: dict[Path, ModelConfig] = {}
        self.by_name: dict[str, ModelConfig] = {}
        for mc in models:
            root = Path(mc.path).resolve()
            name = mc.name or roots.get(root)
            if name is None:
                try:
                    from edgerun.package import ModelPackage

                    name = ModelPackage.load(mc.path).name
                except EdgerunError:
                    continue
            self.by_root[root] = mc
            self.by_name[name] = mc

    def get(self, model: LoadedModel) -> ModelConfig | None:
        if model.package.root is not None:
            mc = self.by_root.get(Path(model.package.root).resolve())
            if mc is not None:
                return mc
        return self.by_name.get(model.name)
