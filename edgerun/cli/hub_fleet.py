"""``edgerun hub keygen | upload | publish | status | releases | history | watch | retire | gc``."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgerun.cli.app import console, err_console, fail, hub_app
from edgerun.cli.hub_common import Hub, hub_command, signing_key
from edgerun.units import format_duration

if TYPE_CHECKING:
    from edgerun.hub.registry import DeviceRecord, Registry
    from edgerun.package import ModelPackage


def when(ts: float | None) -> str:
    """A time as people read it in a table: local, to the second."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: float | None, now: float | None = None) -> str:
    return "-" if not ts else f"{format_duration(max(0.0, (now or time.time()) - ts))} ago"


@hub_app.command()
def keygen(
    out: Path = typer.Option(Path("."), "--out", "-o", help="Directory for KEY_ID.key (0600) and KEY_ID.pub."),
    key_id: str = typer.Option(..., "--key-id", help="Name devices know the key by, e.g. hub-2026."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Make an Ed25519 signing key pair; copy KEY_ID.pub into each device's trusted_keys directory."""
    from edgerun.hub.keys import generate

    priv, pub = generate(out, key_id, force=force)
    console.print(f"private key: {priv} (mode 0600; keep it on the hub)\npublic key:  {pub} "
                  f"(copy to the devices' [mqtt] trusted_keys directory)", highlight=False)


@hub_app.command()
def pubkey(key: Path = typer.Argument(..., help="The private key file from `hub keygen`.")) -> None:
    """Print the public key for devices: `edgerun hub pubkey KEY > TRUSTED_KEYS_DIR/KEY_ID.pub`."""
    from edgerun.manifest import load_private_key, public_key_pem

    print(public_key_pem(load_private_key(key)).decode(), end="")


def _upload(hub: Hub, package: Path, key: Path | None, key_id: str | None, *, device: str | None, release: bool,
            url_base: str | None, blob_dir: Path | None, mqtt_chunks: bool, chunk_size: int,
            variant: list[str] | None, expires_in: float | None, encrypt_for: list[str] | None) -> None:
    import shutil

    from edgerun.package import ModelPackage

    private, key_id = signing_key(key, key_id)
    pkg = ModelPackage.load(package)
    registry = hub.registry()  # before anything is sent: a release is never published without its record
    if not encrypt_for:
        _send(hub, registry, pkg, private, key_id, device=device, release=release, url_base=url_base,
              blob_dir=blob_dir, mqtt_chunks=mqtt_chunks, chunk_size=chunk_size, variant=variant, expires_in=expires_in)
        return
    from edgerun.hub.encrypt import encrypted_copy, resolve

    recipients = resolve(encrypt_for, registry, hub.fleet)
    encrypted, tmp = encrypted_copy(pkg, recipients, variants=variant or None)
    try:
        console.print(f"encrypted {len(encrypted.variants)} variant(s) to {len(recipients)} key(s): "
                      f"{', '.join(sorted(r.fingerprint for r in recipients))}", highlight=False, markup=False)
        _send(hub, registry, encrypted, private, key_id, device=device, release=release, url_base=url_base,
              blob_dir=blob_dir, mqtt_chunks=mqtt_chunks, chunk_size=chunk_size, variant=None, expires_in=expires_in)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _send(hub: Hub, registry: "Registry", pkg: "ModelPackage", private: Any, key_id: str, *, device: str | None,
          release: bool, url_base: str | None, blob_dir: Path | None, mqtt_chunks: bool, chunk_size: int,
          variant: list[str] | None, expires_in: float | None) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgerun.hub import publish as pub
    from edgerun.mqtt import Connection

    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=expires_in) if expires_in else None
    t0 = time.perf_counter()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err_console, disable=not mqtt_chunks)
    with Connection(hub.broker, persistent=False) as conn, bar:
        task = bar.add_task(f"{pkg.name} v{pkg.version} chunks", total=pub.total_bytes(pkg, variant or None))
        signed = pub.upload_release(conn, hub.topics, pkg, private, key_id, chunk_size=chunk_size, url_base=url_base,
                                    mqtt=mqtt_chunks, blob_dir=blob_dir, expires=expires, variants=variant or None,
                                    progress=lambda n: bar.advance(task, n))
        record = registry.record_release(hub.fleet, signed, source="publish" if release else "upload")
        if release:
            topic = pub.release(conn, hub.topics, signed, device)
    took = time.perf_counter() - t0
    if release:
        console.print(f"published {pkg.name} v{pkg.version} to {topic} in {took:.1f}s (signed by {key_id!r}, "
                      f"release {record.digest[:12]})", highlight=False)
    else:
        console.print(f"uploaded {pkg.name} v{pkg.version} in {took:.1f}s (signed by {key_id!r}, release "
                      f"{record.digest[:12]}); no device sees it yet. Roll it out with:\n"
                      f"  edgerun hub rollout start {pkg.name} {pkg.version} --fleet {hub.fleet} --key ...",
                      highlight=False)


