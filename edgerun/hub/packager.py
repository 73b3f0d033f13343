"""Packaging an ONNX model: make the variants, measure each on every backend here, drop the losers, write the package."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.errors import EdgerunError, PackageError
from edgerun.hub import quantize as q
from edgerun.hub.figures import ModelFigures, fleet_info
from edgerun.hub.measure import Measured, measure, time_side_by_side
from edgerun.hub.sources import OnnxFile, conversion_note, example_inputs
from edgerun.hub.tools import (ConverterMissing, MakeJob, PrecisionUnavailable, VariantMaker, missing_tools,
                               model_sources, source_for, variant_makers)
from edgerun.package import (ModelPackage, Measurement, Sample, Validation, Variant, file_entry, precision_rank,
                             save_package)
from edgerun.tensors import TensorSpec

log = logging.getLogger(__name__)

REPORT_FILE = "packaging-report.json"
METRICS = ("auto", "accuracy", "agreement")
SPEED_NOISE = 0.15  # a variant must also be >15% faster to count as faster: smaller gaps flip between runs
TIMING_BUDGET = 0.2  # seconds of side-by-side timing per variant and backend (over all timing processes), at most
TIMING_MAX = 6.0  # and in all
TIMING_ERROR = 0.02  # a timing process stops early once every median is known within 2% (95% interval)
REFERENCE = "onnx-fp32"  # the model as given, which every other variant is judged by (the maker that is ``always``)
REFERENCE_BACKEND = "onnxruntime"


@dataclass
class PackageRequest:
    """What ``edgerun hub package`` was asked to do."""

    model: str | Path  # an .onnx file, or any model a source reads (a path or a module:callable reference)
    name: str
    version: int
    validation: Path
    out: Path
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    formats: tuple[str, ...] | None = None  # None: every format whose tools are installed (default_formats)
    calibration: Path | None = None
    max_accuracy_drop: float = 1.0  # percentage points
    metric: str = "auto"
    prune: float | None = None
    backends: tuple[str, ...] | None = None
    force: bool = False
    samples: int = 2
    repeats: int = 50
    description: str = ""
    targets: tuple[str, ...] | None = None  # CPU classes (x86-vnni, x86, arm64) or profile names; None: all
    emulate: bool = True  # check int8 on the target CPUs this hub can emulate (qemu-user)
    fleet: ModelFigures | None = None  # what devices measured when they tuned the model: into each variant's info


@dataclass
class BackendResult:
    """One (variant, backend) measurement, scored against the labels and the fp32 reference."""

    latency_ms: float | None = None
    memory_bytes: int | None = None
    accuracy: float | None = None
    agreement: float | None = None
    latency_err_ms: float | None = None  # spread over the timing processes (edgerun.hub.measure); None: not timed
    max_deviation: float | None = None
    error: str | None = None


@dataclass
class VariantReport:
    """A variant the packager planned: made or skipped, measured, then kept or dropped, with the reason."""

    id: str
    format: str
    precision: str
    method: str
    files: list[str] = field(default_factory=list)
    status: str = "planned"  # kept | dropped | skipped
    reason: str = ""
    note: str = ""
    size: int = 0
    compressed_size: int = 0
    results: dict[str, BackendResult] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    atol: float = 1e-4
    rtol: float = 1e-3

    def ok_results(self) -> dict[str, BackendResult]:
        return {b: r for b, r in self.results.items() if r.error is None}

    def score(self, metric: str) -> float | None:
        """The worst accuracy (or agreement with fp32) over the backends it ran on."""
        vals = [getattr(r, metric) for r in self.ok_results().values() if getattr(r, metric) is not None]
        return min(vals) if vals else None

    @property
    def precision_rank(self) -> int:
        """Lower is more precise (``edgerun.package.precision_rank``)."""
        return precision_rank(self.precision)


@dataclass
class PackagingReport:
    """Everything the packager decided, for the summary table and ``packaging-report.json``."""

    name: str
    version: int
    out: Path
    metric: str
    weights: str
    backends: list[str]
    variants: list[VariantReport]
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> list[VariantReport]:
        return [v for v in self.variants if v.status == "kept"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["host"] = {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()}
        return d


class Progress:
    """Progress callbacks; the CLI draws a bar, the default does nothing."""

    def total(self, n: int) -> None:
        pass

    def step(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        """Say what is happening without advancing the bar."""


# --- inputs -----------------------------------------------------------------------------------------


def load_dataset(path: Path, inputs: list[TensorSpec], what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays named after the model inputs (row i of each is one example) and optional int ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{what} data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise PackageError(f"{what} data {path}: not a readable .npz file ({exc})") from None
    names = {s.name for s in inputs}
    missing = sorted(names - arrays.keys())
    extra = sorted(arrays.keys() - names - {"labels"})
    if missing or extra:
        parts = ([f"lacks model input(s) {missing}"] if missing else []) + ([f"has unknown array(s) {extra}"] if extra else [])
        raise PackageError(f"{what} data {path}: {'; '.join(parts)}; expected arrays named {sorted(names)} "
                           f"(and optionally 'labels'), found {sorted(arrays)}")
    data: dict[str, np.ndarray] = {}
    for spec in inputs:
        arr = arrays[spec.name]
        want = spec.dtype
        if arr.dtype.kind != want.kind and not (want.kind == "f" and arr.dtype.kind in "iu"):
            raise PackageError(f"{what} data {path}: {spec.name!r} is {arr.dtype}, the model takes {want}")
        expected = f"[N, {', '.join(str(d) if d > 0 else '?' for d in spec.shape[1:])}]"
        if arr.ndim != len(spec.shape) or any(w > 0 and w != g for w, g in zip(spec.shape[1:], arr.shape[1:])):
            raise PackageError(f"{what} data {path}: {spec.name!r} has shape {list(arr.shape)}, the model needs "
                               f"{expected} (N examples along the first axis)")
        data[spec.name] = np.ascontiguousarray(arr.astype(want, copy=False))
    counts = {k: len(v) for k, v in data.items()}
    if len(set(counts.values())) > 1:
        raise PackageError(f"{what} data {path}: inputs have different numbers of examples {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise PackageError(f"{what} data {path}: the {what} set is empty (0 examples)")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != n:
            raise PackageError(f"{what} data {path}: 'labels' must be {n} integer class ids (shape [{n}]), got "
                               f"{labels.dtype} {list(labels.shape)}")
        labels = labels.astype(np.int64)
    return data, labels


def default_formats(makers: list[VariantMaker] | None = None) -> tuple[str, ...]:
    """The formats made when ``--formats`` is not given: every format one of whose makers has its tools here."""
    makers = variant_makers() if makers is None else makers
    return tuple(dict.fromkeys(m.format for m in makers if missing_tools(m) is None))


def known_precisions(makers: list[VariantMaker] | None = None) -> tuple[str, ...]:
    """The precisions some variant maker makes, most precise first."""
    makers = variant_makers() if makers is None else makers
    return tuple(sorted(dict.fromkeys(m.precision for m in makers), key=precision_rank))


def _check_request(req: PackageRequest) -> None:
    if req.fleet is not None and req.fleet.model != req.name:
        raise PackageError(f"the fleet figures are of model {req.fleet.model!r}, not {req.name!r}")
    if req.out.exists() and not req.force:
        raise PackageError(f"{req.out} already exists; choose another --out or pass --force to replace it")
    if not req.name or "/" in req.name or req.name.startswith("."):
        raise PackageError(f"--name: expected a model name without '/', got {req.name!r}")
    if req.version < 1:
        raise PackageError(f"--version: expected a positive integer, got {req.version}")
    makers = variant_makers()
    precisions = known_precisions(makers)
    bad = [p for p in req.precisions if p not in precisions]
    if bad or not req.precisions:
        raise PackageError(f"--precisions: unknown {bad or 'empty list'} (no variant maker makes it); choose from "
                           f"{', '.join(precisions)}")
    if req.formats is not None:
        formats = sorted({m.format for m in makers})
        bad = [f for f in req.formats if f not in formats]
        if bad or not req.formats:
            raise PackageError(f"--formats: unknown {bad or 'empty list'} (no variant maker makes it); choose from "
                               f"{', '.join(formats)}")
        for fmt in req.formats:  # asked for by name: its tools must be here
            reasons = [missing_tools(m) for m in makers if m.format == fmt and m.precision in req.precisions]
            if reasons and all(reasons):
                raise ConverterMissing(f"--formats {fmt}: {reasons[0]}")
    if req.metric not in METRICS:
        raise PackageError(f"--metric: expected one of {', '.join(METRICS)}, got {req.metric!r}")
    if req.prune is not None and not 0 < req.prune < 1:
        raise PackageError(f"--prune: expected a sparsity between 0 and 1 (e.g. 0.5), got {req.prune}")
    if req.max_accuracy_drop < 0:
        raise PackageError(f"--max-accuracy-drop: expected points >= 0, got {req.max_accuracy_drop}")
    try:
        source_for(str(req.model))
    except PackageError:
        accepted = "; ".join(getattr(s, "describe", s.name) for s in model_sources())
        raise PackageError(f"{req.model}: expected an ONNX model (.onnx) or a model the packager converts to ONNX "
                           f"({accepted}); convert other formats to ONNX first") from None


def record_fleet_figures(figs: ModelFigures, kept: list[VariantReport]) -> str:
    """Put what devices measured into each kept variant's ``info.fleet``; what was recorded, as a note."""
    got = []
    for v in kept:
        info = fleet_info(figs, v.id)
        if info:
            v.info["fleet"] = info
            got.append(v.id)
    devices = sum(g.devices for g in figs.profiles)
    if not got:
        return (f"fleet figures of {figs.model} v{figs.version} ({devices} device(s)) name none of the kept "
                f"variants: nothing recorded")
    return (f"fleet figures of {figs.model} v{figs.version} recorded for {', '.join(got)}: "
            f"{devices} device(s) of {', '.join(g.profile for g in figs.profiles)}; devices of those profiles rank "
            f"these variants by them")


