"""Publishing a release: the variant files as retained chunks (or URLs), then the signed manifest."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerun import manifest as manifest_mod
from edgerun.errors import EdgerunError
from edgerun.hub.broker import HubClient
from edgerun.package import ModelPackage, package_to_dict, variant_to_dict

DEFAULT_CHUNK_SIZE = 256 << 10
WINDOW = 32  # chunks in flight before waiting for the broker's acknowledgements


def prefix(fleet: str) -> str:
    return f"edgerun/v1/{fleet}"


def release_topic(fleet: str, model: str, device: str | None = None) -> str:
    if device:
        return f"{prefix(fleet)}/devices/{device}/releases/{model}"
    return f"{prefix(fleet)}/releases/{model}"


def blob_topic(fleet: str, sha256: str, index: int) -> str:
    return f"{prefix(fleet)}/blobs/{sha256}/{index}"


def build_manifest(pkg: ModelPackage, *, chunk_size: int = DEFAULT_CHUNK_SIZE, url_base: str | None = None,
                   mqtt: bool = True, expires: dt.datetime | None = None,
                   variants: list[str] | None = None) -> dict[str, Any]:
    """The unsigned manifest of ``pkg`` (every variant, or the ones named)."""
    if not mqtt and not url_base:
        raise EdgerunError("a release needs MQTT chunks or a --url-base (or both)")
    chosen = [v for v in pkg.variants if variants is None or v.id in variants]
    if not chosen:
        raise EdgerunError(f"no variant of {pkg.name!r} selected; it has {[v.id for v in pkg.variants]}")
    body = package_to_dict(pkg)
    body.pop("variants", None)
    out_variants = []
    for v in chosen:
        d = variant_to_dict(v)
        for f in d["files"]:
            source: dict[str, Any] = {"mqtt": mqtt}
            if url_base:
                source["url"] = f"{url_base.rstrip('/')}/{f['sha256']}"
            f["chunk_size"] = chunk_size
            f["source"] = source
        out_variants.append(d)
    return {"schema": manifest_mod.SCHEMA, "model": pkg.name, "version": pkg.version,
            "created": manifest_mod.utc_now(),
            "expires": expires.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if expires else None,
            "package": body, "variants": out_variants}


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, ensure_ascii=False, separators=(",", ":")).encode()


def iter_chunks(path: Path, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        i = 0
        while block := f.read(chunk_size):
            yield i, block
            i += 1


def publish_blobs(client: HubClient, fleet: str, pkg: ModelPackage, manifest: dict[str, Any],
                  progress: Callable[[int], None] | None = None) -> int:
    """Publish every chunk of every file the manifest names (retained, QoS 1); returns bytes sent."""
    sent = 0
    pending = []
    seen: set[str] = set()
    for v in manifest["variants"]:
        for f in v["files"]:
            if f["sha256"] in seen or not f.get("source", {}).get("mqtt", True):
                continue
            seen.add(f["sha256"])
            for i, block in iter_chunks(pkg.root / f["path"], f["chunk_size"]):
                pending.append(client.publish(blob_topic(fleet, f["sha256"], i), block))
                if len(pending) >= WINDOW:
                    client.wait(pending[:WINDOW // 2])
                    del pending[:WINDOW // 2]
                sent += len(block)
                if progress:
                    progress(len(block))
    client.wait(pending)
    return sent


def copy_blobs(pkg: ModelPackage, manifest: dict[str, Any], blob_dir: Path) -> list[Path]:
    """Copy each file to ``blob_dir/{sha256}`` for a static HTTP server behind --url-base."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for v in manifest["variants"]:
        for f in v["files"]:
            dest = blob_dir / f["sha256"]
            if not dest.exists():
                shutil.copyfile(pkg.root / f["path"], dest)
            out.append(dest)
    return out


def publish_release(client: HubClient, pkg: ModelPackage, key: Ed25519PrivateKey, key_id: str, *, fleet: str,
                    device: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, url_base: str | None = None,
                    mqtt: bool = True, blob_dir: Path | None = None, expires: dt.datetime | None = None,
                    variants: list[str] | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Chunks first (so a device never waits for blobs that are not there yet), then the signed manifest."""
    for v in pkg.variants:
        if variants is None or v.id in variants:
            pkg.verify(v)
    unsigned = build_manifest(pkg, chunk_size=chunk_size, url_base=url_base, mqtt=mqtt, expires=expires,
                              variants=variants)
    if blob_dir is not None:
        copy_blobs(pkg, unsigned, blob_dir)
    if mqtt:
        publish_blobs(client, fleet, pkg, unsigned, progress)
    signed = manifest_mod.sign(unsigned, key, key_id)
    client.wait([client.publish(release_topic(fleet, pkg.name, device), encode(signed))])
    return signed


def total_bytes(pkg: ModelPackage, variants: list[str] | None = None) -> int:
    seen: dict[str, int] = {}
    for v in pkg.variants:
        if variants is None or v.id in variants:
            for f in v.files:
                seen[f.sha256] = f.size
    return sum(seen.values())