PackageArg = typer.Argument(..., help="Model package directory (edgerun.toml and its variant files).")
KeyOpt = typer.Option(None, "--key", "-k", help="Private key file from `hub keygen` (or EDGERUN_HUB_KEY).")
KeyIdOpt = typer.Option(None, "--key-id", help="Key id (default: the key file's name without .key).")
UrlBaseOpt = typer.Option(None, "--url-base", help="Devices fetch files from URL_BASE/<sha256> over HTTP(S).")
BlobDirOpt = typer.Option(None, "--blob-dir", help="Copy files as BLOB_DIR/<sha256> (what --url-base serves).")
ChunksOpt = typer.Option(True, "--mqtt-chunks/--no-mqtt-chunks", help="Also publish retained chunks.")
ChunkSizeOpt = typer.Option(256 << 10, "--chunk-size", help="Chunk size in bytes.")
VariantOpt = typer.Option(None, "--variant", help="Release only these variants (repeatable).")
ExpiresOpt = typer.Option(None, "--expires-in", help="Hours until devices refuse this manifest.")
EncryptOpt = typer.Option(None, "--encrypt-for", help="Encrypt the variants to these keys (repeatable): a device id "
                                                      "(its enrolled key), @fleet, @all (every enrolled device) or "
                                                      "an age1... key; one ciphertext per file, one stanza per key.")


@hub_app.command()
@hub_command
def upload(package: Path = PackageArg, key: Path = KeyOpt, key_id: str = KeyIdOpt, url_base: str = UrlBaseOpt,
           blob_dir: Path = BlobDirOpt, mqtt_chunks: bool = ChunksOpt, chunk_size: int = ChunkSizeOpt,
           variant: list[str] = VariantOpt, expires_in: float = ExpiresOpt, encrypt_for: list[str] = EncryptOpt, *,
           hub: Hub) -> None:
    """Upload a release (retained chunks) and record it, signed, in the registry; `rollout` releases it."""
    _upload(hub, package, key, key_id, device=None, release=False, url_base=url_base, blob_dir=blob_dir,
            mqtt_chunks=mqtt_chunks, chunk_size=chunk_size, variant=variant, expires_in=expires_in,
            encrypt_for=encrypt_for)


@hub_app.command()
@hub_command
def publish(package: Path = PackageArg,
            device: str = typer.Option(None, "--device", "-d", help="Release to this device only (a canary)."),
            key: Path = KeyOpt, key_id: str = KeyIdOpt, url_base: str = UrlBaseOpt, blob_dir: Path = BlobDirOpt,
            mqtt_chunks: bool = ChunksOpt, chunk_size: int = ChunkSizeOpt, variant: list[str] = VariantOpt,
            expires_in: float = ExpiresOpt, encrypt_for: list[str] = EncryptOpt, *, hub: Hub) -> None:
    """Publish a release to the whole fleet at once (or one device): chunks, then the signed manifest.

    For a staged release with health gates use `upload`, then `rollout start`.
    """
    _upload(hub, package, key, key_id, device=device, release=True, url_base=url_base, blob_dir=blob_dir,
            mqtt_chunks=mqtt_chunks, chunk_size=chunk_size, variant=variant, expires_in=expires_in,
            encrypt_for=encrypt_for)


