"""``edgerun hub package``: make, measure and choose a model's variants and write the package."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from typer.core import TyperCommand
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgerun.cli.app import console, fail, hub_app
from edgerun.units import format_size

if TYPE_CHECKING:
    from edgerun.hub.packager import PackagingReport

REQUIRED = ("onnx", "onnxruntime")
SOURCE_HELP = ("The fp32 model: an ONNX file (.onnx); a PyTorch module as module:callable (pkg.models:make_net, "
               "importable from the current directory or PYTHONPATH; an nn.Module, an nn.Module class or a function "
               "returning one), an ExportedProgram (.pt2, torch.export.save) or a TorchScript file (.pt/.pth, "
               "torch.jit.save), with edgerun\\[hub-torch]; a TensorFlow SavedModel directory (serving_default "
               "signature) or a Keras file (.keras, .h5), with edgerun\\[hub-tf]; or a kind a hub plugin adds.")


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class _Bar:
    def __init__(self, progress: Progress):
        self._p = progress
        self._task = progress.add_task("packaging", total=None)

    def total(self, n: int) -> None:
        self._p.update(self._task, total=n)

    def step(self, message: str) -> None:
        self._p.update(self._task, advance=1, description=message)

    def note(self, message: str) -> None:
        self._p.update(self._task, description=message)


class _PackageCommand(TyperCommand):
    """``hub package``, whose --help lists the formats and precisions the installed makers provide (looked up when
    the help is shown, not at every start of the command line)."""

    def format_help(self, ctx, formatter):  # type: ignore[no-untyped-def]
        from edgerun.hub.packager import default_formats, known_precisions
        from edgerun.hub.tools import variant_makers

        makers = variant_makers()
        formats = list(dict.fromkeys(m.format for m in makers))
        for param in self.params:
            if param.name == "formats":
                param.help = (f"Comma list of {', '.join(formats)} (what the installed variant makers make). "
                              f"Default: {', '.join(default_formats(makers)) or 'none'}, the formats whose tools are "
                              f"installed here; a format named here that cannot be made is an error.")
            elif param.name == "precisions":
                param.help = f"Comma list of {', '.join(known_precisions(makers))}."
        return super().format_help(ctx, formatter)


@hub_app.command("package", cls=_PackageCommand)
def package(
    source: str = typer.Argument(..., metavar="SOURCE", help=SOURCE_HELP, show_default=False),
    name: str = typer.Option(..., "--name", help="Model name in the package."),
    version: int = typer.Option(..., "--version", help="Package version (positive integer)."),
    validation: Path = typer.Option(..., "--validation", help=".npz: arrays named after the model inputs, plus 'labels'."),
    out: Path = typer.Option(..., "--out", help="Package directory to write (must not exist unless --force)."),
    precisions: str = typer.Option("fp32,fp16,int8", "--precisions", help="Comma list of precisions."),
    calibration: Path = typer.Option(None, "--calibration", help=".npz like --validation, for int8 ranges (default: the validation set)."),
    formats: str = typer.Option(None, "--formats", help="Comma list of formats.", show_default=False),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Drop variants more than this many points below fp32."),
    metric: str = typer.Option("auto", "--metric", help="accuracy (needs labels), agreement (top-1 agreement with fp32) or auto."),
    prune: float = typer.Option(None, "--prune", help="Also make a magnitude-pruned fp32 variant at this sparsity (e.g. 0.5)."),
    backends: str = typer.Option(None, "--backends", help="Measure only on these backends (default: every available one)."),
    repeats: int = typer.Option(50, "--repeats", help="Batch-1 runs of each variant's first latency estimate, in its "
                                                      "own process; the latencies recorded are timed side by side."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    targets: str = typer.Option(None, "--targets", help="CPUs the int8 variants are made for: x86-vnni, x86, arm64 or "
                                                        "device profile names (default: all of them)."),
    emulate: bool = typer.Option(True, "--emulate/--no-emulate", help="Check int8 variants on emulated target CPUs "
                                                                      "(qemu-user) where this hub's CPU differs."),
    encrypt_for: list[str] = typer.Option(None, "--encrypt-for", help="Encrypt the kept variants to these keys "
                                          "(repeatable): an age1... key, or a device id, @fleet or @all enrolled "
                                          "with `edgerun hub keys add`; the package then holds no clear model."),
    fleet: str = typer.Option(None, "--fleet", "-f", help="The fleet whose enrolled keys --encrypt-for names, and "
                                                          "whose figures --fleet-figures registry reads (default: "
                                                          "config, else 'default')."),
    db: str = typer.Option(None, "--db", help="Registry database URL, for --encrypt-for names and --fleet-figures "
                                              "registry (default: EDGERUN_HUB_DB, else ~/.local/share/edgerun/hub.db)."),
    fleet_figures: str = typer.Option(None, "--fleet-figures", metavar="FILE|registry",
                                      help="Record what devices measured when they tuned this model, per profile and "
                                           "CPU model, in each variant's info.fleet; a device of such a profile ranks "
                                           "the variants by them. FILE: what `edgerun hub tuning MODEL --json` "
                                           "wrote; registry: the registry's figures (--fleet, --db) of the latest "
                                           "version of --name that devices tuned."),
) -> None:
    """Make fp16/int8/int4 ONNX, OpenVINO IR and TFLite variants of a model, measure each, keep those worth shipping.

    SOURCE is an ONNX file, or a PyTorch or TensorFlow model that is converted to ONNX first by its framework's own
    exporter (torch.onnx.export, tf2onnx); see docs/packaging.md, "What it takes".
    """
    from edgerun.errors import EdgerunError

    missing = [m for m in REQUIRED if not _importable(m)]
    if missing:
        raise fail(escape(f"edgerun hub package needs {', '.join(missing)}: pip install 'edgerun[hub]'"), 69)
    from edgerun.hub.packager import PackageRequest, package_model

    recipients = _recipients(encrypt_for, fleet, db) if encrypt_for else None  # a bad name fails before packaging
    try:
        figures = _fleet_figures(fleet_figures, name, fleet, db) if fleet_figures else None
    except EdgerunError as exc:
        raise fail(escape(str(exc)), exc.exit_code) from None

    req = PackageRequest(model=source, name=name, version=version, validation=validation, out=out,
                         precisions=_split(precisions) or (), formats=_split(formats), calibration=calibration,
                         max_accuracy_drop=max_accuracy_drop, metric=metric, prune=prune, backends=_split(backends),
                         force=force, repeats=repeats, targets=_split(targets), emulate=emulate, fleet=figures)
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        try:
            report = package_model(req, _Bar(progress))
        except EdgerunError as exc:  # printed here: messages hold brackets ([N, 64], edgerun[hub]) that are not markup
            raise fail(escape(str(exc)), exc.exit_code) from None
    console.print(summary_table(report))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if recipients:
        from edgerun.hub.encrypt import encrypt_package
        from edgerun.package import ModelPackage

        done = encrypt_package(ModelPackage.load(report.out), recipients, report.out)
        console.print(f"encrypted {len(done.variants)} variant(s) to {len(recipients)} key(s) "
                      f"({', '.join(sorted(r.fingerprint for r in recipients))}); no clear model file is left in "
                      f"{report.out}", highlight=False, markup=False)
    console.print(f"[bold green]wrote[/] {report.out} ({len(report.kept)} variant(s)); details in "
                  f"{report.out / 'packaging-report.json'}")


def _fleet_figures(source: str, model: str, fleet: str | None, db: str | None):
    """The fleet figures --fleet-figures names: a file `hub tuning --json` wrote, or the registry's."""
    from edgerun.hub.figures import FiguresError, ModelFigures

    if source != "registry":
        return ModelFigures.load(Path(source))
    from edgerun.config import load_config
    from edgerun.hub.figures import figures
    from edgerun.hub.registry import Registry

    fleet = fleet or load_config(None).mqtt.fleet
    with Registry(db) as registry:
        versions = registry.tuning_versions(fleet, model)
        if not versions:
            raise FiguresError(f"--fleet-figures registry: no device of fleet {fleet!r} has reported tuning figures "
                               f"for model {model!r} in registry {registry.shown}")
        version = max(versions)
        return figures(fleet, model, version, registry.tuning(fleet, model, version), versions)


