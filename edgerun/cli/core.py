"""Commands about this device: backends, device facts and profile, variant choice, one-shot inference."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgerun.cli.app import app, console, err_console, fail
from edgerun.units import format_size

PackageArg = typer.Argument(..., help="Model package directory, or a bare model file (.onnx, .tflite, OpenVINO .xml).")
ProfileOpt = typer.Option(None, "--profile", "-p", help="Device profile name or TOML file (default: detected).")
BudgetOpt = typer.Option(None, "--memory-budget", "-m", help="Memory budget, e.g. 200MiB or 60% (default: profile).")


def _runtime(profile: str | None = None, memory_budget: str | None = None):
    from edgerun.runtime import Runtime

    return Runtime(profile=profile, memory_budget=memory_budget)


def _version_and_library(version: str | None) -> tuple[str, str]:
    """Split "ai-edge-litert 2.3.0" into the version and the library that provides the backend."""
    if not version:
        return "-", ""
    library, _, bare = version.rpartition(" ")
    return bare, f"via {library}" if library else ""


@app.command()
def backends() -> None:
    """List backend plugins: available or not, version, devices, and how to install the missing ones."""
    rt = _runtime()
    table = Table(title="Backends")
    table.add_column("name / formats", no_wrap=True)
    table.add_column("available", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("devices")
    table.add_column("reason / install")
    for backend, avail in rt.backend_status():
        version, library = _version_and_library(avail.version)
        name = Text(backend.name)
        name.append("\n" + ", ".join(backend.formats), style="dim")
        if avail.available:
            table.add_row(name, Text("yes", style="green"), Text(version), Text(", ".join(backend.devices())),
                          Text(library, style="dim"))
        else:
            note = Text(avail.reason or "")
            if avail.install_hint:
                note.append("\n" + avail.install_hint, style="bold")
            table.add_row(name, Text("no", style="red"), Text(version), "-", note)
    for failure in rt.plugin_failures:
        table.add_row(Text(failure.name), Text("broken", style="red"), "-", "-",
                      Text(f"plugin failed to load: {failure.error}"))
    console.print(table)


device_app = typer.Typer()
app.add_typer(device_app, name="device")


@device_app.callback(invoke_without_command=True)
def device(ctx: typer.Context, profile: str = ProfileOpt) -> None:
    """Show this host's facts, the device profile chosen and why; `edgerun device key` prints its encryption key."""
    if ctx.invoked_subcommand is not None:
        return
    rt = _runtime(profile)
    facts = rt.facts
    table = Table(title="Device facts", show_header=False)
    table.add_column("fact", style="bold")
    table.add_column("value")
    table.add_row("arch", facts.arch)
    table.add_row("cpu", escape(f"{facts.cpu_model} ({facts.cpu_count} usable cores)"))
    interesting = sorted(facts.cpu_flags & {"avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "fma",
                                            "neon", "asimd", "asimddp", "sve", "f16c"})
    table.add_row("cpu features", ", ".join(interesting) or "-")
    table.add_row("board", escape(facts.device_tree_model or "-"))
    table.add_row("memory", f"{format_size(facts.memory_available)} available of {format_size(facts.memory_total)}")
    table.add_row("accelerators", ", ".join(sorted(facts.accelerators)) or "none found")
    for key, value in facts.extra.items():
        table.add_row(escape(key), escape(str(value)))
    console.print(table)
    choice = rt.profile_choice
    p = choice.profile
    console.print(f"[bold]profile:[/] {escape(p.name)} — {escape(p.description)}"
                  + (f"  [dim]({escape(p.source)})[/]" if p.source else ""))
    console.print(f"[bold]why:[/] {escape(choice.why)}")
    console.print(f"[bold]memory budget:[/] {p.memory_budget} = {format_size(rt.memory_budget())}"
                  f"; backend preference: {', '.join(p.prefer) or '(none)'}")
    if choice.considered:
        t2 = Table(title="Profiles considered")
        t2.add_column("profile")
        t2.add_column("matches")
        t2.add_column("specificity", justify="right")
        t2.add_column("reasons")
        for prof, ok, reasons in sorted(choice.considered, key=lambda c: (-c[1], -c[0].specificity)):
            t2.add_row(escape(prof.name), "[green]yes[/]" if ok else "no", str(prof.specificity),
                       escape("; ".join(reasons)))
        console.print(t2)


