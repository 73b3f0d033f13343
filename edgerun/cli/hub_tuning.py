"""``edgerun hub tuning MODEL``: what devices measured when they tuned a model, per profile and CPU model."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgerun.cli.app import console, err_console, fail, hub_app
from edgerun.cli.hub_common import Hub, hub_command
from edgerun.units import format_size

if TYPE_CHECKING:
    from edgerun.hub.figures import CandidateFigures, GroupFigures


@hub_app.command()
@hub_command
def tuning(
    model: str = typer.Argument(..., help="The model."),
    version: int = typer.Option(None, "--version", "-v", help="This version (default: the latest one devices, or the "
                                                              "devices of --profile, tuned)."),
    profile: str = typer.Option(None, "--profile", "-p", help="Only the devices of this profile."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (what `hub package --fleet-figures` reads)."),
    offline: bool = typer.Option(False, "--offline", help="Show the registry only; do not ask the broker."),
    *, hub: Hub,
) -> None:
    """What devices measured when they tuned MODEL, per profile and CPU model: fastest first, the devices' pick marked.

    For each candidate (variant, backend, options): the median of the devices' median latencies and its spread
    (first to third quartile of the devices), peak memory, top-1 agreement with fp32, how many devices measured,
    dropped (and the commonest reason) and picked it. Exits 66 when no device reported figures for it.
    """
    from edgerun.cli.hub_fleet import sync
    from edgerun.hub.figures import figures

    registry = hub.registry()
    problem = None if offline else sync(hub, registry)
    if problem:
        err_console.print(f"[yellow]warning:[/] {escape(problem)}; showing the registry as last seen")
    versions = registry.tuning_versions(hub.fleet, model)
    if not versions:
        raise fail(escape(f"no device of fleet {hub.fleet!r} has reported tuning figures for model {model!r} "
                          f"(devices of contract 1.4 report them once they tuned it)"), 66)
    if version is None:
        versions_here = registry.tuning_versions(hub.fleet, model, profile=profile) if profile else versions
        version = max(versions_here or versions)  # a profile's own latest, when it has one
    elif version not in versions:
        raise fail(escape(f"no device of fleet {hub.fleet!r} has reported tuning figures for {model} v{version}; "
                          f"figures exist for {_versions(versions)}"), 66)
    records = registry.tuning(hub.fleet, model, version, profile=profile)
    if not records:
        known = sorted({r.profile for r in registry.tuning(hub.fleet, model, version)})
        raise fail(escape(f"no device of profile {profile!r} has reported tuning figures for {model} v{version}; "
                          f"profiles with figures: {', '.join(known)}"), 66)
    figs = figures(hub.fleet, model, version, records, versions)
    if as_json:
        print(json.dumps(figs.to_dict(), indent=1))
        return
    console.print(f"[bold]{escape(model)}[/] v{version} in fleet {escape(repr(hub.fleet))}: tuning figures of "
                  f"{len(records)} device(s)" + (f"; other versions: {_versions({v: n for v, n in versions.items() if v != version})}"
                                                 if len(versions) > 1 else ""), highlight=False)
    for g in figs.groups:
        console.print(group_table(g))
    for g in figs.profiles:
        if sum(1 for c in figs.groups if c.profile == g.profile) > 1:
            console.print(group_table(g, every_cpu=True))


def _versions(versions: dict[int, int]) -> str:
    return ", ".join(f"v{v} ({n} device{'s' if n != 1 else ''})" for v, n in sorted(versions.items()))


def group_table(g: "GroupFigures", every_cpu: bool = False) -> Table:
    """One profile and CPU model (``every_cpu``: all of the profile's): a row per candidate, fastest first, the
    devices' pick marked with →; the reasons for dropping a candidate are numbered below the table."""
    from edgerun.hub.figures import NUMBER

    cpu = "all CPU models" if every_cpu else g.cpu_model or "CPU model not reported"
    title = f"{g.profile or '(no profile)'} · {cpu}" + (f" ({g.cpu_class})" if g.cpu_class else "") + \
            f" · {g.devices} device{'s' if g.devices != 1 else ''}"
    if g.incomplete:
        title += f", {g.incomplete} ran out of tuning time"
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, caption_justify="left",
                  pad_edge=False, collapse_padding=True)
    for col, cells in (("  variant", [f"  {c.variant}" for c in g.candidates]),
                       ("backend", [c.backend for c in g.candidates]), ("options", [_options(c) for c in g.candidates])):
        table.add_column(col, no_wrap=True, min_width=max(map(len, [col, *cells])))  # what it is stays readable
    for col in ("latency ms", "p25–p75 ms", "memory", "agreement", "ran", "dropped", "picked"):
        table.add_column(col, justify="right", no_wrap=True)
    reasons: dict[str, tuple[int, str]] = {}  # kind of reason -> its number and an example
    pick = g.pick
    for c in g.candidates:
        dropped = ""
        if c.dropped:
            kind = NUMBER.sub("#", c.drop_reason)
            number = reasons.setdefault(kind, (len(reasons) + 1, c.drop_reason))[0]
            dropped = f"{c.dropped} [{number}]"
        table.add_row(("→ " if c is pick else "  ") + escape(c.variant), escape(c.backend), escape(_options(c)),
                      _latency(c), _spread(c), format_size(c.peak_rss_bytes) if c.peak_rss_bytes is not None else "-",
                      _agreement(c), str(c.measured), dropped, str(c.picked), style="bold" if c is pick else "")
    if reasons:
        table.caption = "\n".join(f"[{n}] {escape(example)}" for n, example in reasons.values())
    return table


def _options(c: "CandidateFigures") -> str:
    from edgerun.hub.figures import options_key

    return options_key(c.options) or "defaults"


def _latency(c: "CandidateFigures") -> str:
    if c.latency_ms is None:
        return "-"
    return f"{c.latency_ms:.3g}"


def _spread(c: "CandidateFigures") -> str:
    if c.latency_p25_ms is None or c.latency_p75_ms is None:
        return "-"
    return f"{c.latency_p25_ms:.3g}–{c.latency_p75_ms:.3g}"


def _agreement(c: "CandidateFigures") -> str:
    if c.agreement is None:
        return "-"
    text = f"{100 * c.agreement:.1f}%"
    if c.agreement_min is not None and c.agreement_min < c.agreement:
        text += f" (min {100 * c.agreement_min:.1f}%)"
    return text
