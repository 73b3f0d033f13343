"""Hub signing keys: generate an Ed25519 pair (private key 0600, never printed), load the private key."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerun.errors import EdgerunError
from edgerun.manifest import KEY_ID, load_private_key, public_key_pem

__all__ = ["generate", "load_private_key", "public_key_path"]

def public_key_path(directory: Path, key_id: str) -> Path:
    return Path(directory) / f"{key_id}.pub"


def generate(directory: Path, key_id: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``{key_id}.key`` (PEM PKCS#8, mode 0600) and ``{key_id}.pub`` (PEM) in ``directory``."""
    if not KEY_ID.match(key_id):
        raise EdgerunError(f"key id {key_id!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{key_id}.key", public_key_path(directory, key_id)
    if not force and (priv_path.exists() or pub_path.exists()):
        raise EdgerunError(f"{priv_path} or {pub_path} already exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = priv_path.with_name(f".{priv_path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, priv_path)
    pub_path.write_bytes(public_key_pem(key))
    return priv_path, pub_path
