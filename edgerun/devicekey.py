"""The device's own age key: made under ``state_dir`` on first start, or read from a file or a systemd credential.

A key file that anyone but its owner can read is refused. docs/protection.md describes where the key lives and
how a hub enrols it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from edgerun.crypto import Identity, identity_file, read_identities
from edgerun.errors import DeviceKeyError, EdgerunError

if TYPE_CHECKING:
    from edgerun.config import Config

log = logging.getLogger(__name__)

KEY_NAME = "device.key"  # under state_dir
CREDENTIAL = "edgerun-device-key"  # systemd: LoadCredential=edgerun-device-key:/etc/edgerun/device.key
FLEET_CREDENTIAL = "edgerun-fleet-key"


def credential(name: str) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` when systemd passed that credential to the service."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None


def check_mode(path: Path) -> None:
    """Refuse a key file that its group or others can read or write."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise DeviceKeyError(f"device key {path} does not exist") from None
    except OSError as exc:
        raise DeviceKeyError(f"device key {path} cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        raise DeviceKeyError(f"device key {path} has mode {mode:04o}: its group or others can read it, so it is not "
                             f"used; make it private to the service user (chmod 600 {path})")


def read_key_file(path: Path) -> list[Identity]:
    """The identities of an age identity file, after checking that only its owner can read it."""
    check_mode(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceKeyError(f"device key {path} cannot be read: {exc}") from None
    try:
        return read_identities(text, str(path))
    except EdgerunError as exc:
        raise DeviceKeyError(str(exc)) from None


def create_key_file(path: Path) -> Identity:
    """A new identity written to ``path`` (mode 0600); the key already there wins a race to create it."""
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(identity_file(identity, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")))
            f.flush()
            os.fsync(f.fileno())
        if os.geteuid() == 0:  # root making it for the service: the state directory's owner must read it
            owner = path.parent.stat()
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        return read_key_file(path)[0]
    finally:
        os.unlink(tmp)
    log.info("created the device key %s: recipient %s", path, identity.recipient)
    return identity


class DeviceKey:
    """Where this device's identities come from, loaded on first use; a failure is retried on the next use."""

    def __init__(self, path: Path, *, create: bool = False, extra: tuple[Path, ...] = (), implicit: bool = False):
        self.path = Path(path)
        self.create = create  # the default location under state_dir: made when missing
        self.extra = tuple(Path(p) for p in extra)  # e.g. the fleet key
        self.implicit = implicit  # no configuration named it: an update agent puts its configuration's key instead
        self._identities: list[Identity] | None = None
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> "DeviceKey":
        """Without a configuration: ``EDGERUN_DEVICE_KEY_FILE``, the systemd credential, else ``device.key`` in the
        default state directory (read, never made from here)."""
        env = os.environ.get("EDGERUN_DEVICE_KEY_FILE")
        if env:
            return cls(Path(env), implicit=True)
        cred = credential(CREDENTIAL)
        if cred is not None:
            return cls(cred, implicit=True)
        from edgerun.config import DEFAULT_STATE_DIR

        return cls(DEFAULT_STATE_DIR / KEY_NAME, implicit=True)

    @classmethod
    def from_config(cls, config: "Config") -> "DeviceKey":
        """``device_key_file``, else the systemd credential, else ``{state_dir}/device.key`` (made on first start);
        plus ``fleet_key_file`` or its credential."""
        fleet = config.fleet_key_file or credential(FLEET_CREDENTIAL)
        extra = (fleet,) if fleet is not None else ()
        if config.device_key_file is not None:
            return cls(config.device_key_file, extra=extra)
        cred = credential(CREDENTIAL)
        if cred is not None:
            return cls(cred, extra=extra)
        return cls(Path(config.state_dir) / KEY_NAME, create=True, extra=extra)

    def _load(self, create: bool) -> list[Identity]:
        with self._lock:
            if self._identities is None:
                if create and self.create and not self.path.exists():
                    own = [create_key_file(self.path)]
                elif self.create and not self.path.exists():
                    raise DeviceKeyError(f"this device has no key yet ({self.path} is made when the update agent "
                                         f"first starts, or by `edgerun device key`)")
                else:
                    own = read_key_file(self.path)
                self._identities = own + [i for p in self.extra for i in read_key_file(p)]
            return self._identities

    def identities(self) -> list[Identity]:
        """Every identity this device decrypts with; DeviceKeyError naming the file and the problem."""
        return self._load(create=False)

    def ensure(self) -> Identity:
        """The device's own identity, made now at the default location when there is none."""
        return self._load(create=True)[0]

    def fingerprints(self) -> frozenset[str]:
        return frozenset(i.recipient.fingerprint for i in self.identities())

    def problem(self) -> str | None:
        """Why no key can be used right now, or None."""
        try:
            self.identities()
        except DeviceKeyError as exc:
            return str(exc)
        return None