# --- the fleet's state ------------------------------------------------------------------------------

def sync(hub: Hub, registry: "Registry") -> str | None:
    """Bring the registry up to date from the broker's retained messages; the reason when that failed."""
    from edgerun.errors import EdgerunError
    from edgerun.hub.watch import FleetWatch

    watch = FleetWatch(hub.broker, hub.topics, registry, name="status", persistent=False)
    try:
        watch.start()
    except EdgerunError as exc:
        return str(exc)
    watch.stop()
    return None


TABLE_LIMIT = 100  # beyond this many devices, status shows a summary and the devices that need a look
DEVICE_COLUMNS = ("device", "online", "profile", "tags", "models", "versions", "variant", "backend", "update", "seen")


def _cells(d: "DeviceRecord", now: float) -> list[str]:
    """One device's row as plain text, one line per model."""
    ms = d.models
    u = d.update or {}
    update = "-" if not u else f"{u.get('model')} v{u.get('version')}: {u.get('state')}"
    if u.get("state") == "downloading" and u.get("progress") is not None:
        update += f" {u['progress']:.0%}"
    return [d.device, "-" if d.online is None else ("yes" if d.online else "no"), d.profile or "-",
            " ".join(f"{k}={v}" for k, v in sorted(d.tags.items())) or "-",
            "\n".join(m["name"] for m in ms) or "-", "\n".join(str(m.get("version")) for m in ms) or "-",
            "\n".join(str(m.get("variant")) for m in ms) or "-", "\n".join(str(m.get("backend")) for m in ms) or "-",
            update, ago(d.status_ts or d.state_ts, now)]


def device_table(rows: list["DeviceRecord"], title: str) -> Table:
    table = Table(title=title)
    for col in DEVICE_COLUMNS:
        table.add_column(col)
    now = time.time()
    for d in rows:
        cells = [escape(c) for c in _cells(d, now)]
        cells[1] = {"yes": "[green]yes[/]", "no": "[red]no[/]"}.get(cells[1], cells[1])
        if d.last_error:
            cells[8] += f"\n[red]{escape(d.last_error[:80])}[/]"
        table.add_row(*cells)
    return table


def print_plain(rows: list["DeviceRecord"]) -> None:
    """Every device as aligned plain text: fast at any fleet size, and easy to grep."""
    now = time.time()
    lines = [list(DEVICE_COLUMNS)] + [[c.replace("\n", ",") for c in _cells(d, now)] for d in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(DEVICE_COLUMNS))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    print("\n".join(out))


def needs_a_look(d: "DeviceRecord") -> bool:
    state = (d.update or {}).get("state")
    return d.online is False or bool(d.last_error) or state not in (None, "active", "retired")


def summary_table(rows: list["DeviceRecord"], title: str) -> Table:
    """Counts by connection, update state, profile and model version."""
    def count(key) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in rows:
            for k in key(d):
                out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    groups = {
        "connection": count(lambda d: ["online" if d.online else "offline" if d.online is False else "unknown"]),
        "update": count(lambda d: [(d.update or {}).get("state") or "none"]),
        "profile": count(lambda d: [d.profile or "-"]),
        "model": count(lambda d: [f"{m['name']} v{m.get('version')}" for m in d.models] or ["none"]),
    }
    table = Table(title=title)
    for name in groups:
        table.add_column(name)
    depth = max(len(g) for g in groups.values())
    cols = [[f"{k}: {n}" for k, n in g.items()] + [""] * (depth - len(g)) for g in groups.values()]
    for row in zip(*cols):
        table.add_row(*(escape(c) for c in row))
    return table