def _check_asked_formats(req: PackageRequest, planned: list[VariantReport]) -> None:
    """A format asked for by name (``--formats``) of which no variant could be made is an error, with the reasons."""
    for fmt in req.formats or ():
        mine = [v for v in planned if v.format == fmt]
        if mine and all(v.status == "skipped" for v in mine):
            reasons = "; ".join(dict.fromkeys(v.reason for v in mine))
            raise PackageError(f"--formats {fmt}: no {fmt} variant could be made ({reasons}); leave {fmt} out of "
                               f"--formats to package the model without it")


# --- planning ---------------------------------------------------------------------------------------

def check_targets(targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """CPU classes from ``--targets`` (classes, or device profile names whose CPUs they stand for)."""
    from edgerun.device import CPU_CLASSES
    from edgerun.profiles import load_profiles

    if not targets:
        return CPU_CLASSES
    profiles = load_profiles()
    out: list[str] = []
    for t in targets:
        if t in CPU_CLASSES:
            out.append(t)
        elif t in profiles:
            out.extend(profiles[t].cpu_classes())
        else:
            raise PackageError(f"--targets: {t!r} is neither a CPU class ({', '.join(CPU_CLASSES)}) nor a device "
                               f"profile ({', '.join(sorted(profiles))})")
    return tuple(dict.fromkeys(out))


def plan(req: PackageRequest, makers: list[VariantMaker], options: dict[str, Any]) -> list[tuple[VariantMaker,
                                                                                                  VariantReport]]:
    """The variants to make: every maker of an asked format and precision, the fp32 reference, and the optional
    ones (``--prune``) whose option is set."""
    def wanted(m: VariantMaker) -> bool:
        if m.always:
            return True
        if m.option is not None:
            return options.get(m.option) is not None
        return m.format in (req.formats or ()) and m.precision in req.precisions

    return [(m, VariantReport(m.variant_id(options), m.format, m.precision, m.method)) for m in makers if wanted(m)]


def _compressed_size(paths: list[Path]) -> int:
    return sum(len(zlib.compress(p.read_bytes(), 6)) for p in paths)


# --- the whole job ----------------------------------------------------------------------------------


def package_model(req: PackageRequest, progress: Progress | None = None) -> PackagingReport:
    """Make, measure and choose the variants of ``req.model``; write the package to ``req.out``.

    A model that is not ONNX is converted first, once, by the source that reads it (``edgerun.hub.sources``)."""
    progress = progress or Progress()
    _check_request(req)
    spec = str(req.model)
    source = source_for(spec)
    if isinstance(source, OnnxFile):
        return _package_onnx(replace(req, model=Path(req.model)), progress, None)
    with tempfile.TemporaryDirectory(prefix="edgerun-convert-") as tmp:
        try:
            onnx_path = source.to_onnx(spec, Path(tmp) / "model.onnx", example_inputs(req.validation))
        except EdgerunError:
            raise
        except Exception as exc:  # a plugin's bug still ends in a message naming the source
            log.debug("model source %s failed", source.name, exc_info=True)
            raise PackageError(f"{spec}: model source {source.name!r} failed ({type(exc).__name__}: {exc})") from None
        origin = conversion_note(source, spec, onnx_path)
        log.info("converted %s", origin)
        return _package_onnx(replace(req, model=onnx_path), progress, origin)


def _package_onnx(req: PackageRequest, progress: Progress, origin: str | None) -> PackagingReport:
    """``package_model`` of an ONNX file; ``origin`` says what it was converted from (None: given as ONNX)."""
    model = q.load_onnx(req.model)
    inputs, outputs = q.interface(model)
    profile = q.weight_profile(model)
    val, labels = load_dataset(req.validation, inputs, "validation")
    metric = req.metric
    if metric == "auto":
        metric = "accuracy" if labels is not None else "agreement"
    if metric == "accuracy" and labels is None:
        raise PackageError(f"validation data {req.validation}: --metric accuracy needs an integer array named "
                           f"'labels' (one class id per example); without labels use --metric agreement")
    first = outputs[0]
    if len(first.shape) != 2:
        raise PackageError(f"the model's first output {first.name!r} has shape {list(first.shape)}; accuracy and "
                           f"agreement are top-1 over a [batch, classes] output")
    notes: list[str] = [f"converted from {origin}"] if origin else []
    calibration = None
    if "int8" in req.precisions:
        if req.calibration is not None:
            calibration, _ = load_dataset(req.calibration, inputs, "calibration")
        else:
            calibration = val
            notes.append("no --calibration given: int8 ranges were calibrated on the validation set, which "
                         "flatters int8 accuracy; pass a separate calibration set")
    backends = available_backends(req.backends)
    from edgerun.hub.accuracy import Scorer

    targets = check_targets(req.targets)
    options: dict[str, Any] = {"prune": req.prune, "int8_targets": targets, "emulate": req.emulate,
                               "scorer": Scorer.for_fp32(req.model, val, labels if metric == "accuracy" else None,
                                                         req.max_accuracy_drop / 100.0)}
    makers = variant_makers()
    if req.formats is None:  # the default: every format whose tools are here; say which were left out and why
        formats = default_formats(makers)
        for fmt in dict.fromkeys(m.format for m in makers if m.format not in formats):
            why = next(missing_tools(m) for m in makers if m.format == fmt)
            notes.append(f"{fmt} variants not made: {why}")
    else:
        formats = req.formats
    jobs = plan(replace(req, formats=formats), makers, options)
    planned = [v for _, v in jobs]
    for fmt in formats:
        if not any(fmt in fmts for fmts in backends.values()):
            notes.append(f"no backend available here loads {fmt}: {unmeasurable_reason(fmt)}")
    per_format = {v.format: [b for b, fmts in backends.items() if v.format in fmts] for v in planned}
    progress.total(len(planned) + sum(max(1, len(per_format[v.format])) for v in planned) + 1)

    out = Path(req.out).resolve()  # the measuring children run in another directory
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="edgerun-package-"))
    try:
        for maker, v in jobs:
            progress.step(f"making {v.id}")
            try:
                made = maker.make(MakeJob(req.model, stage, v.id, calibration, val, inputs, outputs, options))
                v.files, v.note, v.info = made.files, made.note, made.info
            except PrecisionUnavailable as exc:
                v.status, v.reason = "skipped", str(exc)
                log.info("skipped %s: %s", v.id, exc)
                continue
            paths = [stage / f for f in v.files]
            v.size = sum(p.stat().st_size for p in paths)
            v.compressed_size = _compressed_size(paths)
        _check_asked_formats(req, planned)
        made = [v for v in planned if v.status == "planned"]
        n_samples = min(req.samples, len(next(iter(val.values()))))
        sample_inputs = [{k: a[i:i + 1] for k, a in val.items()} for i in range(n_samples)]
        staging = ModelPackage(name=req.name, version=req.version, inputs=inputs, outputs=outputs,
                               variants=[Variant(v.id, v.format, v.precision,
                                                 tuple(file_entry(stage, f) for f in v.files)) for v in made],
                               samples=[Sample(s, {}) for s in sample_inputs])
        save_package(staging, stage)
        # skipped variants are not measured: the bar's total drops their measuring steps
        progress.total(len(planned) + sum(max(1, len(per_format[v.format])) for v in made) + 1)
        ref = measure_variants(stage, made, backends, val, labels, work, req.repeats, progress, notes)
        if ref is None:
            errors = "; ".join(f"{b}: {r.error}" for v in made if v.id == REFERENCE for b, r in v.results.items())
            raise PackageError(f"{req.model}: the fp32 model could not be measured "
                               f"({errors or 'no backend could run it'})")
        progress.step("choosing variants")
        _decide(planned, replace(req, formats=formats), metric, primary_backends())
        _check_on_target_cpus(planned, stage, options["scorer"], None if req.emulate else "--no-emulate was given")
        kept = [v for v in planned if v.status == "kept"]
        if req.fleet is not None:
            notes.append(record_fleet_figures(req.fleet, kept))
        for v in planned:
            if v.status != "kept":
                for f in v.files:
                    shutil.rmtree(stage / f, ignore_errors=True) if (stage / f).is_dir() else (stage / f).unlink(
                        missing_ok=True)
                if v.format == "openvino" and (stage / v.id).is_dir():
                    shutil.rmtree(stage / v.id, ignore_errors=True)
        expected = [{k: a for k, a in s.items()} for s in ref.sample_outputs or []]
        pkg = ModelPackage(
            name=req.name, version=req.version, inputs=inputs, outputs=outputs,
            variants=[package_variant(v, stage, metric) for v in kept],
            samples=[Sample(s, e) for s, e in zip(sample_inputs, expected)],
            validation=validation_sample(val, np.argmax(ref.outputs, axis=1)),
            description=req.description or (f"{origin or req.model.name}, packaged by edgerun hub; variants measured "
                                             f"on {platform.machine()} with {_measured_with(kept)}"
                                             + ("; accuracy = top-1 on the validation labels" if metric == "accuracy"
                                                else "; no labels: variants scored by top-1 agreement with fp32")))
        save_package(pkg, stage)
        report = PackagingReport(req.name, req.version, out, metric, profile.describe(), list(backends), planned, notes)
        (stage / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=_json_default))
        for p in (stage, *(p for p in stage.rglob("*") if not p.is_symlink())):  # mkdtemp is 0700: readable by a
            p.chmod(0o755 if p.is_dir() else 0o644)  # service user (DynamicUser), nothing looser, no link followed
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(stage, out)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def measure_variants(stage: Path, variants: list[VariantReport], backends: dict[str, tuple[str, ...]],
                     val: dict[str, np.ndarray], labels: np.ndarray | None, work: Path, repeats: int,
                     progress: Progress | None = None, notes: list[str] | None = None) -> Measured | None:
    """Measure each variant of the package at ``stage`` on every backend that loads its format and score it.

    Fills ``results`` (latency, memory, accuracy, agreement with onnx-fp32) and ``atol``; a variant no backend here
    loads is dropped with the reason. Returns onnx-fp32's measurement (the reference), or None if it did not run.
    """
    progress = progress or Progress()
    inputs_npz = work / "inputs.npz"
    np.savez(inputs_npz, **val)
    raw: dict[tuple[str, str], Measured] = {}
    for v in variants:
        able = [b for b, fmts in backends.items() if v.format in fmts]
        if not able:
            progress.step(f"{v.id}: no backend")
            v.status = "dropped"
            v.reason = (f"no available backend runs format {v.format!r} here, so it could not be measured "
                        f"({unmeasurable_reason(v.format, backends)})")
            continue
        for b in able:
            progress.step(f"measuring {v.id} on {b}")
            m = measure(stage, v.id, b, inputs_npz, work, repeats=repeats)
            raw[(v.id, b)] = m
            v.results[b] = BackendResult(m.latency_ms, m.memory_bytes, error=m.error)
    # latencies side by side: every variant on every backend in one process, interleaved, in several processes
    pairs = [(v.id, b) for v in variants for b in v.ok_results()]
    if pairs:
        progress.note(f"timing {len(pairs)} variant/backend pair(s) side by side")
        timings = time_side_by_side(stage, pairs, inputs_npz, work, budget=min(TIMING_MAX, TIMING_BUDGET * len(pairs)),
                                    rel_error=TIMING_ERROR)
        for v in variants:
            for b, r in v.ok_results().items():
                t = timings.by_pair.get((v.id, b))
                # not timed side by side: its own first estimate stays, without an error, and never counts as faster
                r.latency_ms, r.latency_err_ms = (t.latency_ms, t.error_ms) if t is not None else (r.latency_ms, None)
        if timings.failures and notes is not None:
            notes.append("side-by-side timing: " + "; ".join(timings.failures) + (
                "; latencies are each variant's own first estimate, without an error: no variant counts as faster "
                "than another" if not timings.by_pair else "; the latencies come from the other timing processes"))
    ref = raw.get((REFERENCE, REFERENCE_BACKEND))
    if ref is None or ref.error is not None:
        ref = next((m for (vid, _), m in raw.items() if vid == REFERENCE and m.error is None), None)
    if ref is None or ref.outputs is None:
        return None
    ref_top = np.argmax(ref.outputs, axis=1)
    n = validation_size(val)
    for v in variants:
        sample_agreement = []
        for b, r in v.results.items():
            m = raw[(v.id, b)]
            if r.error is not None or m.outputs is None:
                continue
            top = np.argmax(m.outputs, axis=1)
            r.agreement = round(float(np.mean(top == ref_top)), 4)
            sample_agreement.append(float(np.mean(top[:n] == ref_top[:n])))
            if labels is not None:
                r.accuracy = round(float(np.mean(top == labels)), 4)
            r.max_deviation = _max_deviation(m.sample_outputs or [], ref.sample_outputs or [])
        devs = [r.max_deviation for r in v.ok_results().values() if r.max_deviation is not None]
        if devs:
            v.atol = _round_up(max(1e-4, 3.0 * max(devs)))
        if sample_agreement and v.precision != "fp32":  # what a device compares its own run of the sample with
            v.info["validation"] = {"agreement": round(min(sample_agreement), 4), "samples": n}
        if v.precision in ("int8", "int4"):
            v.info["validated"] = _validated_here(v, labels is not None, len(ref_top)) + v.info.get("validated", [])
    return ref


