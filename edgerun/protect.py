"""Encrypted variants on a device: which ones it can open, and their clear bytes handed to a backend in memory only.

The clear bytes of an encrypted model never reach a file: a backend reads them from one buffer in this process, or
from a pipe fed segment by segment (docs/protection.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from edgerun.crypto import SEGMENT, Decryptor, Identity, anonymous_buffer, bytes_buffer, decrypt_to_memory
from edgerun.errors import DecryptError

if TYPE_CHECKING:
    from edgerun.backend import Backend
    from edgerun.package import FileEntry, Variant

log = logging.getLogger(__name__)

STREAM_JOIN_SECONDS = 30.0
PIPE_BYTES = 1 << 20


def not_for_here(variant: "Variant", backend: "Backend", keys: frozenset[str] | str) -> str:
    """Why this device cannot run the encrypted ``variant`` on ``backend`` ('' when it can, or the variant is clear).

    ``keys``: the fingerprints of the device's keys, or why it has none it can use.
    """
    if not variant.encrypted:
        return ""
    if variant.format not in getattr(backend, "memory_formats", frozenset()):
        return (f"encrypted, and {backend.name} cannot load {variant.format} models from memory (encrypted variants "
                f"are never decrypted to disk)")
    if isinstance(keys, str):
        return f"encrypted, and this device's key cannot be used: {keys}"
    if not variant.recipients & keys:
        others = sorted(variant.recipients)
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (f"encrypted for other keys ({shown}), not this device's ({', '.join(sorted(keys))}): enrol this "
                f"device's key on the hub (edgerun device key; edgerun hub keys add)")
    return ""


class MemoryModel:
    """An encrypted variant's files as a backend gets them: decrypted on request into memory, never onto disk.

    ``read`` decrypts a file into one buffer of its exact size and hands it over (nothing else refers to it);
    ``stream`` gives a path to a pipe the file's clear bytes flow through, for a library that parses a file as it
    reads it, so no whole clear copy is ever held here.
    """

    def __init__(self, root: Path, files: Sequence["FileEntry"], main: str, identities: Sequence[Identity]):
        self.main = main  # the file a backend loads (an OpenVINO IR's .xml), by its clear name
        self._entries = {f.clear_path: f for f in files}
        self._root = Path(root)
        self._identities = list(identities)
        self.errors: list[DecryptError] = []  # decryption failures of streams, raised by the runtime after the load

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def _path(self, name: str) -> tuple[Path, bool]:
        try:
            entry = self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a file of this model; it has {sorted(self._entries)}") from None
        return self._root / entry.path, entry.encryption is not None

    def read(self, name: str):
        """The clear content of one file in a writable buffer of its own (an anonymous map): the caller holds the
        only reference."""
        return self._read(name, anonymous_buffer)

    def read_bytes(self, name: str) -> bytes:
        """One file as ``bytes``, for a library that takes nothing else, decrypted straight into it (no copy)."""
        return self._read(name, bytes_buffer)

    def _read(self, name: str, into):
        path, encrypted = self._path(name)
        if encrypted:
            return decrypt_to_memory(path, self._identities, into=into)
        with open(path, "rb") as f:
            out, view = into(os.fstat(f.fileno()).st_size)
            try:
                if f.readinto(view) != len(view):
                    raise DecryptError(f"{name}: the file changed size while it was read")
            finally:
                view.release()
            return out

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[str]:
        """A path (``/proc/self/fd/N`` of a pipe) that yields the file's clear bytes once, in order, while open."""
        path, encrypted = self._path(name)
        src = open(path, "rb")
        try:
            # a key problem shows here, not mid-stream
            dec = Decryptor(src, self._identities, total=os.fstat(src.fileno()).st_size) if encrypted else None
        except BaseException:
            src.close()
            raise
        rfd, wfd = os.pipe()
        try:  # fewer round trips between the decrypting thread and the reader
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (AttributeError, OSError):
            pass
        feeder = threading.Thread(target=self._feed, args=(src, dec, wfd, name), name="edgerun-decrypt", daemon=True)
        feeder.start()
        try:
            yield f"/proc/self/fd/{rfd}"
        finally:
            os.close(rfd)  # a reader that stopped early: the feeder's next write fails and it ends
            feeder.join(STREAM_JOIN_SECONDS)
            if feeder.is_alive():
                log.warning("the decrypting thread of %s is still blocked after %.0fs", name, STREAM_JOIN_SECONDS)

    def _feed(self, src, dec: Decryptor | None, wfd: int, name: str) -> None:
        try:
            with os.fdopen(wfd, "wb", buffering=0) as out:
                if dec is None:
                    while chunk := src.read(SEGMENT):
                        _write_all(out, chunk)
                else:
                    for clear in dec.read_parallel(src.fileno()):
                        _write_all(out, clear)
        except DecryptError as exc:
            self.errors.append(DecryptError(f"{name}: {exc}"))
        except (BrokenPipeError, OSError):
            pass  # the reader closed the pipe before the end: its own error says why
        finally:
            src.close()


def _write_all(out, data) -> None:
    view = memoryview(data)
    while view:
        n = out.write(view)
        view = view[n:]
