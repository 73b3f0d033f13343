"""``edgerun hub keys add | list | remove``: the devices' age keys that releases are encrypted to."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from edgerun.cli.app import console, fail, hub_app
from edgerun.cli.hub_common import Hub, hub_command

keys_app = typer.Typer(help="Enrol the devices' age keys that releases are encrypted to (--encrypt-for).",
                       no_args_is_help=True)
hub_app.add_typer(keys_app, name="keys")


@keys_app.command("add")
@hub_command
def add(device: str = typer.Argument(..., help="Device id, or @fleet for a key every device of the fleet holds."),
        recipient: str = typer.Argument(..., help="Its age key, age1... (`edgerun device key` on the device)."), *,
        hub: Hub) -> None:
    """Enrol (or replace) a device's key: `--encrypt-for DEVICE` or `@all` then encrypts to it."""
    from edgerun.contract import valid_name
    from edgerun.crypto import Recipient
    from edgerun.hub.encrypt import FLEET

    if device != FLEET and not valid_name(device):
        raise fail(escape(f"{device!r} is not a device id (letters, digits, '.', '_' or '-') nor {FLEET}"), 2)
    r = Recipient.parse(recipient)
    rec = hub.registry().add_device_key(hub.fleet, device, str(r), r.fingerprint)
    console.print(f"enrolled {rec.device} in fleet {hub.fleet!r}: {rec.recipient} (fingerprint {rec.fingerprint})",
                  highlight=False, markup=False)


@keys_app.command("list")
@hub_command
def list_keys(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."), *,
              hub: Hub) -> None:
    """Every enrolled key, and whether it is the key the device last reported in its status."""
    registry = hub.registry()
    reported = {d.device: (d.status or {}).get("recipient") for d in registry.devices(hub.fleet)}
    rows = registry.device_keys(hub.fleet)

    def check(device: str, recipient: str) -> str:
        got = reported.get(device)
        return "-" if not got else "same" if got == recipient else f"differs: {got}"

    if as_json:
        print(json.dumps([{**k.to_dict(), "reported": check(k.device, k.recipient)} for k in rows], indent=1))
        return
    table = Table(title=f"Device keys of fleet {hub.fleet!r}")
    for col in ("device", "fingerprint", "key", "device reports", "added by", "added"):
        table.add_column(col)
    from edgerun.cli.hub_fleet import when

    for k in rows:
        table.add_row(k.device, k.fingerprint, k.recipient, escape(check(k.device, k.recipient)), k.added_by,
                      when(k.added_at))
    console.print(table)


@keys_app.command("remove")
@hub_command
def remove(device: str = typer.Argument(..., help="Device id, or @fleet."), *, hub: Hub) -> None:
    """Forget a device's key: later releases are not encrypted to it (those already published still open)."""
    if not hub.registry().remove_device_key(hub.fleet, device):
        raise fail(escape(f"no key is enrolled for {device!r} in fleet {hub.fleet!r}"), 66)
    console.print(f"removed the key of {device} from fleet {hub.fleet!r}", highlight=False, markup=False)
