"""``edgerun service install``: write the systemd unit and a default configuration (docs/service.md).

The unit text here is the one shipped as ``packaging/systemd/edgerun.service`` (a test keeps them equal).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from edgerun.cli.app import app

service_app = typer.Typer(help="Run edgerun as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")

DEFAULT_EXEC = "/usr/local/bin/edgerun"
UNIT_PATH = Path("etc/systemd/system/edgerun.service")
CONFIG_PATH = Path("etc/edgerun/edgerun.toml")

UNIT = """\
# edgerun: serve ML models on this device (docs/service.md).
# Secrets go in /etc/edgerun/secrets.env (mode 0600, read by systemd before privileges drop):
#   EDGERUN_API_TOKEN=...   EDGERUN_MQTT_PASSWORD=...
[Unit]
Description=edgerun model server
Documentation=https://github.com/edgerun/edgerun/blob/main/docs/service.md
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec} serve --config /etc/edgerun/edgerun.toml
ExecReload=/bin/kill -HUP $MAINPID
EnvironmentFile=-/etc/edgerun/secrets.env
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2s
# 78 is a configuration error: restarting cannot fix it
RestartPreventExitStatus=78
# model loads ask for more time with EXTEND_TIMEOUT_USEC
TimeoutStartSec=90s
TimeoutStopSec=60s
WatchdogSec=30s
KillMode=mixed

{user}
StateDirectory=edgerun
StateDirectoryMode=0750
RuntimeDirectory=edgerun
ConfigurationDirectory=edgerun
UMask=0027

# Hardening (systemd-analyze security edgerun)
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
# a core dump would hold decrypted models on disk (docs/protection.md)
LimitCORE=0
# Not set: MemoryDenyWriteExecute (backends JIT-compile kernels). An accelerator needs its device:
# a drop-in with PrivateDevices=no and DeviceAllow=/dev/... (docs/service.md).

[Install]
WantedBy=multi-user.target
"""

DEFAULT_CONFIG = """\
# edgerun configuration (docs/configuration.md).
# EDGERUN_<KEY> / EDGERUN_<SECTION>_<KEY> environment variables override this file; command-line flags
# override both. Check it with `edgerun config check`, see the result with `edgerun config show`.
# Secrets never go here: EDGERUN_API_TOKEN / EDGERUN_MQTT_PASSWORD (e.g. /etc/edgerun/secrets.env) or files.

# state_dir = "/var/lib/edgerun"    # models and update state; systemd's StateDirectory sets it
log_level = "INFO"                  # DEBUG, INFO, WARNING or ERROR; SIGHUP applies a change
# profile = "raspberry-pi-5"        # device profile; detected when not set
# memory_budget = "60%"             # size or share of available memory for models
# threads = 4

[server]
host = "127.0.0.1"                  # a non-loopback address needs an API token
port = 8000
# uds = "/run/edgerun/edgerun.sock"
# token_file = "/etc/edgerun/token"
drain_timeout = 30.0                # seconds in-flight requests get on SIGTERM

[mqtt]
enabled = false                     # fleet updates over MQTT; SIGHUP applies changes
# host = "broker.example.net"
# port = 8883
# tls = true
# fleet = "default"
# username = "device-01"
# trusted_keys = "/etc/edgerun/trusted-keys"

# Models to serve from local package directories; SIGHUP adds, removes and replaces them.
# [[models]]
# path = "/var/lib/edgerun/packages/digits"
"""


def render_unit(exec_path: str = DEFAULT_EXEC, user: str | None = None) -> str:
    """The unit file: ``DynamicUser=yes`` unless a dedicated ``user`` is given."""
    who = f"User={user}\nGroup={user}" if user else "DynamicUser=yes"
    return UNIT.format(exec=exec_path, user=who)


def edgerun_executable() -> str:
    """The ``edgerun`` script of this installation (next to this Python, else on PATH)."""
    import shutil

    beside = Path(sys.executable).parent / "edgerun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("edgerun") or DEFAULT_EXEC


@service_app.command("install")
def install(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files instead of writing them."),
    prefix: Path = typer.Option(Path("/"), "--prefix", help="Root to install under (for images and tests)."),
    user: str = typer.Option(None, "--user", metavar="NAME",
                             help="Run as this existing user instead of a DynamicUser."),
    exec_path: str = typer.Option(None, "--exec", metavar="PATH",
                                  help="The edgerun executable for ExecStart= (default: the one running)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing config file."),
) -> None:
    """Write /etc/systemd/system/edgerun.service and a default /etc/edgerun/edgerun.toml (an existing one is kept).

    Then: systemctl daemon-reload && systemctl enable --now edgerun. Secrets go in /etc/edgerun/secrets.env.
    """
    from edgerun.errors import EdgerunError

    unit = render_unit(exec_path or edgerun_executable(), user)
    unit_path, config_path = prefix / UNIT_PATH, prefix / CONFIG_PATH
    if dry_run:
        typer.echo(f"# --- {unit_path} ---\n{unit}\n# --- {config_path} ---\n{DEFAULT_CONFIG}", nl=False)
        return
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        _write(unit_path, unit, 0o644)
        typer.echo(f"wrote {unit_path}")
        if config_path.exists() and not force:
            typer.echo(f"kept {config_path} (exists; --force to overwrite)")
        else:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            _write(config_path, DEFAULT_CONFIG, 0o644)
            typer.echo(f"wrote {config_path}")
    except OSError as exc:
        raise EdgerunError(f"cannot install the service: {exc}") from None
    if prefix == Path("/"):
        typer.echo("next: systemctl daemon-reload && systemctl enable --now edgerun")


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)
