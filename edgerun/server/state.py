"""What the routes share: the runtime, per-model schedulers and policies, metrics and limits."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgerun.config import Config, ModelConfig
from edgerun.errors import EdgerunError
from edgerun.runtime import LoadedModel, Runtime
from edgerun.server.asgi import DisconnectWatch
from edgerun.server.auth import BearerAuth
from edgerun.server.batching import ModelScheduler, Policy, policy_for
from edgerun.server.errors import HttpError
from edgerun.server.metrics import ServerMetrics
from edgerun.tensors import TensorSpec

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, runtime: Runtime, config: Config):
        self.runtime = runtime
        self.config = config
        self.max_body = config.server.max_body
        token = config.server.token()
        self.auth = BearerAuth(token) if token else None
        self.metrics = ServerMetrics(runtime, self._queues)
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="edgerun-infer")
        self._model_configs = _ModelConfigs(runtime, config.models)
        self._schedulers: dict[LoadedModel, ModelScheduler] = {}
        self._specs: dict[LoadedModel, tuple[dict[str, TensorSpec], dict[str, str]]] = {}
        self.watch = DisconnectWatch()
        self.in_flight = 0

    def model(self, name: str, version: str | None) -> LoadedModel:
        """The loaded model for a URL's name and version, or a 404 naming what is loaded."""
        v = None
        if version is not None:
            if not version.isdigit():
                raise HttpError(404, f"model {name!r} has no version {version!r}; versions are positive integers")
            v = int(version)
        return self.runtime.model(name, v)

    def scheduler(self, model: LoadedModel) -> ModelScheduler:
        s = self._schedulers.get(model)
        if s is None:
            live = set(self.runtime.models())
            for old in [m for m in self._schedulers if m not in live]:
                del self._schedulers[old]
                self._specs.pop(old, None)
            s = self._schedulers[model] = ModelScheduler(model, self.policy(model), self.executor,
                                                         self.metrics.batch)
        return s

    def _queues(self) -> list[tuple[str, int, int]]:
        """(model, version, requests waiting) per scheduler, for /metrics."""
        live = set(self.runtime.models())
        return [(m.name, m.version, s.queued) for m, s in list(self._schedulers.items()) if m in live]

    def policy(self, model: LoadedModel) -> Policy:
        return policy_for(model, self._model_configs.get(model))

    def specs(self, model: LoadedModel) -> tuple[dict[str, TensorSpec], dict[str, str]]:
        """Input specs by name and output datatypes by name."""
        s = self._specs.get(model)
        if s is None:
            s = self._specs[model] = ({t.name: t for t in model.inputs}, {t.name: t.datatype for t in model.outputs})
        return s

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config's per-model settings (SIGHUP); models scheduled from now on use them."""
        self.config = config
        self._model_configs = _ModelConfigs(self.runtime, config.models)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)


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
