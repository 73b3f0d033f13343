"""The tuning cache: what a tuning measured, kept under the state directory and keyed on everything that decides it.

The key holds the package's file sha256s, the backends' versions, the CPU model and features, the thread count and
the profile (with its backend options). A file whose key differs, whose format is another, or that cannot be read
is ignored, and the model is tuned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from edgerun.contract import TuningInfo
from edgerun.package import ModelPackage

log = logging.getLogger(__name__)

FORMAT = 1  # the cache file's format; a file of another format is ignored
DIR_NAME = "tuning"  # under state_dir


def cache_key(runtime: Any, pkg: ModelPackage) -> dict[str, Any]:
    """Everything that decides what tuning finds."""
    import edgerun

    facts = runtime.facts
    profile = runtime.profile
    backends = {b.name: a.version for b, a in runtime.backend_status() if a.available}
    return {
        "edgerun": getattr(edgerun, "__version__", ""),
        "model": pkg.name, "version": pkg.version,
        "files": sorted(f"{v.id}:{f.path}:{f.sha256}" for v in pkg.variants for f in v.files),
        "backends": backends,
        "cpu_model": facts.cpu_model, "arch": facts.arch, "cpu_count": facts.cpu_count,
        "cpu_flags": hashlib.sha256(" ".join(sorted(facts.cpu_flags)).encode()).hexdigest()[:16],
        "threads": runtime.load_options(next(iter(backends), "")).threads if backends else None,
        "profile": profile.name,
        "profile_options": json.dumps(profile.backend_options, sort_keys=True, default=str),
    }


class TuningCache:
    """One JSON file per model version under ``{state_dir}/tuning``."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / DIR_NAME

    def path(self, model: str, version: int) -> Path:
        return self.dir / f"{model}.v{version}.json"

    def get(self, runtime: Any, pkg: ModelPackage) -> TuningInfo | None:
        """The cached result for ``pkg`` on this device, or None (absent, corrupt, another format or key)."""
        path = self.path(pkg.name, pkg.version)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                log.warning("tuning cache %s is of another format (%r, this edgerun writes %d): ignored, tuning "
                            "again", path, data.get("format") if isinstance(data, dict) else None, FORMAT)
                return None
            info = TuningInfo.from_dict(data.get("info"))
        except (OSError, ValueError) as exc:
            log.warning("tuning cache %s cannot be read (%s): ignored, tuning again", path, exc)
            return None
        if info is None or info.chosen is None:
            log.warning("tuning cache %s holds no tuning result: ignored, tuning again", path)
            return None
        key = cache_key(runtime, pkg)
        if data.get("key") != key:
            changed = sorted(k for k in key if (data.get("key") or {}).get(k) != key[k])
            log.info("tuning cache %s is for another %s: tuning again", path, ", ".join(changed) or "key")
            return None
        return info

    def put(self, runtime: Any, pkg: ModelPackage, info: TuningInfo) -> Path:
        """Write atomically (a temporary file renamed over the old one)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(pkg.name, pkg.version)
        data = {"format": FORMAT, "key": cache_key(runtime, pkg), "info": info.to_dict()}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def tuned_before(self, model: str) -> bool:
        """Whether any version of ``model`` was tuned on this device."""
        return self.dir.is_dir() and any(self.dir.glob(f"{model}.v*.json"))