@device_app.command("key")
def key(config: Path = typer.Option(None, "--config", "-c", help="Config file (default /etc/edgerun/edgerun.toml "
                                                                 "if present)."),
        state_dir: Path = typer.Option(None, "--state-dir", help="The state directory, where the key is made.")) -> None:
    """Print this device's age key (age1...) for the hub: `edgerun hub keys add DEVICE KEY`.

    The key is `device_key_file`, the systemd credential edgerun-device-key, or STATE_DIR/device.key, made now (mode
    0600) when there is none; run this as the service's user. Only the public key is printed.
    """
    from edgerun.config import load_config, with_overrides
    from edgerun.devicekey import DeviceKey

    cfg = with_overrides(load_config(config), state_dir=state_dir)
    device_key = DeviceKey.from_config(cfg)
    recipient = device_key.ensure().recipient
    err_console.print(f"device key {device_key.path} (fingerprint {recipient.fingerprint})", style="dim",
                      markup=False, highlight=False)
    print(recipient)


@app.command()
def explain(package: Path = PackageArg,
            memory_budget: str = BudgetOpt, profile: str = ProfileOpt,
            config: Path = typer.Option(None, "--config", "-c", help="Config file: its state_dir holds the tuning "
                                                                     "cache (default /etc/edgerun/edgerun.toml)."),
            state_dir: Path = typer.Option(None, "--state-dir", help="Where the tuning cache is (default: the "
                                                                     "configuration's state_dir).")) -> None:
    """Show every variant of a package: kept or dropped and why, the hub's figures beside this device's (when it was
    tuned here: `edgerun tune`), and the one that would be loaded."""
    from edgerun.choice import no_fit_error
    from edgerun.config import load_config, with_overrides
    from edgerun.tunecache import TuningCache

    rt = _runtime(profile, memory_budget)
    c = rt.explain(package, memory_budget=memory_budget)
    try:
        cfg = with_overrides(load_config(config), state_dir=state_dir)
        tuned = TuningCache(cfg.state_dir).get(rt, c.package)
    except Exception as exc:  # a config that cannot be read only loses the device's figures
        err_console.print(f"no device figures: {exc}", style="dim", markup=False)
        tuned = None
    console.print(f"[bold]{escape(c.package.name)}[/] v{c.package.version} on profile "
                  f"[bold]{escape(c.profile.name)}[/], memory budget {format_size(c.budget)}")
    if c.package.model_file is not None:
        console.print("bare model file: version 1, no measurements; inputs and outputs read "
                      "from the model; warm-up runs one zero-filled batch of 1 and checks the output names "
                      "(no samples)", style="dim", markup=False)
    pick = tuned.chosen if tuned is not None else None
    unfit = None  # the tuned pick, when this budget drops it (it was tuned under another budget)
    if pick is not None and not any((cand.variant.id, cand.backend) == (pick.variant, pick.backend) and cand.kept
                                    for cand in c.candidates):
        unfit, pick = pick, None
    device: dict[tuple[str, str], object] = {}
    if tuned is not None:
        for t in tuned.candidates:  # each pair's figures at its default options, or at the tuned pick's
            key = (t.variant, t.backend)
            if not t.options or (pick is not None and t == pick):
                if key not in device or t == pick:
                    device[key] = t
    table = Table()
    table.add_column("variant", overflow="fold")
    table.add_column("backend", no_wrap=True)
    fleet = any(cand.by_fleet for cand in c.candidates)
    for col in ("memory\nneed", "accuracy", "fleet\nlatency" if fleet else "hub\nlatency"):
        table.add_column(col, justify="right")
    if tuned is not None:
        table.add_column("device\nlatency", justify="right")
        table.add_column("device\npeak memory", justify="right")
    table.add_column("verdict", overflow="fold")
    for cand in c.candidates:
        serves = (cand.variant.id, cand.backend) == (pick.variant, pick.backend) if pick else cand.chosen
        variant = Text(cand.variant.id, style="bold" if serves else "")
        variant.append(f"\n{cand.variant.format} {cand.variant.precision}", style="dim")
        need = "-" if cand.backend == "-" else format_size(cand.memory_bytes)
        if cand.backend != "-" and not cand.memory_measured:
            need += "\n(estimate)"
        acc = f"{cand.accuracy:.4f}" if cand.accuracy is not None else "-"
        lat = f"{cand.latency_ms:.3f} ms" if cand.latency_ms is not None else "-"
        if cand.fleet is not None:
            lat += f"\nfleet: {cand.fleet.devices} device{'s' if cand.fleet.devices != 1 else ''}" + \
                   (", this CPU" if cand.fleet.cpu_model else "")
        elif cand.by_fleet:
            lat += "\nno fleet figure"
        row = [variant, Text(cand.backend), need, acc, lat]
        if tuned is not None:
            d = device.get((cand.variant.id, cand.backend))
            dl = getattr(d, "latency_ms", None)
            dp = getattr(d, "peak_rss_bytes", None)
            row += [Text(f"{dl:.3f} ms" if dl is not None else ("dropped" if d is not None else "-")),
                    format_size(dp) if dp else "-"]
        if serves and pick is not None:
            verdict = Text("→ chosen (device figures)", style="bold green")
            opts = ", ".join(f"{k}={v}" for k, v in sorted(pick.options.items()))
            if opts:
                verdict.append(f"\n{opts}", style="dim")
        elif serves:
            verdict = Text("→ chosen", style="bold green")
        elif cand.chosen:
            verdict = Text("hub figures' choice", style="default")
        elif cand.kept:
            verdict = Text("kept")
        else:
            verdict = Text("dropped: ", style="red").append(cand.reason, style="default")
        d = device.get((cand.variant.id, cand.backend))
        if d is not None and not getattr(d, "kept", True) and not serves:
            verdict.append(f"\ndropped on this device: {getattr(d, 'reason', '')}", style="red")
        row.append(verdict)
        table.add_row(*row)
    console.print(table)
    if fleet:
        cpus = {cand.fleet.cpu_model for cand in c.candidates if cand.fleet is not None and cand.fleet.cpu_model}
        console.print(f"Latencies are what devices of profile {escape(c.profile.name)}"
                      + (f" with this CPU ({escape(', '.join(sorted(cpus)))})" if cpus else "")
                      + " measured when they tuned the model (the package's fleet figures), not the hub's; "
                        "a candidate without one ties on speed.", style="dim", highlight=False)
    if unfit is not None:
        console.print(f"decided by: the {'fleet' if fleet else 'hub'}'s figures: this device's tuned pick "
                      f"({escape(unfit.variant)} on {escape(unfit.backend)}) does not fit this memory budget",
                      highlight=False)
    elif tuned is not None:
        console.print(f"decided by: this device's figures (tuned {tuned.seconds:.1f}s on {escape(tuned.cpu_model)}"
                      f"{'' if tuned.complete else ', budget ran out'}); `edgerun tune --no-cache` measures again",
                      highlight=False)
    else:
        console.print(f"decided by: the {'fleet' if fleet else 'hub'}'s figures (not tuned on this device; "
                      "`edgerun tune` measures here)", highlight=False)
    if c.chosen is None:
        raise no_fit_error(c.package, c.candidates, c.budget)


@app.command()
def run(package: Path = PackageArg,
        input: list[str] = typer.Option(..., "--input", "-i", help="NAME=file.npy (repeat for each input)."),
        variant: str = typer.Option(None, help="Force a variant id."),
        backend: str = typer.Option(None, help="Force a backend."),
        save: Path = typer.Option(None, help="Write outputs to this .npz file."),
        memory_budget: str = BudgetOpt, profile: str = ProfileOpt) -> None:
    """Run one inference on a package with inputs from .npy files and print the outputs."""
    import numpy as np

    rt = _runtime(profile, memory_budget)
    inputs = {}
    for item in input:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise fail(escape(f"--input expects NAME=file.npy, got {item!r}"), 2)
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise fail(escape(f"cannot read {file}: {exc}"), 66)
    model = rt.load(package, variant=variant, backend=backend)
    console.print(f"{model.name} v{model.version}: {model.variant.id} on {model.backend}", style="dim", markup=False)
    outputs = rt.infer(model.name, inputs)
    with np.printoptions(precision=4, suppress=True, threshold=50):
        for name, arr in outputs.items():
            console.print(f"[bold]{escape(name)}[/] {arr.dtype} {list(arr.shape)}")
            console.print(str(arr), highlight=False, markup=False)
    if save:
        np.savez(save, **outputs)
        console.print(f"saved to {save}", style="dim", markup=False)
    rt.close()