@hub_app.command()
@hub_command
def status(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    offline: bool = typer.Option(False, "--offline", help="Show the registry only; do not ask the broker."),
    select: list[str] = typer.Option(None, "--select", "-s", help="Only devices matching tag:NAME=V, profile=P, "
                                                                 "devices=ID or online (repeatable: all must match)."),
    show_all: bool = typer.Option(False, "--all", help=f"List every device, also beyond {TABLE_LIMIT} (plain text)."),
    *, hub: Hub,
) -> None:
    """The fleet: online, profile, tags, models, versions, variant, backend, update state and last error.

    Up to 100 devices are listed in a table; a larger fleet gets a summary and the devices that need a look
    (offline, failed, updating), and `--all` lists every device.
    """
    from edgerun.hub.select import check_selector, matches

    registry = hub.registry()
    problem = None if offline else sync(hub, registry)
    if problem:
        err_console.print(f"[yellow]warning:[/] {escape(problem)}; showing the registry as last seen")
    if select:
        check_selector(select)
    rows = [d for d in registry.devices(hub.fleet, with_status=as_json) if not select or matches(d, select)]
    if as_json:
        print(json.dumps([d.to_dict() for d in rows], indent=1))
        return
    online = sum(1 for d in rows if d.online)
    title = f"Fleet {hub.fleet!r}: {len(rows)} known, {online} connected"
    if show_all:
        console.print(title, highlight=False)
        print_plain(rows)
    elif len(rows) <= TABLE_LIMIT:
        console.print(device_table(rows, title))
    else:
        console.print(summary_table(rows, title))
        look = [d for d in rows if needs_a_look(d)]
        if look:
            console.print(device_table(look[:TABLE_LIMIT], f"{len(look)} device(s) that need a look"
                                       + (f" (first {TABLE_LIMIT})" if len(look) > TABLE_LIMIT else "")))
        console.print(f"--all lists all {len(rows)} devices; --select narrows (e.g. --select profile=raspberry-pi-4)",
                      highlight=False)


