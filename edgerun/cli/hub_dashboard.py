"""``edgerun hub dashboard``: a live web page of the fleet, served by the hub until Ctrl-C or SIGTERM.

Here ``--host`` and ``--port`` are the page's address; the broker's are ``--broker-host`` and ``--broker-port``
(or the config's ``[mqtt]``), unlike the other hub commands, where ``--host`` names the broker.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

import typer

from edgerun.cli.app import hub_app
from edgerun.cli.hub_common import Hub, hub_command

log = logging.getLogger(__name__)

BROKER_OPTIONS = {
    "host": ("broker_host", typer.Option(None, "--broker-host",
                                         help="MQTT broker host (default: config, else 127.0.0.1).")),
    "port": ("broker_port", typer.Option(None, "--broker-port", help="MQTT broker port (default: config, else 1883).")),
}


def broker_options_renamed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Spell the hub options' broker ``--host``/``--port`` as ``--broker-host``/``--broker-port``."""
    sig = inspect.signature(fn)
    params = [p.replace(name=BROKER_OPTIONS[p.name][0], default=BROKER_OPTIONS[p.name][1])
              if p.name in BROKER_OPTIONS else p for p in sig.parameters.values()]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, (renamed, _) in BROKER_OPTIONS.items():
            kwargs[name] = kwargs.pop(renamed)
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


@hub_app.command("dashboard")
@broker_options_renamed
@hub_command
def dashboard(
    listen_host: str = typer.Option("127.0.0.1", "--host", help="Address the page is served on; beyond loopback "
                                                                "a token is required."),
    listen_port: int = typer.Option(8080, "--port", help="Port the page is served on."),
    token_file: Path = typer.Option(None, "--token-file", help="File holding the bearer token the page and API ask "
                                                               "for (else env EDGERUN_HUB_TOKEN)."),
    *, hub: Hub,
) -> None:
    """Serve a live web page of the fleet: devices, versions, rollouts (pause, resume, abort) and events."""
    from edgerun.hub.dashboard.app import LOOPBACK_HOSTS, make_app
    from edgerun.hub.dashboard.server import bind, check_bind, read_token, serve, url_of
    from edgerun.hub.watch import FleetWatch

    token = read_token(token_file)
    check_bind(listen_host, token)
    sock = bind(listen_host, listen_port)  # before the broker: a busy port fails at once
    try:
        registry = hub.registry()
        # one persistent session per dashboard address: two dashboards of a fleet do not take each other's
        with FleetWatch(hub.broker, hub.topics, registry, name=f"dashboard-{listen_port}") as watch:
            app = make_app(registry, watch, hub.fleet, token,
                           allowed_hosts=None if token else (*LOOPBACK_HOSTS, listen_host))
            url = url_of(sock)

            def started() -> None:
                log.info("dashboard of fleet %r on %s (%d device(s) known; broker %s; registry %s)", hub.fleet, url,
                         len(app.state.feed.rows), hub.broker.address, registry.shown)
                if token:
                    log.info("the page asks for the token once (or open %s?token=... from a trusted machine)", url)

            serve(app, sock, on_started=started)
    finally:
        sock.close()
    log.info("dashboard stopped")
