"""Fetching one file of a release: retained MQTT chunks written at their offsets, or HTTP(S) with Range resume.

Both write under ``{state_dir}/partial/`` and survive restarts: an MQTT transfer keeps a sidecar
``{sha256}.chunks`` (one byte per chunk, 1 = on disk and fsynced) beside ``{sha256}.part``; an HTTP
transfer appends to ``{sha256}.http`` and resumes from its length.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgerun.contract import Topics
from edgerun.errors import IntegrityError
from edgerun.package import FileEntry
from edgerun.store import atomic_write
from edgerun.units import decimal

if TYPE_CHECKING:
    from edgerun.mqtt import Connection

log = logging.getLogger(__name__)

PERSIST_EVERY_CHUNKS = 16
PERSIST_EVERY_SECONDS = 1.0


class TransferError(Exception):
    """A transfer cannot complete (bad chunk, server error): the update fails with this message."""


def chunk_count(size: int, chunk_size: int) -> int:
    return math.ceil(size / chunk_size) if size else 0


class ChunkTransfer:
    """One file arriving as retained ``blobs/{sha256}/{index}`` messages, in any order, possibly twice."""

    def __init__(self, partial: Path, entry: FileEntry, topics: Topics):
        if not entry.chunk_size:
            raise TransferError(f"file {entry.path!r} has no chunk_size")
        self.entry = entry
        self.path = partial
        self.sidecar = partial.with_suffix(".chunks")
        self.chunk_size = entry.chunk_size
        self.count = chunk_count(entry.size, entry.chunk_size)
        self.topics = topics
        self.done = threading.Event()
        self.error: str | None = None
        self.last_chunk_at = time.monotonic()
        self._lock = threading.Lock()
        self._have = self._load_sidecar()
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != entry.size:
            os.ftruncate(self._fd, entry.size)
        self.resumed_chunks = sum(self._have)
        if self.resumed_chunks == self.count:
            self.done.set()

    def _load_sidecar(self) -> bytearray:
        try:
            data = bytearray(self.sidecar.read_bytes())
        except OSError:
            data = bytearray()
        if len(data) != self.count or not self.path.exists():
            return bytearray(self.count)
        return data

    @property
    def received(self) -> int:
        return sum(self._have)

    @property
    def bytes_on_disk(self) -> int:
        n = self.received
        if n and self.count and self._have[-1]:
            return (n - 1) * self.chunk_size + (self.entry.size - (self.count - 1) * self.chunk_size)
        return n * self.chunk_size

    def missing_topics(self) -> list[str]:
        with self._lock:
            return [self.topics.blob(self.entry.sha256, i) for i in range(self.count) if not self._have[i]]

    def all_topics(self) -> list[str]:
        return [self.topics.blob(self.entry.sha256, i) for i in range(self.count)]

    def on_chunk(self, index: int, payload: bytes) -> None:
        """Write chunk ``index`` at its offset (called from the MQTT thread)."""
        if self.done.is_set():
            return
        if not 0 <= index < self.count:
            return  # not part of this file as the manifest describes it
        expected = self.chunk_size if index < self.count - 1 else self.entry.size - index * self.chunk_size
        if len(payload) != expected:
            self.error = (f"chunk {index} of {self.entry.path} ({self.entry.sha256[:12]}) has {len(payload)} bytes, "
                          f"expected {expected}: the blob does not match the manifest's size {self.entry.size}")
            self.done.set()
            return
        with self._lock:
            if self._have[index]:
                return
            os.pwrite(self._fd, payload, index * self.chunk_size)
            self._have[index] = 1
            self._unsynced += 1
            self.last_chunk_at = time.monotonic()
            complete = sum(self._have) == self.count
            if complete or self._unsynced >= PERSIST_EVERY_CHUNKS or \
                    time.monotonic() - self._synced_at > PERSIST_EVERY_SECONDS:
                self._persist()
        if complete:
            self.done.set()

    def _persist(self) -> None:
        """Data first, then the sidecar that says it is there."""
        os.fsync(self._fd)
        atomic_write(self.sidecar, bytes(self._have))
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self._unsynced:
                    self._persist()
                os.close(self._fd)
                self._fd = -1


class Chunks:
    """The chunk transfers in progress: subscribed while chunks are missing, fed from the MQTT thread."""

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self._transfers: dict[str, ChunkTransfer] = {}

    @property
    def connected(self) -> bool:
        return self.conn.connected.is_set()

    def add(self, t: ChunkTransfer) -> None:
        self._transfers[t.entry.sha256] = t
        self.conn.subscribe(t.missing_topics())

    def remove(self, t: ChunkTransfer) -> None:
        if self._transfers.pop(t.entry.sha256, None) is not None:
            self.conn.unsubscribe(t.all_topics())

    def active(self) -> list[ChunkTransfer]:
        return list(self._transfers.values())

    def resubscribe(self) -> None:
        """After a reconnect: ask again for what is still missing (the retained chunks arrive at once)."""
        for t in self.active():
            self.conn.subscribe(t.missing_topics())

    def on_chunk(self, sha256: str, index: int, payload: bytes) -> None:
        t = self._transfers.get(sha256)
        if t is not None:
            t.on_chunk(index, payload)


def download_verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    """What HTTPS downloads trust: the default bundle, plus the fleet's CA (``mqtt.ca_file``) when one is set."""
    if ca_file is None:
        return True  # httpx: certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR
    import certifi

    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TransferError(f"cannot use mqtt.ca_file {ca_file} for HTTPS downloads: {exc}") from None
    return ctx


