"""``edgerun hub keygen | publish | status | retire | gc``: signing keys, releases and the fleet's state."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from edgerun.cli.app import console, err_console, fail, hub_app

ConfigOpt = typer.Option(None, "--config", "-c", help="Take broker and fleet defaults from this config's [mqtt].")
HostOpt = typer.Option(None, "--host", help="MQTT broker host (default: config, else 127.0.0.1).")
PortOpt = typer.Option(None, "--port", help="MQTT broker port (default: config, else 1883).")
UserOpt = typer.Option(None, "--username", help="MQTT user name.")
PassFileOpt = typer.Option(None, "--password-file", help="File holding the MQTT password (or EDGERUN_MQTT_PASSWORD).")
TlsOpt = typer.Option(None, "--tls/--no-tls", help="Connect with TLS.")
CaOpt = typer.Option(None, "--ca-file", help="CA bundle for the broker's certificate.")
FleetOpt = typer.Option(None, "--fleet", "-f", help="Fleet name (default: config, else 'default').")


def _broker(config: Path | None, host, port, username, password_file, tls, ca_file):
    from edgerun.config import load_config
    from edgerun.mqtt import Broker

    m = load_config(config).mqtt
    password = os.environ.get("EDGERUN_MQTT_PASSWORD")
    if password is None and password_file:
        password = Path(password_file).read_text().strip()
    if password is None and not username:
        password = m.password()
    return Broker(host=host or m.host, port=port or m.port, username=username or m.username, password=password,
                  tls=m.tls if tls is None else tls, ca_file=ca_file or m.ca_file, cert_file=m.cert_file,
                  key_file=m.key_file, protocol=m.protocol), m.fleet


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
def publish(
    package: Path = typer.Argument(..., help="Model package directory (edgerun.toml and its variant files)."),
    fleet: str = FleetOpt,
    device: str = typer.Option(None, "--device", "-d", help="Release to this device only (a canary)."),
    key: Path = typer.Option(None, "--key", "-k", help="Private key file from `hub keygen` (or EDGERUN_HUB_KEY)."),
    key_id: str = typer.Option(None, "--key-id", help="Key id (default: the key file's name without .key)."),
    url_base: str = typer.Option(None, "--url-base", help="Devices fetch files from URL_BASE/<sha256> over HTTP(S)."),
    blob_dir: Path = typer.Option(None, "--blob-dir", help="Copy files as BLOB_DIR/<sha256> (what --url-base serves)."),
    mqtt_chunks: bool = typer.Option(True, "--mqtt-chunks/--no-mqtt-chunks", help="Also publish retained chunks."),
    chunk_size: int = typer.Option(256 << 10, "--chunk-size", help="Chunk size in bytes."),
    variant: list[str] = typer.Option(None, "--variant", help="Release only these variants (repeatable)."),
    expires_in: float = typer.Option(None, "--expires-in", help="Hours until devices refuse this manifest."),
    config: Path = ConfigOpt, host: str = HostOpt, port: int = PortOpt, username: str = UserOpt,
    password_file: Path = PassFileOpt, tls: bool = TlsOpt, ca_file: Path = CaOpt,
) -> None:
    """Publish a release: the files as retained chunks, then the signed manifest."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgerun.contract import Topics
    from edgerun.hub.publish import publish_release, total_bytes
    from edgerun.mqtt import Connection
    from edgerun.manifest import load_private_key
    from edgerun.package import ModelPackage

    opts, default_fleet = _broker(config, host, port, username, password_file, tls, ca_file)
    fleet = fleet or default_fleet
    key = key or (Path(os.environ["EDGERUN_HUB_KEY"]) if os.environ.get("EDGERUN_HUB_KEY") else None)
    if key is None:
        raise fail("a signing key is needed: --key FILE (from `edgerun hub keygen`) or EDGERUN_HUB_KEY")
    private = load_private_key(key)
    key_id = key_id or key.name.removesuffix(".key")
    pkg = ModelPackage.load(package)
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=expires_in) if expires_in else None
    t0 = time.perf_counter()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err_console, disable=not mqtt_chunks)
    topics = Topics(fleet)
    with Connection(opts, persistent=False) as conn, bar:
        task = bar.add_task(f"{pkg.name} v{pkg.version} chunks", total=total_bytes(pkg, variant or None))
        publish_release(conn, topics, pkg, private, key_id, device=device, chunk_size=chunk_size,
                        url_base=url_base, mqtt=mqtt_chunks, blob_dir=blob_dir, expires=expires,
                        variants=variant or None, progress=lambda n: bar.advance(task, n))
    console.print(f"published {pkg.name} v{pkg.version} to {topics.release(pkg.name, device)} "
                  f"in {time.perf_counter() - t0:.1f}s (signed by {key_id!r})", highlight=False)


