"""The fleet seen from the hub: device table from retained state/status, retiring models, blob clean-up."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgerun.hub.broker import HubClient
from edgerun.hub.publish import blob_topic, prefix, release_topic


@dataclass
class DeviceRow:
    """One device as its retained ``state`` and ``status`` describe it."""

    device: str
    online: bool | None = None
    session: int | None = None
    profile: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    update: dict[str, Any] | None = None
    status_ts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "online": self.online, "session": self.session, "profile": self.profile,
                "models": self.models, "update": self.update, "status_ts": self.status_ts}


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def fleet_status(client: HubClient, fleet: str, *, quiet: float = 0.5) -> list[DeviceRow]:
    """Every device that has a retained state or status message in ``fleet``."""
    base = f"{prefix(fleet)}/devices/"
    got = client.collect([f"{base}+/state", f"{base}+/status"], quiet=quiet)
    rows: dict[str, DeviceRow] = {}
    for topic, payload in got.items():
        device, _, kind = topic[len(base):].partition("/")
        row = rows.setdefault(device, DeviceRow(device))
        data = _json(payload)
        if not isinstance(data, dict):
            continue
        if kind == "state":
            row.online, row.session = bool(data.get("online")), data.get("session")
        elif kind == "status":
            row.profile = str(data.get("profile", ""))
            row.models = list(data.get("models") or [])
            row.update = data.get("update")
            row.status_ts = data.get("ts")
    return [rows[k] for k in sorted(rows)]


def releases(client: HubClient, fleet: str) -> dict[str, dict[str, Any]]:
    """The retained release manifests of the fleet and of its devices, by topic."""
    got = client.collect([f"{prefix(fleet)}/releases/+", f"{prefix(fleet)}/devices/+/releases/+"])
    return {t: m for t, p in got.items() if p and isinstance(m := _json(p), dict)}


def retire(client: HubClient, fleet: str, model: str, *, device: str | None = None,
           purge_blobs: bool = False) -> list[str]:
    """Clear the retained release (devices stop serving the model); optionally delete its chunks."""
    topic = release_topic(fleet, model, device)
    shas: list[str] = []
    if purge_blobs:
        current = releases(client, fleet).get(topic)
        if current:
            shas = sorted({f["sha256"] for v in current.get("variants", []) for f in v.get("files", [])})
    client.wait([client.publish(topic, b"")])
    if shas:
        still = _referenced(releases(client, fleet))
        for sha in shas:
            if sha not in still:
                delete_blob(client, fleet, sha)
    return shas


def _referenced(manifests: dict[str, dict[str, Any]]) -> dict[str, int]:
    out = {}
    for m in manifests.values():
        for v in m.get("variants", []):
            for f in v.get("files", []):
                if isinstance(f, dict) and "sha256" in f:
                    out[f["sha256"]] = f.get("size", 0)
    return out


def delete_blob(client: HubClient, fleet: str, sha256: str) -> int:
    """Clear every retained chunk of one blob; returns how many chunks there were."""
    got = client.collect([f"{prefix(fleet)}/blobs/{sha256}/+"], quiet=0.3)
    infos = [client.publish(topic, b"") for topic in got]
    client.wait(infos)
    return len(infos)


def gc_blobs(client: HubClient, fleet: str, *, dry_run: bool = False) -> list[str]:
    """Delete the retained chunks of every blob no current release (fleet or device) refers to."""
    referenced = _referenced(releases(client, fleet))
    firsts = client.collect([f"{prefix(fleet)}/blobs/+/0"], quiet=0.3)
    base = f"{prefix(fleet)}/blobs/"
    present = {t[len(base):].split("/", 1)[0] for t in firsts}
    orphans = sorted(present - set(referenced))
    if not dry_run:
        for sha in orphans:
            delete_blob(client, fleet, sha)
    return orphans


__all__ = ["DeviceRow", "fleet_status", "releases", "retire", "delete_blob", "gc_blobs", "blob_topic"]