INT8_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimd", "asimddp",
                        "i8mm", "sve"})


def _validated_here(v: VariantReport, labelled: bool, n: int) -> list[dict[str, Any]]:
    """Where an int8/int4 variant was checked on this hub's CPU: one record per backend it ran on."""
    from edgerun.device import detect
    from edgerun.runtime import Runtime

    host = detect()
    versions = {name: b.check().version for name, b in Runtime().backends.items()}
    return [{"cpu": host.cpu_class, "how": "this hub", "cpu_model": host.cpu_model,
             "features": sorted(host.cpu_flags & INT8_FLAGS), "backend": f"{b} {versions.get(b) or ''}".strip(),
             "metric": "accuracy" if labelled else "agreement",
             "score": r.accuracy if labelled else r.agreement, "samples": n}
            for b, r in v.ok_results().items()]


VALIDATION_EXAMPLES = 64  # carried in the package for a device to check quantized variants with
VALIDATION_BYTES = 256 << 10


def validation_size(val: dict[str, np.ndarray]) -> int:
    """How many validation examples the package carries: up to 64, within 256 KiB of inputs, at least 8."""
    total = len(next(iter(val.values())))
    per_example = max(1, sum(a[:1].nbytes for a in val.values()))
    return min(total, VALIDATION_EXAMPLES, max(8, VALIDATION_BYTES // per_example))


def validation_sample(val: dict[str, np.ndarray], ref_top: np.ndarray) -> Validation:
    n = validation_size(val)
    return Validation({k: np.ascontiguousarray(a[:n]) for k, a in val.items()}, ref_top[:n].astype(np.int64))


def _check_on_target_cpus(variants: list[VariantReport], stage: Path, scorer: Any, skip: str | None) -> None:
    """Kept int8 variants are scored on the target CPU classes this hub emulates, on every backend they are kept
    for; a class this hub cannot emulate (or every class, with ``skip``) is recorded as not checked. A variant that
    loses accuracy on every target is dropped."""
    from edgerun.device import detect
    from edgerun.hub import emulate

    checks = [(v.id, v.info, [b for b in v.ok_results() if b not in (v.info.get("not_for") or {})])
              for v in variants if v.status == "kept" and (v.info.get("int8") or {}).get("targets")]
    if not checks:
        return
    host = detect().cpu_class
    if skip is not None:
        for vid, info, _ in checks:
            info.setdefault("validated", []).extend({"cpu": c, "how": f"not checked: {skip}"}
                                                    for c in info["int8"]["targets"] if c != host)
        return
    notes = emulate.check_targets(stage, checks, scorer, host)
    for v in variants:
        if notes.get(v.id):
            v.note = "; ".join([v.note, *notes[v.id]]) if v.note else "; ".join(notes[v.id])
        if v.id in notes and not v.info["int8"]["targets"]:
            v.status, v.reason = "dropped", "loses accuracy on every target CPU: " + "; ".join(notes[v.id])


def _measured_with(kept: list[VariantReport]) -> str:
    """The backends that measured the variants the package keeps, and on what (only what really ran)."""
    runs: dict[str, list[str]] = {}
    for v in kept:
        for b in v.ok_results():
            runs.setdefault(b, []).append(v.id)
    return "; ".join(f"{b} ({', '.join(ids)})" for b, ids in sorted(runs.items())) or "no backend"


def available_backends(only: tuple[str, ...] | None = None) -> dict[str, tuple[str, ...]]:
    """Available backends here (optionally only those named) and the formats each loads; onnxruntime is required."""
    from edgerun.runtime import Runtime

    rt = Runtime()
    found = {name: b.formats for name, b in rt.backends.items() if b.availability().available}
    if only:
        unknown = [b for b in only if b not in found]
        if unknown:
            raise PackageError(f"--backends: {unknown} not available here; available: {sorted(found)}")
        found = {b: found[b] for b in only}
    if REFERENCE_BACKEND not in found:
        raise PackageError(f"packaging measures against {REFERENCE_BACKEND}, which is not available: "
                           f"{q.HUB_EXTRA_HINT}")
    return found


def primary_backends() -> dict[str, str]:
    """The backend a format's methods are compared on, by format: the one that claims it (``primary_formats``)."""
    from edgerun.runtime import Runtime

    primary: dict[str, str] = {}
    for name, backend in Runtime().backends.items():
        for fmt in getattr(backend, "primary_formats", ()):
            primary.setdefault(fmt, name)
    return primary


def unmeasurable_reason(fmt: str, selected: dict[str, Any] | None = None) -> str:
    """Why no backend measures ``fmt``: each installed backend that loads it is unavailable (with what to install)
    or not among the ``selected`` ones (``--backends``); or no installed backend loads it."""
    from edgerun.runtime import Runtime

    able = [b for b in Runtime().backends.values() if fmt in b.formats]
    if not able:
        return f"no installed backend loads {fmt!r} (a backend plugin brings its formats)"
    why = [f"backend {b.name} {a}" if not (a := b.check()).available else f"backend {b.name} is not among --backends"
           for b in able if selected is None or b.name not in selected]
    return "; ".join(why)


def _max_deviation(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> float | None:
    devs = [float(np.max(np.abs(g[k].astype(np.float64) - w[k].astype(np.float64))))
            for g, w in zip(got, want) for k in w if k in g and w[k].dtype.kind == "f" and g[k].shape == w[k].shape]
    return max(devs) if devs else None


def _round_up(x: float) -> float:
    """Round up to two significant digits (atol margins stay readable in edgerun.toml)."""
    exp = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10**exp) * 10**exp if exp < 0 else float(math.ceil(x))


def _decide(variants: list[VariantReport], req: PackageRequest, metric: str,
            primary: dict[str, str] | None = None) -> None:
    """Apply the drop rules in order; every variant ends kept, dropped or skipped, with the reason. ``primary``
    names the backend each format's methods are compared on (default: the installed backends' claims)."""
    primary = primary_backends() if primary is None else primary
    made = [v for v in variants if v.status == "planned"]
    for v in made:
        if not v.ok_results():
            errors = "; ".join(f"{b}: {r.error}" for b, r in v.results.items())
            v.status, v.reason = "dropped", f"failed on every backend tried ({errors})"
    ref = next((v for v in made if v.id == REFERENCE), None)
    ref_score = ref.score(metric) if ref else None
    bound = req.max_accuracy_drop / 100.0
    live = [v for v in made if v.status == "planned"]
    for v in live:
        s = v.score(metric)
        if ref_score is not None and s is not None and ref_score - s > bound + 1e-9:
            v.status = "dropped"
            v.reason = (f"{metric} {100 * s:.2f}% is {100 * (ref_score - s):.2f} points below fp32's "
                        f"{100 * ref_score:.2f}% (bound {req.max_accuracy_drop:g})")
    # a precision with several methods in one format (int8): keep the one faster on the format's own backend;
    # latencies within their measured errors are a tie, decided by memory
    for fmt, precision in sorted({(v.format, v.precision) for v in made}):
        alts = [v for v in made if v.status == "planned" and v.format == fmt and v.precision == precision
                and v is not ref]
        if len(alts) > 1:
            on = _speed_backends(alts, primary.get(fmt, ""))
            best, why = _fastest(alts, on)
            for v in alts:
                if v is not best:
                    v.status = "dropped"
                    v.reason = f"{best.id} {why} on {', '.join(sorted(on)) or 'the backends tried'} " \
                               f"({_latencies(best)} vs {_latencies(v)})"
    # fp32 is measured as the reference even when not asked for
    asked = req.formats if req.formats is not None else default_formats()
    if ref is not None and ref.status == "planned" and (ref.precision not in req.precisions or ref.format not in asked):
        ref.status, ref.reason = "dropped", "ONNX fp32 not requested (measured as the reference)"
    # best first, so a variant is only ever judged against variants that stay
    contenders = sorted((v for v in made if v.status == "planned"),
                        key=lambda v: (v is not ref, -(v.score(metric) or 0.0), v.precision_rank))
    staying: list[VariantReport] = []
    for v in contenders:
        staying.append(v)
        if v is ref:  # the model as given stays: it is the reference the others are judged by
            continue
        s = v.score(metric)
        for u in staying[:-1]:
            su = u.score(metric)
            if s is None or su is None:
                continue
            # a lower precision scoring above the fp32 model it was made from is noise on the validation set:
            # it has to earn its place by speed like any other
            over_ref = u is ref and v.precision_rank > u.precision_rank
            better = su > s or (su == s and u.precision_rank <= v.precision_rank) or over_ref
            mine = v.ok_results()
            theirs = u.ok_results()
            # a variant stays when it is faster or lighter than every better one somewhere, beyond the errors
            no_gain = all(b in theirs and not _clearly_faster(r, theirs[b]) and not _clearly_lighter(r, theirs[b])
                          for b, r in mine.items())
            if better and no_gain:
                v.status = "dropped"
                than = (f"the {u.precision} model it was made from ({100 * s:.2f}% vs {100 * su:.2f}% is not "
                        f"counted for a lower precision)" if su < s else
                        f"which is as accurate or more ({100 * su:.2f}% vs {100 * s:.2f}%)")
                v.reason = (f"neither faster (beyond the measured error) nor lighter than {u.id}, {than}, on any "
                            f"backend tried ({_latencies(u)} vs {_latencies(v)})")
                staying.pop()
                break
            if better:  # it stays for the backends where it gains; a device does not pick it on the others
                for b, r in mine.items():
                    if b in theirs and not _clearly_faster(r, theirs[b]) and not _clearly_lighter(r, theirs[b]):
                        v.info.setdefault("not_for", {}).setdefault(
                            b, f"neither faster nor lighter than {u.id} on {b} when packaged "
                               f"({_latency(theirs[b])} vs {_latency(r)})")
    for v in made:
        if v.status == "planned":
            v.status, v.reason = "kept", "measured"


def _speed_backends(alts: list[VariantReport], primary: str) -> set[str]:
    """Where to compare alternatives: the format's own backend if all ran there, else every backend all ran on."""
    common = set.intersection(*(set(a.ok_results()) for a in alts))
    return {primary} if primary in common else common


def _clearly_faster(a: BackendResult, b: BackendResult) -> bool:
    """``a`` is faster than ``b`` beyond both measured errors and by more than SPEED_NOISE; anything closer is a tie,
    and so is a latency without an error (not timed side by side): it cannot be told from noise."""
    if a.latency_ms is None or b.latency_ms is None or a.latency_err_ms is None or b.latency_err_ms is None:
        return False
    return (a.latency_ms + a.latency_err_ms < b.latency_ms - b.latency_err_ms
            and a.latency_ms < b.latency_ms * (1 - SPEED_NOISE))


MEMORY_GAIN = 0.2  # a variant needing 20% (and 1 MiB) less memory than another is lighter
MEMORY_NOISE = 1 << 20


def _clearly_lighter(a: BackendResult, b: BackendResult) -> bool:
    """``a`` needs clearly less memory than ``b`` on the same backend (peak RSS moves by a few hundred KiB)."""
    if a.memory_bytes is None or b.memory_bytes is None:
        return False
    return a.memory_bytes < b.memory_bytes * (1 - MEMORY_GAIN) and b.memory_bytes - a.memory_bytes > MEMORY_NOISE


def _fastest(alts: list[VariantReport], on: set[str]) -> tuple[VariantReport, str]:
    """The fastest on ``on``; among those no other is clearly faster than, the one clearly lighter on ``on``, else
    the first in the plan (a tie keeps the same variant from one packaging run to the next)."""
    quickest = min(alts, key=lambda v: (_speed(v, on), v.id))
    tied = [v for v in alts if v is quickest or not all(_clearly_faster(quickest.results[b], v.results[b])
                                                            for b in on if b in v.results and b in quickest.results)]
    if len(tied) == 1:
        return quickest, "is faster"
    for v in tied:
        if all(v is u or any(_clearly_lighter(v.results[b], u.results[b]) for b in on
                             if b in v.results and b in u.results) for u in tied):
            return v, "is as fast (within the measured error or 15%) and needs clearly less memory"
    return tied[0], "is as fast (within the measured error or 15%) and as light, and comes first"


def _speed(v: VariantReport, backends: set[str]) -> float:
    """Mean log latency over ``backends`` (lower is faster)."""
    bs = backends or set(v.ok_results())
    return float(np.mean([math.log(v.results[b].latency_ms) for b in bs])) if bs else float("inf")


def _latency(r: BackendResult) -> str:
    return f"{r.latency_ms:.3g}" + (f" ± {r.latency_err_ms:.2g}" if r.latency_err_ms is not None else "") + " ms"


def _latencies(v: VariantReport) -> str:
    return ", ".join(f"{r.latency_ms:.3g}" + (f" ± {r.latency_err_ms:.2g}" if r.latency_err_ms is not None else "")
                     + f" ms on {b}" for b, r in v.ok_results().items())


def package_variant(v: VariantReport, stage: Path, metric: str) -> Variant:
    """The edgerun.toml record of a measured variant: files, worst accuracy, max memory, per-backend measurements."""
    ok = v.ok_results()
    measured = {b: Measurement(round(r.latency_ms, 4) if r.latency_ms is not None else None, r.memory_bytes,
                               r.accuracy if metric == "accuracy" else None,
                               round(r.latency_err_ms, 4) if r.latency_err_ms is not None else None)
                for b, r in ok.items()}
    mems = [r.memory_bytes for r in ok.values() if r.memory_bytes is not None]
    failed = {b: r.error for b, r in v.results.items() if r.error is not None}
    return Variant(v.id, v.format, v.precision, tuple(file_entry(stage, f) for f in v.files),
                   accuracy=v.score("accuracy") if metric == "accuracy" else None,
                   memory_bytes=max(mems) if mems else None, atol=v.atol, rtol=v.rtol, measured=measured,
                   failed=failed, info=v.info)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)
