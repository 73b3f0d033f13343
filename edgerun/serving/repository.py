"""The model repository extension: list, load and unload the packages of ``server.repository_dir``.

Loading and unloading are admin actions: refused unless the server has API tokens (every request then carries
one, and only a token with the ``admin`` scope gets this far) and a repository directory. A model is a package
directory ``{repository_dir}/{name}`` or a bare model file ``{repository_dir}/{name}.onnx`` (``.tflite``,
``.xml``); models served from the configuration or by the update agent are theirs to manage, and the repository
neither replaces nor unloads them.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerun import bare
from edgerun.contract import valid_name
from edgerun.errors import Forbidden, ModelNotFound, PackageError

if TYPE_CHECKING:
    from edgerun.runtime import LoadedModel, Runtime

log = logging.getLogger(__name__)


class ModelRepository:
    def __init__(self, runtime: Runtime, root: Path | None, *, admin: bool):
        self.runtime = runtime
        self.root = root.resolve() if root is not None else None
        self.admin = admin
        self._locks: dict[str, asyncio.Lock] = {}

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every served version (READY), then the repository's packages that are not loaded (UNAVAILABLE)."""
        loaded = self.runtime.models()
        rows = [{"name": m.name, "version": str(m.version), "state": "READY", "reason": "",
                 "variant": m.variant.id, "backend": m.backend} for m in loaded]
        if not ready_only:
            names = {m.name for m in loaded}
            rows += [{"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
                     for name in self.available() if name not in names]
        return rows

    def available(self) -> list[str]:
        """Model names the repository directory holds."""
        if self.root is None or not self.root.is_dir():
            return []
        suffixes = self._suffixes()
        names = set()
        for p in self.root.iterdir():
            if p.is_dir() and (p / "edgerun.toml").is_file() and valid_name(p.name):
                names.add(p.name)
            elif p.is_file() and p.suffix in suffixes and valid_name(p.stem):
                names.add(p.stem)
        return sorted(names)

    async def load(self, name: str) -> LoadedModel:
        """Load (or reload) a model from the repository and serve it; the old version finishes its requests."""
        self._allowed("load")
        path = self._find(name)
        async with self._lock(name):
            self._check_owned(name, "replace")
            model = await asyncio.to_thread(self.runtime.prepare, path)
            if model.name != name:
                model.retire()
                raise PackageError(f"{path} holds model {model.name!r}, not {name!r}")
            self.runtime.activate(model)
        log.info("repository: loaded %s v%d (%s on %s)", model.name, model.version, model.variant.id, model.backend)
        return model

    async def unload(self, name: str) -> None:
        """Stop serving a repository model; its memory is freed once its requests in flight are done."""
        self._allowed("unload")
        async with self._lock(name):
            if not any(m.name == name for m in self.runtime.models()):
                raise ModelNotFound(f"model {name!r} is not loaded")
            self._check_owned(name, "unload")
            self.runtime.unload(name)
        log.info("repository: unloaded %s", name)

    def _allowed(self, action: str) -> None:
        if not self.admin:
            raise Forbidden(f"{action} is an admin action and this server has no API token: configure one "
                            "(server.token_file, EDGERUN_API_TOKEN, or an admin token in server.tokens_file) to "
                            "allow model repository control")
        if self.root is None:
            raise Forbidden(f"cannot {action} models: no model repository is configured (server.repository_dir)")

    def _find(self, name: str) -> Path:
        assert self.root is not None
        if not valid_name(name):
            raise ModelNotFound(f"no model {name!r} in the repository: a model name is letters, digits, '.', '_' "
                                "or '-'")
        candidates = [self.root / name] + [self.root / f"{name}{s}" for s in self._suffixes()]
        for p in candidates:
            try:
                if (p.is_dir() and (p / "edgerun.toml").is_file()) or p.is_file():
                    return p
            except OSError:  # a name longer than the file system allows
                continue
        raise ModelNotFound(f"no model {name!r} in the repository {self.root}; it holds {self.available()}")

    def _check_owned(self, name: str, action: str) -> None:
        assert self.root is not None
        for m in self.runtime.models():
            root = m.package.root
            if m.name == name and (root is None or not Path(root).resolve().is_relative_to(self.root)):
                raise Forbidden(f"model {name!r} is served from {root or 'memory'}, not from the model repository; "
                                f"the repository cannot {action} it")

    def _suffixes(self) -> set[str]:
        return set(bare.suffixes(self.runtime.backends))

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock
