"""``edgerun tune PACKAGE``: measure a package's candidates on this device and show what it would serve."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from edgerun.cli.app import app, console, err_console
from edgerun.cli.core import BudgetOpt, PackageArg, ProfileOpt
from edgerun.units import format_size


def options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults"


@app.command()
def tune(package: Path = PackageArg,
         budget: float = typer.Option(None, "--budget", "-b", help="Seconds of measuring (default: tuning.budget "
                                                                   "of the configuration, 30)."),
         exhaustive: bool = typer.Option(False, "--exhaustive", help="Measure every combination of options on every "
                                                                      "variant and backend (slow; for comparisons)."),
         use_cache: bool = typer.Option(True, "--cache/--no-cache", help="Show the cached result when its key still "
                                                                         "holds, and save a new one for `edgerun serve`."),
         as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (the status's `tuning` entry)."),
         config: Path = typer.Option(None, "--config", "-c", help="Config file: its state_dir holds the cache, its "
                                                                  "\\[tuning] the budget and timeouts."),
         state_dir: Path = typer.Option(None, "--state-dir", help="Where the tuning cache is (default: the "
                                                                  "configuration's state_dir)."),
         memory_budget: str = BudgetOpt, profile: str = ProfileOpt) -> None:
    """Measure every variant x backend x option setting that fits, on this device, and show which one serves.

    Each candidate runs in a low-priority child process: its latency (median of warm, interleaved runs, with its
    error), its peak memory and its answers on the package's validation sample against fp32. Candidates that crash,
    hang, go over the memory budget or answer wrongly here are dropped with the reason. The pick follows the
    variant choice's rules on these figures; `edgerun serve` loads it from the cache (see docs/tuning.md).

    Exit 0 with a pick; 69 when no candidate could be measured; 65/66 for a bad or missing package.
    """
    from edgerun.config import load_config, with_overrides
    from edgerun.runtime import Runtime
    from edgerun.tune import TuneSettings, Tuner
    from edgerun.tunecache import TuningCache

    cfg = with_overrides(load_config(config), state_dir=state_dir, profile=profile, memory_budget=memory_budget)
    rt = Runtime(profile=cfg.profile, memory_budget=cfg.memory_budget, threads=cfg.threads)
    pkg = rt.open_package(package)
    cache = TuningCache(cfg.state_dir)
    info = cache.get(rt, pkg) if use_cache and not exhaustive else None
    notes: list[str] = []
    if info is not None:
        notes.append(f"from the cache {cache.path(pkg.name, pkg.version)} (tuned {info.seconds:.1f}s; its key holds: "
                     "same files, backends, CPU, threads and profile); --no-cache measures again")
    else:
        settings = TuneSettings(budget=budget or cfg.tuning.budget, candidate_timeout=cfg.tuning.candidate_timeout,
                                exhaustive=exhaustive)
        with Progress(TextColumn("{task.description:<48}"), BarColumn(), TimeElapsedColumn(), console=err_console,
                      transient=True, disable=as_json or not err_console.is_terminal) as progress:
            task = progress.add_task(f"tuning {pkg.name} v{pkg.version}", total=1.0)
            tuner = Tuner(rt, settings, progress=lambda f, msg: progress.update(task, completed=f, description=msg))
            info = tuner.tune(pkg)
        notes += tuner.notes
        if use_cache:
            try:
                notes.append(f"saved to {cache.put(rt, pkg, info)}")
            except OSError as exc:
                notes.append(f"not saved to the cache ({exc}); `edgerun serve` tunes again")
    if as_json:
        print(json.dumps({**info.to_dict(), "notes": notes}, indent=1))
        return
    console.print(f"[bold]{escape(pkg.name)}[/] v{pkg.version} on {escape(info.cpu_model or 'this CPU')} "
                  f"({info.cpu_class}), profile [bold]{escape(info.profile)}[/]: {len(info.candidates)} candidate(s) "
                  f"in {info.seconds:.1f}s" + ("" if info.complete else " [yellow](budget ran out: incomplete)[/]"))
    console.print(candidates_table(info))
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    c, d = info.chosen, info.default
    if c is not None:
        line = f"serves {c.variant} on {c.backend} ({options_text(c.options)})"
        if d is not None and d.latency_ms and c.latency_ms and (d.variant, d.backend, d.options) != \
                (c.variant, c.backend, c.options):
            line += (f": {d.latency_ms / c.latency_ms:.2f}x the default choice's speed ({d.variant} on {d.backend}, "
                     f"{d.latency_ms:.3f} ms)")
        elif d is not None and (d.variant, d.backend, d.options) == (c.variant, c.backend, c.options):
            line += ": the default choice is the fastest here"
        console.print(Text(line, style="bold green"))


def candidates_table(info) -> Table:  # type: ignore[no-untyped-def]
    table = Table()
    table.add_column("variant", overflow="fold")
    table.add_column("backend", no_wrap=True)
    table.add_column("options", overflow="fold")
    for col in ("latency", "peak\nmemory", "agrees\nwith fp32"):
        table.add_column(col, justify="right")
    table.add_column("verdict", overflow="fold")
    chosen = info.chosen
    default = info.default
    for c in sorted(info.candidates, key=lambda c: (not c.kept, c.latency_ms if c.latency_ms is not None else 1e9)):
        is_chosen = chosen is not None and (c.variant, c.backend, c.options) == \
            (chosen.variant, chosen.backend, chosen.options)
        is_default = default is not None and (c.variant, c.backend, c.options) == \
            (default.variant, default.backend, default.options)
        lat = "-" if c.latency_ms is None else f"{c.latency_ms:.3f} ms\n± {c.latency_err_ms or 0:.3f}"
        peak = "-" if c.peak_rss_bytes is None else format_size(c.peak_rss_bytes)
        agree = "-" if c.agreement is None else f"{c.agreement:.0%}"
        if is_chosen:
            verdict = Text("→ chosen", style="bold green")
        elif c.kept:
            verdict = Text("kept")
        else:
            verdict = Text("dropped: ", style="red").append(c.reason, style="default")
        if is_default:
            verdict.append(" (default choice)", style="dim")
        table.add_row(Text(c.variant, style="bold" if is_chosen else ""), c.backend, options_text(c.options), lat,
                      peak, agree, verdict)
    return table
