"""``edgerun hub rollout start | status | list | pause | resume | abort``: staged rollouts with health gates.

Exit codes of ``start`` and ``resume``: 0 the rollout succeeded, 1 it was aborted (its devices rolled back),
75 the command stopped while the rollout goes on (``resume`` picks it up), 65 it could not start.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from edgerun.cli.app import console, hub_app, is_tty
from edgerun.cli.hub_common import Hub, hub_command, signing_key
from edgerun.units import format_duration

if TYPE_CHECKING:
    from edgerun.hub.registry import Registry, RolloutRecord
    from edgerun.hub.rollout import Progress

log = logging.getLogger("edgerun.hub.rollout")
rollout_app = typer.Typer(help="Staged rollouts: canary, steps, bake time, automatic abort and roll-back.",
                          no_args_is_help=True)
hub_app.add_typer(rollout_app, name="rollout")

EX_TEMPFAIL = 75
STATE_STYLE = {"running": "cyan", "paused": "yellow", "aborting": "red", "aborted": "red", "succeeded": "green"}
COLUMNS = ("pending", "updating", "active", "failed", "timed_out", "reverting", "reverted", "kept")


def rollout_summary(registry: "Registry", r: "RolloutRecord") -> str:
    from edgerun.hub.rollout import Progress

    c = Progress(r, registry.rollout_devices(r.id)).counts()
    return ", ".join(f"{c[k]} {k.replace('_', ' ')}" for k in COLUMNS if c.get(k)) or "-"


def progress_table(p: "Progress") -> Table:
    r = p.rollout
    style = STATE_STYLE.get(r.state, "white")
    title = (f"rollout {r.id}: {r.model} v{r.version} [{style}]{r.state}[/] (stage {min(r.stage + 1, p.stages)} of "
             f"{p.stages})")
    caption = r.reason or ""
    if p.problem:
        caption += ("; " if caption else "") + f"registry unavailable, retrying: {p.problem}"
    t = Table(title=title, caption=escape(caption))
    t.add_column("stage")
    for col in COLUMNS:
        t.add_column(col.replace("_", " "), justify="right")
    for stage in range(p.stages):
        c = p.counts(stage)
        label = "canary" if stage == 0 and r.plan.get("canary") else f"{stage + 1}"
        marker = " ←" if stage == r.stage and r.in_progress else ""
        t.add_row(label + marker, *(str(c.get(col, "")) or "" for col in COLUMNS))
    total = p.counts()
    t.add_row("all", *(str(total.get(col, "")) for col in COLUMNS), style="bold")
    return t


class _Show:
    """Progress as a live table on a terminal, as log lines (for journald) otherwise."""

    def __init__(self) -> None:
        self.live = Live(console=console, refresh_per_second=4, transient=False) if is_tty() else None
        self._last = ""

    def __call__(self, p: "Progress") -> None:
        if self.live is not None:
            self.live.update(progress_table(p))
            return
        c = p.counts()
        line = (f"rollout {p.rollout.id} {p.rollout.state}, stage {p.rollout.stage + 1}/{p.stages}: "
                + ", ".join(f"{c[k]} {k}" for k in COLUMNS if c.get(k)))
        if line != self._last:
            self._last = line
            log.info("%s", line)

    def __enter__(self) -> "_Show":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()


def _run(hub: Hub, registry: "Registry", rollout_id: int, *, claim: bool, force: bool = False) -> None:
    """Run a rollout in the foreground until it ends; Ctrl-C or SIGTERM leaves it to ``resume``."""
    from edgerun.hub.rollout import STALE_RUNNER, RolloutRunner, runner_name
    from edgerun.hub.watch import FleetWatch

    me = runner_name()
    if claim:
        registry.claim_rollout(rollout_id, me, stale_after=STALE_RUNNER, force=force)
    r = registry.rollout(rollout_id)
    with FleetWatch(hub.broker, hub.topics, registry, name=f"rollout-{r.model}") as watch:
        show = _Show()
        runner = RolloutRunner(registry, watch, rollout_id, runner=me, on_progress=show)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *a: runner.stop())
        try:
            with show:
                final = runner.run()
        except KeyboardInterrupt:
            final = registry.rollout(rollout_id)
        finally:
            signal.signal(signal.SIGTERM, previous)
    _report(registry, final)


def _report(registry: "Registry", r: "RolloutRecord") -> None:
    from edgerun.hub.rollout import Progress

    console.print(progress_table(Progress(r, registry.rollout_devices(r.id))))
    if r.state == "succeeded":
        console.print(f"rollout {r.id} succeeded: {r.model} v{r.version} ({rollout_summary(registry, r)})",
                      highlight=False)
        return
    if r.state == "aborted":
        console.print(f"[red]rollout {r.id} aborted:[/] {escape(r.reason or '')} ({rollout_summary(registry, r)})")
        raise typer.Exit(1)
    console.print(f"rollout {r.id} is {r.state}; continue it with: edgerun hub rollout resume {r.id}",
                  highlight=False)
    raise typer.Exit(EX_TEMPFAIL)


@rollout_app.command("start")
@hub_command
def start(
    model: str = typer.Argument(..., help="The model to roll out."),
    version: int = typer.Argument(..., help="The version (a release recorded by `hub upload` or `hub publish`)."),
    select: list[str] = typer.Option(None, "--select", "-s", help="Devices to update: tag:NAME=V[,V], profile=P, "
                                                                 "devices=ID[,ID] (patterns allowed) or online; "
                                                                 "repeat to narrow. Default: the whole fleet."),
    canary: int = typer.Option(1, "--canary", help="Devices in the first stage."),
    step: str = typer.Option("25%", "--step", help="Devices per later stage: a count or a share of the selection."),
    bake: str = typer.Option("60s", "--bake", help="Wait this long after a stage before the next one."),
    max_failures: str = typer.Option("10%", "--max-failures",
                                     help="Abort when more of the devices that finished failed, were rejected or "
                                          "timed out (a share, or a count)."),
    min_finished: int = typer.Option(10, "--min-finished",
                                     help="A share in --max-failures is judged once this many devices finished "
                                          "(and always at the end of a stage)."),
    timeout: str = typer.Option("10m", "--timeout", help="A device that is not active within this counts as failed."),
    key: Path = typer.Option(None, "--key", "-k", help="Private key file from `hub keygen` (or EDGERUN_HUB_KEY)."),
    key_id: str = typer.Option(None, "--key-id", help="Key id (default: the key file's name without .key)."),
    *, hub: Hub,
) -> None:
    """Roll a release out stage by stage; abort and roll back when the failures pass the threshold."""
    from edgerun.hub.rollout import Plan, runner_name, start_rollout
    from edgerun.hub.watch import FleetWatch

    plan = Plan.parse(canary=canary, step=step, bake=bake, max_failures=max_failures, timeout=timeout,
                      min_finished=min_finished)
    private, key_id = signing_key(key, key_id)
    registry = hub.registry()
    with FleetWatch(hub.broker, hub.topics, registry, name=f"rollout-{model}") as watch:
        started = start_rollout(registry, watch, private, key_id, model, version, selector=list(select or []),
                                plan=plan, runner=runner_name())
    r = started.rollout
    n = len(registry.rollout_devices(r.id))
    console.print(f"rollout {r.id}: {model} v{version} to {n} device(s) of fleet {hub.fleet!r}; {plan.describe()}",
                  highlight=False)
    for device, why in started.skipped:
        console.print(f"  skipped {device}: {why}", highlight=False)
    _run(hub, registry, r.id, claim=False)


@rollout_app.command("status")
@hub_command
def status(rollout_id: int = typer.Argument(None, help="Rollout id (default: the latest)."),
           devices: bool = typer.Option(False, "--devices", help="Also list every device and its state."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON."), *, hub: Hub) -> None:
    """Where a rollout is: stages, device states, its log."""
    from edgerun.cli.hub_fleet import when
    from edgerun.hub.rollout import Progress, RolloutError, runner_alive

    registry = hub.registry()
    if rollout_id is None:
        latest = registry.rollouts(hub.fleet, limit=1)
        if not latest:
            raise RolloutError(f"fleet {hub.fleet!r} has no rollout yet")
        rollout_id = latest[0].id
    r = registry.rollout(rollout_id)
    devs = registry.rollout_devices(r.id)
    if as_json:
        print(json.dumps({"rollout": r.to_dict(), "devices": [d.to_dict() for d in devs],
                          "log": registry.rollout_log(r.id)}, indent=1))
        return
    console.print(progress_table(Progress(r, devs)))
    alive = "runner " + (f"{r.runner}, alive" if runner_alive(r) else f"{r.runner or '-'}, not running")
    console.print(f"{r.plan} by {r.created_by} at {when(r.created_at)}; {alive if r.in_progress else r.state}",
                  highlight=False)
    if devices:
        t = Table(title="devices")
        for col in ("device", "stage", "state", "before", "took", "detail"):
            t.add_column(col)
        for d in devs:
            took = format_duration(d.finished_at - d.published_at) if d.finished_at and d.published_at else "-"
            t.add_row(d.device, str(d.stage + 1), d.state, f"v{d.before_version}" if d.before_version else "-", took,
                      escape(d.detail[:80]))
        console.print(t)
    for ts, message in registry.rollout_log(r.id)[-15:]:
        console.print(f"{when(ts)}  {escape(message)}")


@rollout_app.command("list")
@hub_command
def list_(model: str = typer.Option(None, "--model", "-m", help="Only this model."), *, hub: Hub) -> None:
    """Rollouts of the fleet, newest first."""
    from edgerun.cli.hub_fleet import when

    registry = hub.registry()
    t = Table(title=f"Rollouts of fleet {hub.fleet!r}")
    for col in ("id", "model", "version", "state", "devices", "started", "by"):
        t.add_column(col)
    for r in registry.rollouts(hub.fleet, model):
        t.add_row(str(r.id), r.model, str(r.version), f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]",
                  rollout_summary(registry, r), when(r.created_at), r.created_by)
    console.print(t)


def _ask(hub: Hub, rollout_id: int, what: str, force: bool) -> None:
    from edgerun.hub.rollout import request, runner_alive

    registry = hub.registry()
    r = request(registry, rollout_id, what)
    if runner_alive(r) and not force:
        deadline = time.monotonic() + 10
        while registry.rollout(rollout_id).request and time.monotonic() < deadline:
            time.sleep(0.2)
        r = registry.rollout(rollout_id)
        console.print(f"rollout {rollout_id} is {r.state} (runner {r.runner})", highlight=False)
        return
    if what == "pause":
        registry.update_rollout(rollout_id, state="paused", request=None, log_message="paused by hand, no runner")
        console.print(f"rollout {rollout_id} is paused", highlight=False)
        return
    console.print(f"no hub runs rollout {rollout_id}: running it here", highlight=False)
    _run(hub, registry, rollout_id, claim=True, force=force)


ForceOpt = typer.Option(False, "--force", help="Take over from a runner that still looks alive.")


@rollout_app.command("pause")
@hub_command
def pause(rollout_id: int = typer.Argument(..., help="Rollout id."), *, hub: Hub) -> None:
    """Start no new stage; devices already updating finish and are still checked against the gate."""
    _ask(hub, rollout_id, "pause", False)


@rollout_app.command("resume")
@hub_command
def resume(rollout_id: int = typer.Argument(..., help="Rollout id."), force: bool = ForceOpt, *, hub: Hub) -> None:
    """Continue a paused rollout, or run one whose hub stopped (after a crash or a restart)."""
    from edgerun.hub.rollout import runner_alive

    registry = hub.registry()
    r = registry.rollout(rollout_id)
    if r.state == "paused" and runner_alive(r) and not force:
        _ask(hub, rollout_id, "resume", force)  # its hub waits for this
        return
    if r.state == "paused":
        registry.update_rollout(rollout_id, request="resume", log_message="resume asked by hand")
    _run(hub, registry, rollout_id, claim=True, force=force)  # refused while another hub runs it


@rollout_app.command("abort")
@hub_command
def abort(rollout_id: int = typer.Argument(..., help="Rollout id."), force: bool = ForceOpt, *, hub: Hub) -> None:
    """Stop a rollout and roll every device it updated back to the version it served before."""
    _ask(hub, rollout_id, "abort", force)


