"""Encrypting a package's variants for devices: whom (``--encrypt-for``), and the age files and manifest entries.

One ciphertext per file with one X25519 stanza per recipient, so a leaked device key opens that device's copy and
exposes no other device's key (docs/protection.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgerun.crypto import Recipient, encrypt_file
from edgerun.errors import EdgerunError
from edgerun.package import ENCRYPTED_SUFFIX, Encryption, FileEntry, ModelPackage, save_package, sha256_file

if TYPE_CHECKING:
    from edgerun.hub.registry import Registry

FLEET = "@fleet"  # the fleet key, enrolled as a device of that name
ALL = "@all"  # every enrolled device key


def resolve(specs: Sequence[str], registry: "Registry | None", fleet: str) -> list[Recipient]:
    """The recipients ``--encrypt-for`` names: ``age1...`` keys, enrolled devices, ``@fleet`` or ``@all``."""
    out: dict[bytes, Recipient] = {}
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("age1"):
            found = [Recipient.parse(spec)]
        elif registry is None:
            raise EdgerunError(f"--encrypt-for {spec}: only age1... keys can be named without a registry")
        elif spec == ALL:
            keys = [k for k in registry.device_keys(fleet) if k.device != FLEET]
            if not keys:
                raise EdgerunError(f"--encrypt-for @all: no device key is enrolled in fleet {fleet!r} "
                                   f"(edgerun hub keys add DEVICE age1...)")
            found = [Recipient.parse(k.recipient) for k in keys]
        else:
            rec = registry.device_key(fleet, spec)
            if rec is None:
                what = "no fleet key is enrolled" if spec == FLEET else f"device {spec!r} has no enrolled key"
                raise EdgerunError(f"--encrypt-for {spec}: {what} in fleet {fleet!r} "
                                   f"(edgerun hub keys add {spec} age1...; a device prints its key with "
                                   f"`edgerun device key`)")
            found = [Recipient.parse(rec.recipient)]
        for r in found:
            out.setdefault(r.key, r)
    if not out:
        raise EdgerunError("--encrypt-for names no key")
    return list(out.values())


def encrypt_package(pkg: ModelPackage, recipients: Sequence[Recipient], out: Path, *,
                    variants: Sequence[str] | None = None) -> ModelPackage:
    """Write ``out``: the package with each chosen variant's files encrypted (``FILE.age``) and no clear copy.

    ``out`` may be the package's own directory: the clear files are then replaced.
    """
    if pkg.root is None:
        raise EdgerunError(f"package {pkg.name!r} has no directory on disk")
    chosen = [v for v in pkg.variants if variants is None or v.id in variants]
    if not chosen:
        raise EdgerunError(f"no variant of {pkg.name!r} selected; it has {[v.id for v in pkg.variants]}")
    already = [v.id for v in chosen if v.encrypted]
    if already:
        raise EdgerunError(f"variant(s) {already} of {pkg.name!r} are encrypted already")
    for v in chosen:
        pkg.verify(v)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = tuple(sorted(r.fingerprint for r in recipients))
    done: dict[str, FileEntry] = {}
    new_variants = []
    for v in chosen:
        files = []
        for f in v.files:
            if f.path not in done:
                dest = out / (f.path + ENCRYPTED_SUFFIX)
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
                os.close(fd)
                try:
                    encrypt_file(pkg.path_of(f), Path(tmp), recipients)
                    os.chmod(tmp, 0o644)  # ciphertext: readable by a service user, like any model file
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                done[f.path] = FileEntry(f.path + ENCRYPTED_SUFFIX, sha256_file(dest), dest.stat().st_size,
                                         f.chunk_size, f.source, Encryption("age", fingerprints))
            files.append(done[f.path])
        new_variants.append(replace(v, files=tuple(files)))
    clear = {f.path for v in chosen for f in v.files}
    same_dir = out.resolve() == pkg.root.resolve()
    encrypted = replace(pkg, variants=new_variants, raw={}, root=out)
    save_package(encrypted, out)
    if same_dir:
        keep = {f.path for v in pkg.variants if v not in chosen for f in v.files}
        for path in clear - keep:
            (out / path).unlink(missing_ok=True)
    return ModelPackage.load(out)


def encrypted_copy(pkg: ModelPackage, recipients: Sequence[Recipient], *,
                   variants: Sequence[str] | None = None) -> tuple[ModelPackage, Path]:
    """An encrypted copy of ``pkg`` in a new temporary directory (the caller deletes it); for publishing."""
    tmp = Path(tempfile.mkdtemp(prefix=f"edgerun-{pkg.name}-encrypted-"))
    try:
        return encrypt_package(pkg, recipients, tmp, variants=variants), tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