def _recipients(specs: list[str], fleet: str | None, db: str | None) -> list:
    """The keys --encrypt-for names; the registry is opened only for names that are not age1... keys."""
    from edgerun.config import load_config
    from edgerun.hub.encrypt import resolve

    registry = None
    if any(not s.strip().startswith("age1") for s in specs):
        from edgerun.hub.registry import Registry

        registry = Registry(db)
    return resolve(specs, registry, fleet or load_config(None).mqtt.fleet)


def summary_table(report: PackagingReport) -> Table:
    """One row per planned variant: size, score, latency and memory per backend, and the verdict."""
    metric = "accuracy" if report.metric == "accuracy" else "agreement w/ fp32"
    table = Table(title=f"{report.name} v{report.version} — {report.weights}")
    for col in ("variant", "precision", "size", "zlib size", metric, "latency (1 thread, batch 1)", "peak memory",
                "verdict"):
        table.add_column(col, justify="right" if col in ("size", "zlib size", metric) else "left")
    shown_skips: set[tuple[str, str]] = set()
    for v in report.variants:
        if v.status == "skipped" and v.format == "tflite":
            if (v.format, v.reason) in shown_skips:
                continue
            shown_skips.add((v.format, v.reason))
            precs = ", ".join(x.precision for x in report.variants if x.format == v.format and x.reason == v.reason)
            table.add_row(f"{v.format}-*", precs, "-", "-", "-", "-", "-", f"[yellow]skipped:[/] {escape(v.reason)}")
            continue
        ok = v.ok_results()
        score = v.score(report.metric)
        lat = "\n".join(f"{r.latency_ms:.3f} ms {b}" for b, r in ok.items()) or "-"
        mem = "\n".join(f"{format_size(r.memory_bytes)} {b}" for b, r in ok.items()) or "-"
        verdict = {"kept": "[green]kept[/]", "dropped": "[red]dropped:[/] ", "skipped": "[yellow]skipped:[/] "}[v.status]
        if v.status != "kept":
            verdict += escape(v.reason)
        if v.note:
            verdict += f" ({escape(v.note)})"
        if not v.reason.startswith("failed on every backend"):
            verdict += "".join(f" (failed on {b}: {escape(r.error)})" for b, r in v.results.items() if r.error)
        table.add_row(v.id, v.precision, format_size(v.size) if v.size else "-",
                      format_size(v.compressed_size) if v.size else "-",
                      f"{100 * score:.2f}%" if score is not None else "-", lat, mem, verdict)
    return table