@hub_app.command()
def status(
    fleet: str = FleetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config: Path = ConfigOpt, host: str = HostOpt, port: int = PortOpt, username: str = UserOpt,
    password_file: Path = PassFileOpt, tls: bool = TlsOpt, ca_file: Path = CaOpt,
) -> None:
    """The fleet from the devices' retained state and status: online, profile, models, update state."""
    from edgerun.contract import Topics
    from edgerun.hub.fleet import fleet_status
    from edgerun.mqtt import Connection

    opts, default_fleet = _broker(config, host, port, username, password_file, tls, ca_file)
    with Connection(opts, persistent=False) as conn:
        rows = fleet_status(conn, Topics(fleet or default_fleet))
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return
    table = Table(title=f"Fleet {fleet or default_fleet!r}: {len(rows)} device(s)")
    for col in ("device", "online", "profile", "models", "versions", "variant", "backend", "update"):
        table.add_column(col)
    for r in rows:
        u = r.update or {}
        upd = f"{u.get('model')} v{u.get('version')}: {u.get('state')}" if u else "-"
        if u.get("state") == "downloading" and u.get("progress") is not None:
            upd += f" {u['progress']:.0%}"
        if u.get("error"):
            upd += f"\n{u['error'][:80]}"
        online = "-" if r.online is None else ("[green]yes[/]" if r.online else "[red]no[/]")
        table.add_row(r.device, online, r.profile or "-", "\n".join(m["name"] for m in r.models) or "-",
                      "\n".join(str(m.get("version")) for m in r.models) or "-",
                      "\n".join(str(m.get("variant")) for m in r.models) or "-",
                      "\n".join(str(m.get("backend")) for m in r.models) or "-", upd)
    console.print(table)


@hub_app.command()
def retire(
    model: str = typer.Argument(..., help="Model to retire."),
    fleet: str = FleetOpt,
    device: str = typer.Option(None, "--device", "-d", help="Clear only this device's override release."),
    purge_blobs: bool = typer.Option(False, "--purge-blobs", help="Also delete the retired release's chunks."),
    config: Path = ConfigOpt, host: str = HostOpt, port: int = PortOpt, username: str = UserOpt,
    password_file: Path = PassFileOpt, tls: bool = TlsOpt, ca_file: Path = CaOpt,
) -> None:
    """Clear a model's retained release: devices stop serving it (a device release falls back to the fleet's)."""
    from edgerun.contract import Topics
    from edgerun.hub.fleet import retire as do_retire
    from edgerun.mqtt import Connection

    opts, default_fleet = _broker(config, host, port, username, password_file, tls, ca_file)
    with Connection(opts, persistent=False) as conn:
        shas = do_retire(conn, Topics(fleet or default_fleet), model, device=device, purge_blobs=purge_blobs)
    console.print(f"retired {model}" + (f" for device {device}" if device else "")
                  + (f"; deleted {len(shas)} blob(s)" if shas else ""), highlight=False)


@hub_app.command()
def gc(
    fleet: str = FleetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the blobs that would be deleted."),
    config: Path = ConfigOpt, host: str = HostOpt, port: int = PortOpt, username: str = UserOpt,
    password_file: Path = PassFileOpt, tls: bool = TlsOpt, ca_file: Path = CaOpt,
) -> None:
    """Delete retained chunks that no current release refers to (retired and superseded versions)."""
    from edgerun.contract import Topics
    from edgerun.hub.fleet import gc_blobs
    from edgerun.mqtt import Connection

    opts, default_fleet = _broker(config, host, port, username, password_file, tls, ca_file)
    with Connection(opts, persistent=False) as conn:
        orphans = gc_blobs(conn, Topics(fleet or default_fleet), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(orphans)} blob(s)" + "".join(f"\n  {s}" for s in orphans), highlight=False)
