"""The device's model store and update journal on disk: atomic writes, active pointers, partial downloads.

Layout under ``state_dir`` (docs/updates.md)::

    models/{model}/{version}/edgerun.toml   the staged package (the chosen variant only) + its files
    models/{model}/{version}/manifest.json  the signed release it came from
    models/{model}/active                   pointer: {"version", "variant", "backend", "previous"}
    partial/{sha256}.part                   a file being fetched; .chunks beside it lists what is on disk
    partial/{sha256}.http                   a file being downloaded over HTTP(S)
    journal/{model}.json                    the last update transition of the model (saved before publishing)
    journal/done.digests                    releases already handled, by manifest digest
    session                                 the MQTT session counter
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgerun.contract import FINAL, IN_PROGRESS
from edgerun.units import decimal

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when missing or unreadable (a torn write cannot happen, but be safe)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


@dataclass
class Pointer:
    """Which version of a model is active, on which variant and backend, and the previous good one."""

    version: int
    variant: str
    backend: str
    previous: int | None = None


@dataclass
class JournalEntry:
    """The last saved update transition of one model."""

    model: str
    version: int
    state: str
    detail: str = ""
    digest: str = ""  # the manifest's digest: the same release is not retried after failed/rejected/rolled_back
    manifest: dict[str, Any] | None = None  # kept while the update is in progress, to resume it
    variant: str | None = None
    backend: str | None = None
    progress: float | None = None
    ts: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


__all__ = ["FINAL", "IN_PROGRESS", "JournalEntry", "Pointer", "Store", "atomic_write", "atomic_write_json",
           "read_json"]
DONE_DIGESTS_KEPT = 200


class Store:
    """Models, pointers, partial files and the journal under one state directory."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.partial_dir = self.root / "partial"
        self.journal_dir = self.root / "journal"
        for d in (self.models_dir, self.partial_dir, self.journal_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_temp_files()
        done = read_json(self.journal_dir / "done.digests")
        self._done: dict[str, float] = done if isinstance(done, dict) else {}

    def _clean_temp_files(self) -> None:
        """Temp files of writes interrupted by a crash (never renamed, so never visible)."""
        temp = [*self.root.glob(".session.*"), *self.journal_dir.glob(".*.*"), *self.models_dir.glob("*/.active.*"),
                *self.partial_dir.glob(".*.*")]
        for p in temp:
            if p.is_file():
                p.unlink(missing_ok=True)
        for p in self.models_dir.glob("*/.staging-*"):
            shutil.rmtree(p, ignore_errors=True)

    # --- versions and pointers --------------------------------------------------------------

    def version_dir(self, model: str, version: int) -> Path:
        return self.models_dir / model / str(version)

    def has_version(self, model: str, version: int) -> bool:
        return (self.version_dir(model, version) / "edgerun.toml").is_file()

    def models(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def pointer(self, model: str) -> Pointer | None:
        data = read_json(self.models_dir / model / "active")
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            return None
        return Pointer(data["version"], str(data.get("variant") or ""), str(data.get("backend") or ""),
                       data.get("previous"))

    def set_pointer(self, model: str, pointer: Pointer) -> None:
        atomic_write_json(self.models_dir / model / "active", asdict(pointer))

    def clear_pointer(self, model: str) -> None:
        (self.models_dir / model / "active").unlink(missing_ok=True)
        fsync_dir(self.models_dir / model)

    def stage_dir(self, model: str) -> Path:
        """A fresh temp directory to assemble a version in; ``commit_stage`` renames it into place."""
        (self.models_dir / model).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.models_dir / model, prefix=".staging-"))

    def commit_stage(self, tmp: Path, model: str, version: int) -> Path:
        """fsync every file of ``tmp``, then rename it to ``models/{model}/{version}``."""
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        dest = self.version_dir(model, version)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return dest

    def remove_model(self, model: str) -> None:
        """Forget a model: every version, its pointer and its staging leftovers."""
        shutil.rmtree(self.models_dir / model, ignore_errors=True)
        fsync_dir(self.models_dir)

    def remove_version(self, model: str, version: int) -> None:
        shutil.rmtree(self.version_dir(model, version), ignore_errors=True)
        fsync_dir(self.models_dir / model)

    def prune(self, model: str) -> list[int]:
        """Delete every version but the active one and the previous good one; returns what was deleted."""
        ptr = self.pointer(model)
        keep = {ptr.version, ptr.previous} if ptr else set()
        gone = []
        for p in (self.models_dir / model).iterdir():
            version = decimal(p.name)
            if p.is_dir() and version is not None and version not in keep:
                shutil.rmtree(p, ignore_errors=True)
                gone.append(version)
        if gone:
            fsync_dir(self.models_dir / model)
        return sorted(gone)

    def saved_manifest(self, model: str, version: int) -> dict[str, Any] | None:
        return read_json(self.version_dir(model, version) / "manifest.json")

    # --- partial downloads ------------------------------------------------------------------

    def partial_path(self, sha256: str) -> Path:
        return self.partial_dir / f"{sha256}.part"

    def http_partial_path(self, sha256: str) -> Path:
        return self.partial_dir / f"{sha256}.http"

    def drop_partial(self, sha256: str) -> None:
        for p in self.partial_dir.glob(f"{sha256}.*"):
            p.unlink(missing_ok=True)

    def prune_partials(self, keep: set[str]) -> None:
        for p in self.partial_dir.iterdir():
            if p.name.split(".", 1)[0] not in keep:
                p.unlink(missing_ok=True)

    # --- journal ----------------------------------------------------------------------------

    def save_journal(self, entry: JournalEntry) -> None:
        atomic_write_json(self.journal_dir / f"{entry.model}.json", asdict(entry))

    def journal(self, model: str) -> JournalEntry | None:
        data = read_json(self.journal_dir / f"{model}.json")
        if not isinstance(data, dict):
            return None
        try:
            return JournalEntry(**data)
        except TypeError:
            log.warning("ignoring unreadable journal entry for %s", model)
            return None

    def journals(self) -> list[JournalEntry]:
        out = []
        for p in sorted(self.journal_dir.glob("*.json")):
            e = self.journal(p.stem)
            if e is not None:
                out.append(e)
        return out

    def is_done(self, digest: str) -> bool:
        """True when the release with this manifest digest already reached a final state here."""
        return digest in self._done

    def mark_done(self, digest: str) -> None:
        self._done[digest] = time.time()
        if len(self._done) > DONE_DIGESTS_KEPT:
            for k in sorted(self._done, key=self._done.get)[:len(self._done) - DONE_DIGESTS_KEPT]:
                del self._done[k]
        atomic_write_json(self.journal_dir / "done.digests", self._done)

    # --- MQTT session counter ---------------------------------------------------------------

    def next_session(self) -> int:
        """A number that grows with every connection, across restarts."""
        path = self.root / "session"
        try:
            n = int(path.read_text().strip())
        except (OSError, ValueError):
            n = 0
        n += 1
        atomic_write(path, str(n).encode())
        return n
