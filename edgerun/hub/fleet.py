"""Retained messages on the broker seen from the hub: current releases, retiring models, blob clean-up."""

from __future__ import annotations

import json
from typing import Any

from edgerun.contract import Topics
from edgerun.mqtt import Connection


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def releases(conn: Connection, topics: Topics) -> dict[str, dict[str, Any]]:
    """The retained release manifests of the fleet and of its devices, by topic."""
    got = conn.collect([topics.releases_filter(), topics.releases_filter("+")])
    return {t: m for t, p in got.items() if p and isinstance(m := _json(p), dict)}


def retire(conn: Connection, topics: Topics, model: str, *, device: str | None = None,
           purge_blobs: bool = False) -> list[str]:
    """Clear the retained release (devices stop serving the model); optionally delete its chunks."""
    topic = topics.release(model, device)
    shas: list[str] = []
    if purge_blobs:
        current = releases(conn, topics).get(topic)
        if current:
            shas = sorted({f["sha256"] for v in current.get("variants", []) for f in v.get("files", [])})
    conn.wait([conn.publish(topic, b"", retain=True)])
    if shas:
        still = _referenced(releases(conn, topics))
        for sha in shas:
            if sha not in still:
                delete_blob(conn, topics, sha)
    return shas


def _referenced(manifests: dict[str, dict[str, Any]]) -> dict[str, int]:
    out = {}
    for m in manifests.values():
        for v in m.get("variants", []):
            for f in v.get("files", []):
                if isinstance(f, dict) and "sha256" in f:
                    out[f["sha256"]] = f.get("size", 0)
    return out


def delete_blob(conn: Connection, topics: Topics, sha256: str) -> int:
    """Clear every retained chunk of one blob; returns how many chunks there were."""
    got = conn.collect([topics.blobs(sha256)], quiet=0.3)
    infos = [conn.publish(topic, b"", retain=True) for topic in got]
    conn.wait(infos)
    return len(infos)


def gc_blobs(conn: Connection, topics: Topics, *, dry_run: bool = False) -> list[str]:
    """Delete the retained chunks of every blob no current release (fleet or device) refers to."""
    referenced = _referenced(releases(conn, topics))
    firsts = conn.collect([f"{topics.prefix}/blobs/+/0"], quiet=0.3)
    present = {ref.sha256 for t in firsts if (ref := topics.parse(t)) is not None and ref.kind == "blob"}
    orphans = sorted(present - set(referenced))
    if not dry_run:
        for sha in orphans:
            delete_blob(conn, topics, sha)
    return orphans


__all__ = ["releases", "retire", "delete_blob", "gc_blobs"]