def _certificate_problem(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def http_fetch(url: str, dest: Path, size: int, *, progress: Callable[[int], None],
               cancelled: Callable[[], object], attempts: int = 5, timeout: float = 30.0,
               verify: ssl.SSLContext | bool = True) -> None:
    """Download ``url`` to ``dest``, resuming from what is there with a Range request; retries with backoff.

    A certificate that does not verify is not retried: it will not verify the next time either.
    """
    import httpx

    from edgerun.mqtt import backoff_delay

    dest.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(attempts):
        if cancelled():
            return
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True,
                              verify=verify) as r:
                if r.status_code == 416:
                    dest.unlink(missing_ok=True)
                    last_error = "server refused the range request"
                    continue
                if r.status_code not in (200, 206):
                    last_error = f"HTTP {r.status_code} from {url}"
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        raise TransferError(last_error)
                    time.sleep(backoff_delay(attempt))
                    continue
                if r.status_code == 206 and _content_range(r)[0] != have:
                    dest.unlink(missing_ok=True)
                    last_error = f"server answered Range bytes={have}- with {r.headers.get('content-range')!r}"
                    continue
                mode = "ab" if r.status_code == 206 else "wb"
                written = have if mode == "ab" else 0
                with open(dest, mode) as f:
                    for block in r.iter_bytes():  # as it arrives: a dropped connection keeps what came
                        written += len(block)
                        if written > size:
                            raise IntegrityError(f"{url} is larger than the manifest's size {size}")
                        f.write(block)
                        progress(written)
                        if cancelled():
                            break
                    f.flush()
                    os.fsync(f.fileno())
                if written < size and not cancelled():
                    total = _total_length(r, have)
                    if total is not None and total < size:
                        raise IntegrityError(f"{url} has {total} bytes, the manifest says {size} (truncated file)")
                    last_error = f"connection ended after {written} of {size} bytes"
                    continue
                return
        except httpx.HTTPError as exc:
            bad_cert = _certificate_problem(exc)
            if bad_cert is not None:
                raise TransferError(f"cannot download {url}: its certificate does not verify "
                                    f"({bad_cert.verify_message}); set mqtt.ca_file to the CA that signed it") from None
            last_error = f"{type(exc).__name__}: {exc}"
            log.info("download of %s interrupted (%s); resuming", url, last_error)
            time.sleep(backoff_delay(attempt))
    raise TransferError(f"download of {url} failed after {attempts} attempts: {last_error}")


def _content_range(r) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes START-END/TOTAL``; None where absent or ``*``."""
    unit_range, _, total = r.headers.get("content-range", "").partition("/")
    first = unit_range.partition(" ")[2].partition("-")[0]
    return decimal(first), decimal(total)


def _total_length(r, have: int) -> int | None:
    """The file's full size as the answer states it (Content-Range, else Content-Length)."""
    total = _content_range(r)[1]
    if total is not None:
        return total
    cl = decimal(r.headers.get("content-length") or "")
    if cl is None:
        return None
    return cl + (have if r.status_code == 206 else 0)
