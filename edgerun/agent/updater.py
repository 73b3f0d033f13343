"""The update state machine of one device: manifest → verify → choose → fetch → verify → stage → warm → swap.

Every transition is saved to the journal (fsync) before it is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, TypeVar

from edgerun import crypto
from edgerun import manifest as manifest_mod
from edgerun.agent.transfer import Chunks, ChunkTransfer, TransferError, download_verify, http_fetch
from edgerun.choice import no_fit_error
from edgerun.contract import IN_PROGRESS, Topics
from edgerun.errors import DecryptError, DeviceKeyError, EdgerunError, IntegrityError, ManifestError, VariantRejected
from edgerun.package import FileEntry, ModelPackage, save_package, verify_file
from edgerun.store import JournalEntry, Pointer, Store

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgerun.manifest import Manifest
    from edgerun.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_VARIANTS_TRIED = 3  # a device tries this many variants of one release before it gives up on it
RESTORE_BUDGET = 1 << 62  # reloading the installed variant at start-up is not a new choice (see docs/updates.md)


class Cancelled(Exception):
    """A newer release for the same model arrived ("superseded"), or the agent is stopping ("stopping")."""


def check(cancelled: Callable[[], str]) -> None:
    reason = cancelled()
    if reason:
        raise Cancelled(reason)


class UpdateHost(Protocol):
    """What the updater needs from the agent that runs it."""

    def report(self, entry: JournalEntry) -> None:
        """Publish one transition that is already journaled."""

    def progress(self, entry: JournalEntry, fraction: float) -> None:
        """Note download progress (0-1) for the next status."""

    def in_loader(self, fn: Callable[[], T]) -> T:
        """Run a model load and warm-up at normal priority and wait for it."""


@dataclass(frozen=True)
class UpdatePolicy:
    """The settings an update is checked and applied with (from ``[mqtt]``)."""

    trusted: Mapping[str, "Ed25519PublicKey"] = field(default_factory=dict)
    clock_skew: float = 300
    unload_first: bool = False
    ca_file: Path | None = None  # trusted for HTTPS downloads too
    stall_timeout: float = 600  # seconds without a new chunk, while connected, before a download fails


class Updater:
    """Applies releases to the runtime and the store, reporting through its host."""

    def __init__(self, runtime: "Runtime", store: Store, chunks: Chunks, topics: Topics, policy: UpdatePolicy,
                 host: UpdateHost):
        self.runtime = runtime
        self.store = store
        self.chunks = chunks
        self.topics = topics
        self.policy = policy
        self.host = host
        self._verify: ssl.SSLContext | bool | None = None  # for HTTPS downloads, made on first use

    # --- reporting --------------------------------------------------------------------------

    def transition(self, entry: JournalEntry, state: str, detail: str = "", **changes) -> JournalEntry:
        """Save, then publish, one state transition."""
        entry = replace(entry, state=state, detail=detail, ts=time.time(), **changes)
        if state not in IN_PROGRESS:
            entry.manifest = None
            if entry.digest:
                self.store.mark_done(entry.digest)
        self.store.save_journal(entry)
        self.host.report(entry)
        return entry

    def active_version(self, model: str) -> int | None:
        """The version served now, else the one the store's pointer names."""
        loaded = self._loaded(model)
        if loaded is not None:
            return loaded.version
        ptr = self.store.pointer(model)
        return ptr.version if ptr else None

    def parse(self, payload: bytes, model: str) -> "Manifest":
        return manifest_mod.parse(payload, self.policy.trusted, topic_model=model, clock_skew=self.policy.clock_skew)

    # --- entry point ------------------------------------------------------------------------

    def process(self, model: str, payload: bytes, cancelled: Callable[[], str]) -> None:
        """Handle one (effective) release payload for ``model``."""
        if not payload:
            self.retire(model)
            return
        digest = hashlib.sha256(payload).hexdigest()
        try:
            m = self.parse(payload, model)
        except ManifestError as exc:
            if self.store.is_done(digest):
                return
            self.transition(JournalEntry(model, _guess_version(payload), "queued", digest=digest), "rejected",
                            str(exc))
            return
        active = self.active_version(model)
        if active is not None and m.version < active and self.store.has_version(model, m.version) \
                and self._same_release(m):
            self.rollback_to(m)  # the hub names the kept version again (or a canary release was withdrawn)
            return
        if self.store.is_done(m.digest):
            return
        if active is not None and m.version <= active:
            saved = self.store.saved_manifest(model, m.version)
            if m.version == active and saved is not None and manifest_mod.digest(saved) == m.digest:
                self.store.mark_done(m.digest)  # the release already active, delivered again
            else:
                self.transition(JournalEntry(model, m.version, "queued", digest=m.digest), "rejected",
                                f"downgrade: v{m.version} is not newer than the active v{active}")
            return
        self.update(m, cancelled)

    def _same_release(self, m: "Manifest") -> bool:
        saved = self.store.saved_manifest(m.model, m.version)
        if not saved:
            return False
        have = {f["sha256"] for v in saved.get("variants", []) for f in v.get("files", [])}
        return any(f.sha256 in have for v in m.variants for f in v.files)

    # --- the update -------------------------------------------------------------------------

    def update(self, m: "Manifest", cancelled: Callable[[], str], resume_from: str | None = None) -> None:
        j = JournalEntry(m.model, m.version, "queued", digest=m.digest, manifest=m.raw)
        j = self.transition(j, "queued", f"release v{m.version} signed by {m.key_id!r}"
                            + (f" (resuming after restart in state {resume_from})" if resume_from else ""))
        set_aside: list[str] = []  # variants that failed this device's validation sample, in this update
        for _ in range(MAX_VARIANTS_TRIED):
            try:
                choice = self.runtime.explain(m.package)
            except EdgerunError as exc:
                self.transition(j, "rejected", f"incompatible: {exc}")
                return
            cand = choice.chosen
            old = self._loaded(m.model)
            unload_first: int | None = None  # the budget once the old version is unloaded, when that is needed
            if cand is None and self.policy.unload_first and old is not None:
                retry = self.runtime.explain(m.package, memory_budget=choice.budget + old.memory_bytes)
                if retry.chosen is not None:
                    cand, unload_first = retry.chosen, retry.budget
            if cand is None:
                err = no_fit_error(m.package, choice.candidates, choice.budget)
                hint = "" if old is None else " while the active version stays loaded (set mqtt.unload_first to " \
                                              "unload it first, with a short unavailability)"
                if set_aside:  # nothing else can run here
                    self.transition(j, "failed", f"no variant left that passes this device's validation: {err}")
                elif "memory budget" in str(err):
                    self.transition(j, "rejected", f"too large: {err}{hint}")
                else:
                    self.transition(j, "rejected", f"incompatible: {err}")
                return
            variant = cand.variant
            aside = f" ({'; '.join(set_aside)})" if set_aside else ""
            j = self.transition(j, "downloading", f"variant {variant.id} on {cand.backend}, {variant.size} bytes"
                                + aside, variant=variant.id, backend=cand.backend, progress=0.0)
            staged = self._download_and_stage(j, m, variant, cancelled)
            if staged is None:
                return
            vdir, j = staged
            j = self.transition(j, "staged", f"stored in {vdir}")
            try:
                self.warm_and_swap(j, m.model, m.version, vdir, variant.id, cand.backend, unload_first, aside)
                return
            except VariantRejected as exc:  # the runtime set it aside: choose again, without it
                set_aside.append(f"{variant.id} on {cand.backend} set aside: {exc}")
        self.transition(j, "failed", f"no variant of v{m.version} passed this device's validation: "
                        + "; ".join(set_aside))

    def _download_and_stage(self, j: JournalEntry, m: "Manifest", variant,
                            cancelled: Callable[[], str]) -> tuple[Path, JournalEntry] | None:
        """Fetch, verify and stage ``variant``; None when the update ended (its transition is reported)."""
        try:
            paths = self.fetch(j, variant, cancelled)
        except Cancelled as exc:
            if str(exc) == "superseded":  # journaled as over, or a restart would resume a release no longer wanted
                self.transition(j, "failed", "superseded by another release before it was installed")
            else:
                log.info("update of %s to v%d stopped during download; it resumes at the next start", m.model,
                         m.version)
            return None
        except (TransferError, IntegrityError, OSError) as exc:
            for f in variant.files:
                self.store.drop_partial(f.sha256)
            self.transition(j, "failed", f"download: {exc}")
            return None
        checks = "size and sha256" + (", and every encrypted segment," if variant.encrypted else "")
        j = self.transition(j, "verifying", f"checking {checks} of {len(paths)} file(s)", progress=1.0)
        try:
            for f, p in zip(variant.files, paths):
                self._check_file(p, f)
        except (IntegrityError, DeviceKeyError) as exc:
            for f in variant.files:
                self.store.drop_partial(f.sha256)
            self.transition(j, "failed", f"verification: {exc}")
            return None
        return self._stage(m, variant, paths), j

    def _check_file(self, path: Path, entry: FileEntry) -> None:
        """Size and sha256 as signed; an encrypted file must also open with this device's key and authenticate to
        its last segment, and a clear one must not be age (docs/protection.md)."""
        if entry.encryption is None:
            verify_file(path, entry)
            if crypto.is_age(path):
                raise IntegrityError(f"{entry.path}: the file is age-encrypted but the manifest says it is clear")
            return
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{path}: size {size} bytes, expected {entry.size}")
        digest, error = crypto.check_file(path, self.runtime.device_key.identities())
        if digest != entry.sha256:
            raise IntegrityError(f"{path}: sha256 {digest}, expected {entry.sha256}")
        if error is not None:
            raise DecryptError(f"{entry.path} (encrypted, per the manifest): {error}")

    def warm_and_swap(self, j: JournalEntry, model: str, version: int, vdir: Path, variant: str,
                      backend: str | None, unload_first: int | None = None, note: str = "") -> bool:
        """Load and warm up in the loader thread, then swap; ``unload_first`` is the budget to load with
        after unloading the old version (mqtt.unload_first), else both are loaded side by side."""
        j = self.transition(j, "warming", f"loading {variant} on {backend or 'the chosen backend'} and running "
                                          f"the warm-up samples")
        old = self._loaded(model)
        if unload_first is not None and old is not None:
            log.warning("unloading %s v%d before loading v%d: both do not fit (mqtt.unload_first)", model,
                        old.version, version)
            self.runtime.unload(model)
        try:
            loaded = self.host.in_loader(lambda: self.runtime.prepare(vdir, variant=variant, backend=backend,
                                                                      verify=False, memory_budget=unload_first))
        except VariantRejected:  # this device's kernels disagree with fp32: the caller takes the next variant
            self.store.remove_version(model, version)
            if unload_first is not None and old is not None:
                self._reload_pointer(model)
            raise
        except Exception as exc:  # any load/warm-up failure leaves the old version serving
            self.store.remove_version(model, version)
            if unload_first is not None and old is not None:
                self._reload_pointer(model)
            reason = str(exc) if isinstance(exc, EdgerunError) else f"{type(exc).__name__}: {exc}"
            self.transition(j, "failed", f"v{version} did not load or warm up; v{old.version if old else '-'} "
                                         f"keeps serving: {reason}")
            return False
        prev = self.store.pointer(model)
        previous = prev.version if prev and prev.version != version else (prev.previous if prev else None)
        # the pointer first: a crash right after it serves the new, warmed version at restart (see restore)
        self.store.set_pointer(model, Pointer(version, variant, loaded.backend, previous))
        self.runtime.activate(loaded)
        self._tune(loaded)
        self.store.prune(model)
        self._prune_partials()
        self.transition(j, "active", f"serving v{version} ({variant} on {loaded.backend})"
                        + (f"; v{previous} kept for rollback" if previous else "") + note, progress=None)
        return True

    def rollback_to(self, m: "Manifest") -> None:
        """The hub names a version this device keeps: serve it again (an explicit roll-back)."""
        j = JournalEntry(m.model, m.version, "queued", digest=m.digest)
        vdir = self.store.version_dir(m.model, m.version)
        pkg = ModelPackage.load(vdir)
        variant = pkg.variants[0].id
        j = self.transition(j, "staged", f"the hub rolls back to v{m.version}, kept in {vdir}", variant=variant)
        self.warm_and_swap(j, m.model, m.version, vdir, variant, None)

    def fetch(self, j: JournalEntry, variant, cancelled: Callable[[], str]) -> list[Path]:
        total = max(1, variant.size)
        done_before = 0
        paths = []
        for f in variant.files:
            src = f.source or {"mqtt": True}
            url = src.get("url")
            path = None
            if url:
                dest = self.store.http_partial_path(f.sha256)
                try:
                    if self._verify is None:
                        self._verify = download_verify(self.policy.ca_file)
                    http_fetch(url, dest, f.size, cancelled=cancelled, verify=self._verify,
                               progress=lambda n, b=done_before: self.host.progress(j, (b + n) / total))
                    path = dest
                except TransferError as exc:
                    if not src.get("mqtt"):
                        raise
                    log.warning("HTTP download failed (%s); falling back to MQTT chunks", exc)
            check(cancelled)
            if path is None:
                path = self._fetch_chunks(j, f, cancelled, done_before, total)
            paths.append(path)
            done_before += f.size
        return paths

    def _fetch_chunks(self, j: JournalEntry, f, cancelled, done_before: int, total: int) -> Path:
        t = ChunkTransfer(self.store.partial_path(f.sha256), f, self.topics)
        if t.resumed_chunks:
            log.info("resuming %s: %d of %d chunks already on disk", f.path, t.resumed_chunks, t.count)
        try:
            if not t.done.is_set():
                self.chunks.add(t)
                last_progress = -1
                while not t.done.wait(0.25):
                    check(cancelled)
                    n = t.received
                    if n != last_progress:
                        last_progress = n
                        self.host.progress(j, (done_before + t.bytes_on_disk) / total)
                    if not self.chunks.connected:
                        t.last_chunk_at = time.monotonic()
                    elif time.monotonic() - t.last_chunk_at > self.policy.stall_timeout:
                        raise TransferError(f"no chunk of {f.path} for {self.policy.stall_timeout:.0f}s "
                                            f"({t.received} of {t.count} received): are the blobs still retained?")
            if t.error:
                raise TransferError(t.error)
        finally:
            self.chunks.remove(t)
            t.close()
        self.host.progress(j, (done_before + f.size) / total)
        return t.path

    def _stage(self, m: "Manifest", variant, paths: list[Path]) -> Path:
        tmp = self.store.stage_dir(m.model)
        for f, p in zip(variant.files, paths):
            dest = tmp / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
            self.store.drop_partial(f.sha256)
        pkg = replace(m.package, variants=[variant], root=None)
        save_package(pkg, tmp)
        (tmp / "manifest.json").write_text(json.dumps(m.raw, indent=1, ensure_ascii=False))
        return self.store.commit_stage(tmp, m.model, m.version)

    def _prune_partials(self) -> None:
        keep = {t.entry.sha256 for t in self.chunks.active()}
        self.store.prune_partials(keep)

    # --- retire, restore --------------------------------------------------------------------

    def retire(self, model: str) -> None:
        """An empty release: stop serving the model and forget it (its files are deleted)."""
        loaded = self._loaded(model)
        version = loaded.version if loaded else 0
        if loaded is None and self.store.pointer(model) is None:
            return
        if loaded is not None:
            self.runtime.unload(model)
        self.store.remove_model(model)
        self.transition(JournalEntry(model, version, "queued"), "retired", "the hub retired the model")

    def restore(self) -> list[tuple[str, JournalEntry]]:
        """Serve every model's active version; roll back interrupted swaps; return updates to resume."""
        resume = []
        models = set(self.store.models()) | {j.model for j in self.store.journals()}
        for model in sorted(models):
            j = self.store.journal(model)
            ptr = self.store.pointer(model)
            if j is not None and j.state in ("staged", "warming"):
                if ptr is not None and ptr.version == j.version:
                    j = self.transition(j, "active", f"v{j.version} was activated just before a restart")
                else:
                    if ptr is None or j.version not in (ptr.version, ptr.previous):
                        self.store.remove_version(model, j.version)
                    kept = f"v{ptr.version} keeps serving" if ptr else "no version to serve"
                    j = self.transition(j, "rolled_back", f"the device restarted while v{j.version} was {j.state}; "
                                                          f"{kept}")
            serving = self._loaded(model)
            if ptr is not None and serving is not None and serving.version > ptr.version:
                log.info("%s: the configured package v%d is newer than the store's v%d; serving the package",
                         model, serving.version, ptr.version)
            elif ptr is not None:
                self._reload_pointer(model, ptr)
            if j is not None and j.state in ("queued", "downloading", "verifying") and j.manifest:
                resume.append((model, j))
        return resume

    def _reload_pointer(self, model: str, ptr: Pointer | None = None) -> None:
        """Load the active version; if it fails, fall back to the previous good one and say so."""
        ptr = ptr or self.store.pointer(model)
        if ptr is None:
            return
        try:  # the variant was chosen to fit when it was installed: restoring it does not choose again
            loaded = self.runtime.prepare(self.store.version_dir(model, ptr.version), variant=ptr.variant or None,
                                          backend=ptr.backend or None, memory_budget=RESTORE_BUDGET)
            self.runtime.activate(loaded)
            log.info("restored %s v%d (%s on %s)", model, ptr.version, ptr.variant, ptr.backend)
            self._tune(loaded)
            return
        except Exception as exc:
            reason = str(exc)
        log.error("active %s v%d does not load: %s", model, ptr.version, reason)
        if ptr.previous is not None and self.store.has_version(model, ptr.previous):
            bad = ptr.version
            prev_pkg = ModelPackage.load(self.store.version_dir(model, ptr.previous))
            self.store.set_pointer(model, Pointer(ptr.previous, prev_pkg.variants[0].id, "", None))
            self.transition(JournalEntry(model, bad, "queued"), "rolled_back",
                            f"v{bad} failed to load at startup ({reason}); rolled back to v{ptr.previous}")
            self._reload_pointer(model)
        else:
            self.transition(JournalEntry(model, ptr.version, "queued"), "failed",
                            f"v{ptr.version} failed to load at startup and no previous version is kept: {reason}")

    def _tune(self, loaded) -> None:
        """Hand a version that now serves to the tuner, which measures it beside serving (docs/tuning.md)."""
        tuner = getattr(self.host, "tuner", None)
        if tuner is not None:
            tuner.activated(loaded, update=True)

    def _loaded(self, model: str):
        try:
            return self.runtime.model(model)
        except EdgerunError:
            return None


def _guess_version(payload: bytes) -> int:
    try:
        v = json.loads(payload).get("version")
        return v if isinstance(v, int) and not isinstance(v, bool) else 0
    except Exception:
        return 0

