"""Publishing a release: the variant files as retained chunks (or URLs), then the signed manifest."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerun import manifest as manifest_mod
from edgerun.contract import Topics
from edgerun.errors import EdgerunError
from edgerun.mqtt import Connection
from edgerun.package import ModelPackage, package_to_dict, variant_to_dict

DEFAULT_CHUNK_SIZE = 256 << 10
WINDOW = 32  # chunks in flight before waiting for the broker's acknowledgements


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


def publish_blobs(conn: Connection, topics: Topics, pkg: ModelPackage, manifest: dict[str, Any],
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
                pending.append(conn.publish(topics.blob(f["sha256"], i), block, retain=True))
                if len(pending) >= WINDOW:
                    conn.wait(pending[:WINDOW // 2])
                    del pending[:WINDOW // 2]
                sent += len(block)
                if progress:
                    progress(len(block))
    conn.wait(pending)
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


def upload_release(conn: Connection, topics: Topics, pkg: ModelPackage, key: Ed25519PrivateKey, key_id: str, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, url_base: str | None = None, mqtt: bool = True,
                   blob_dir: Path | None = None, expires: dt.datetime | None = None,
                   variants: list[str] | None = None,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check the files, publish every chunk (retained), and return the signed manifest, not yet released."""
    for v in pkg.variants:
        if variants is None or v.id in variants:
            pkg.verify(v)
    unsigned = build_manifest(pkg, chunk_size=chunk_size, url_base=url_base, mqtt=mqtt, expires=expires,
                              variants=variants)
    if blob_dir is not None:
        copy_blobs(pkg, unsigned, blob_dir)
    if mqtt:
        publish_blobs(conn, topics, pkg, unsigned, progress)
    return manifest_mod.sign(unsigned, key, key_id)


def release(conn: Connection, topics: Topics, signed: dict[str, Any], device: str | None = None) -> str:
    """Publish a signed manifest on the fleet's release topic (or one device's); returns the topic."""
    topic = topics.release(signed["model"], device)
    conn.wait([conn.publish(topic, encode(signed), retain=True)])
    return topic


def publish_release(conn: Connection, topics: Topics, pkg: ModelPackage, key: Ed25519PrivateKey, key_id: str, *,
                    device: str | None = None, **upload: Any) -> dict[str, Any]:
    """Chunks first (so a device never waits for blobs that are not there yet), then the signed manifest."""
    signed = upload_release(conn, topics, pkg, key, key_id, **upload)
    release(conn, topics, signed, device)
    return signed


def total_bytes(pkg: ModelPackage, variants: list[str] | None = None) -> int:
    seen: dict[str, int] = {}
    for v in pkg.variants:
        if variants is None or v.id in variants:
            for f in v.files:
                seen[f.sha256] = f.size
    return sum(seen.values())