@hub_app.command()
@hub_command
def releases(model: str = typer.Argument(None, help="Only this model."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."), *,
             hub: Hub) -> None:
    """Every release the registry knows: version, variants, signing key, who made it and when."""
    rows = hub.registry().releases(hub.fleet, model)
    if as_json:
        print(json.dumps([{**r.__dict__, "manifest": None} for r in rows], indent=1, default=str))
        return
    table = Table(title=f"Releases of fleet {hub.fleet!r}" + (f", model {model}" if model else ""))
    for col in ("model", "version", "release", "variants", "key", "how", "by", "recorded"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.model, str(r.version), r.digest[:12], ", ".join(v["id"] for v in r.variants), r.key_id,
                      r.source, r.recorded_by, when(r.recorded_at))
    console.print(table)


@hub_app.command()
@hub_command
def history(model: str = typer.Argument(..., help="The model."),
            limit: int = typer.Option(20, "--events", help="How many recent events to show."), *, hub: Hub) -> None:
    """A model's story: releases, rollouts and how they ended, which versions run where, recent events."""
    from edgerun.cli.hub_rollout import rollout_summary

    registry = hub.registry()
    rels = registry.releases(hub.fleet, model)
    outs = registry.rollouts(hub.fleet, model)
    devices = registry.devices(hub.fleet)
    if not rels and not outs and not any(d.model(model) for d in devices):
        raise fail(f"the registry of fleet {hub.fleet!r} knows nothing of model {model!r}", 66)
    t = Table(title=f"{model}: releases")
    for col in ("version", "release", "how", "by", "recorded"):
        t.add_column(col)
    for r in rels:
        t.add_row(str(r.version), r.digest[:12], r.source, r.recorded_by, when(r.recorded_at))
    console.print(t)
    if outs:
        t = Table(title=f"{model}: rollouts")
        for col in ("id", "version", "state", "devices", "started", "by", "reason"):
            t.add_column(col)
        for r in outs:
            t.add_row(str(r.id), str(r.version), r.state, rollout_summary(registry, r), when(r.created_at),
                      r.created_by, escape(r.reason or ""))
        console.print(t)
    serving: dict[Any, int] = {}
    for d in devices:
        m = d.model(model)
        if m:
            serving[(m.get("version"), m.get("variant"), m.get("backend"))] = \
                serving.get((m.get("version"), m.get("variant"), m.get("backend")), 0) + 1
    if serving:
        t = Table(title=f"{model}: what runs where")
        for col in ("version", "variant", "backend", "devices"):
            t.add_column(col)
        for (v, variant, backend), n in sorted(serving.items(), key=lambda kv: (-(kv[0][0] or 0), kv[0][1] or "")):
            t.add_row(str(v), str(variant), str(backend), str(n))
        console.print(t)
    evs = registry.events(hub.fleet, model=model, limit=limit)
    if evs:
        t = Table(title=f"{model}: last {len(evs)} event(s)")
        for col in ("received", "device", "version", "state", "detail"):
            t.add_column(col)
        for e in evs:
            t.add_row(when(e.received), e.device, str(e.version), e.state, escape(e.detail[:100]))
        console.print(t)


@hub_app.command()
@hub_command
def watch(*, hub: Hub) -> None:
    """Follow the fleet and keep the registry current until Ctrl-C; prints every update event."""
    import logging
    import signal
    import threading

    from edgerun.contract import Event, State
    from edgerun.hub.watch import FleetWatch

    log = logging.getLogger("edgerun.hub")
    stop = threading.Event()
    registry = hub.registry()
    online = {d.device: d.online for d in registry.devices(hub.fleet)}  # log changes, not every retained state

    def show(kind: str, device: str, obj: object) -> None:
        if kind == "event" and isinstance(obj, Event):
            level = logging.WARNING if obj.failed else logging.INFO
            log.log(level, "%s: %s v%d %s %s", device, obj.model, obj.version, obj.state, obj.detail)
        elif kind == "state" and isinstance(obj, State) and online.get(device) is not obj.online:
            online[device] = obj.online
            log.info("%s: %s (session %d)", device, "online" if obj.online else "offline", obj.session)

    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    w = FleetWatch(hub.broker, hub.topics, registry)
    w.add_listener(show)  # before the connection: no message between the retained ones and the live ones is missed
    with w:
        log.info("watching fleet %r on %s into %s: %d device(s) known", hub.fleet, hub.broker.address,
                 registry.shown, len(w.statuses))
        try:
            while not stop.wait(60):
                log.info("%d device(s), %d online, %d message(s) so far", len(w.states),
                         sum(1 for s in w.states.values() if s.online), w.messages)
        except KeyboardInterrupt:
            pass


@hub_app.command()
@hub_command
def retire(
    model: str = typer.Argument(..., help="Model to retire."),
    device: str = typer.Option(None, "--device", "-d", help="Clear only this device's override release."),
    purge_blobs: bool = typer.Option(False, "--purge-blobs", help="Also delete the retired release's chunks."),
    *, hub: Hub,
) -> None:
    """Clear a model's retained release: devices stop serving it (a device release falls back to the fleet's)."""
    from edgerun.hub.fleet import retire as do_retire
    from edgerun.mqtt import Connection

    with Connection(hub.broker, persistent=False) as conn:
        shas = do_retire(conn, hub.topics, model, device=device, purge_blobs=purge_blobs)
    console.print(f"retired {model}" + (f" for device {device}" if device else "")
                  + (f"; deleted {len(shas)} blob(s)" if shas else ""), highlight=False)


@hub_app.command()
@hub_command
def gc(dry_run: bool = typer.Option(False, "--dry-run", help="Only list the blobs that would be deleted."), *,
       hub: Hub) -> None:
    """Delete retained chunks that no current release refers to (retired and superseded versions)."""
    from edgerun.hub.fleet import gc_blobs
    from edgerun.mqtt import Connection

    with Connection(hub.broker, persistent=False) as conn:
        orphans = gc_blobs(conn, hub.topics, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(orphans)} blob(s)" + "".join(f"\n  {s}" for s in orphans), highlight=False)
