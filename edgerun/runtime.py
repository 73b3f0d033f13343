"""The in-process runtime: load packages on the chosen variant and backend, run inference, swap versions."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import psutil

from edgerun import bare
from edgerun import choice as choice_mod
from edgerun.backend import Availability, Backend, LoadOptions, Session
from edgerun.contract import TuningInfo
from edgerun.device import DeviceFacts, detect, refresh_memory
from edgerun.devicekey import DeviceKey
from edgerun.errors import (BackendUnavailable, EdgerunError, InvalidInput, ModelLoadError, ModelNotFound,
                            ModelNotReady, PackageError, Retired, VariantRejected)
from edgerun.package import ModelPackage, Variant
from edgerun.plugins import PluginFailure, call_each, make_plugin_manager
from edgerun.profiles import Profile, ProfileChoice, choose_profile
from edgerun.protect import MemoryModel
from edgerun.tensors import TensorSpec
from edgerun.units import format_size, parse_budget

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """The outcome of variant choice for one package: every candidate and the winner."""

    package: ModelPackage
    profile: Profile
    budget: int
    candidates: list[choice_mod.Candidate]
    chosen: choice_mod.Candidate | None


class LoadedModel:
    """One version of a model loaded on a backend; safe to run from many threads."""

    def __init__(self, package: ModelPackage, variant: Variant, backend: str, session: Session,
                 memory_bytes: int, load_seconds: float):
        self.package = package
        self.variant = variant
        self.backend = backend
        self.session = session
        self.memory_bytes = memory_bytes
        self.load_seconds = load_seconds
        self.loaded_at = time.time()
        self.validation: dict[str, Any] | None = None  # agreement with fp32 on the package's validation sample
        self.options: dict[str, Any] = {}  # what tuning set over the profile's options (threads, hints...)
        # a row's run time in a batch of BATCH_PROBE_ROWS over its time alone, measured at warm-up (None: not measured)
        self.batch_cost: float | None = None
        self.inputs: list[TensorSpec] = list(package.inputs)
        self.outputs: list[TensorSpec] = list(package.outputs)
        # (name, dtype, shape, rank, fixed dims as (axis, size)): what check_inputs compares on the hot path
        self._specs = [(s.name, s.dtype, s.shape, len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if d >= 0))
                       for s in self.inputs]
        self._input_names = frozenset(s.name for s in self.inputs)
        text_only = getattr(session, "text_only", False)
        self._text_inputs = [s.name for s in self.inputs if s.datatype == "BYTES"] if text_only else []
        self._output_names = frozenset(s.name for s in self.outputs)
        # In-flight accounting without a lock on the hot path: a run appends to _active and then reads
        # _retiring; retire() sets _retiring and then reads _active. deque.append/pop are atomic, so either
        # the run sees the flag (and backs out) or retire() sees the run (and the run's exit closes).
        self._active: deque[None] = deque()
        self._retiring = False
        self._lock = threading.Lock()  # guards _closed: close happens once
        self._closed = False
        self._drained = threading.Event()

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> int:
        return self.package.version

    @property
    def batching_pays(self) -> bool | None:
        """Whether stacking requests saves compute on this host (a row in a batch costs at most BATCH_PAYS of its
        time alone); None when not measured."""
        return None if self.batch_cost is None else self.batch_cost <= BATCH_PAYS

    @property
    def inflight(self) -> int:
        return len(self._active)

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Inputs as arrays of the model's dtypes and shapes, or InvalidInput naming what is wrong."""
        if inputs.keys() != self._input_names:
            missing = sorted(self._input_names - inputs.keys())
            extra = sorted(inputs.keys() - self._input_names)
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if extra:
                parts.append(f"unknown input(s) {extra}")
            raise InvalidInput(f"model {self.name!r}: {'; '.join(parts)}; expected {sorted(self._input_names)}")
        out = {}
        for name, dtype, shape, rank, fixed in self._specs:
            arr = inputs[name]
            if type(arr) is not np.ndarray:
                try:
                    arr = np.asarray(arr, dtype=dtype)
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(f"input {name!r}: cannot convert to {dtype}: {exc}") from None
            elif arr.dtype != dtype:
                raise InvalidInput(f"input {name!r}: dtype {arr.dtype}, model expects {dtype}")
            got = arr.shape
            bad = len(got) != rank
            if not bad:
                for axis, size in fixed:
                    if got[axis] != size:
                        bad = True
                        break
            if bad:
                raise InvalidInput(f"input {name!r}: shape {list(got)}, model expects {list(shape)} (-1 = any)")
            out[name] = arr
        for name in self._text_inputs:
            out[name] = self._as_text(name, out[name])
        return out

    def _as_text(self, name: str, arr: np.ndarray) -> np.ndarray:
        """A BYTES input with every element as str, for a backend whose string tensors hold UTF-8 text only."""
        if all(type(x) is str for x in arr.flat):
            return arr
        text = np.empty(arr.shape, dtype=object)
        for i, x in enumerate(arr.flat):
            try:
                text.flat[i] = x.decode("utf-8") if isinstance(x, bytes) else str(x)
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name!r}: element {i} is not UTF-8 text; {self.backend}'s string tensors "
                                   "hold text only") from None
        return text

    def select_outputs(self, outputs: Iterable[str] | None) -> list[str] | None:
        """The outputs asked for, checked before anything runs (None or empty: all of them)."""
        if not outputs:
            return None
        wanted = list(outputs)
        unknown = [o for o in wanted if o not in self._output_names]
        if unknown:
            named = f"output {unknown[0]!r}" if len(unknown) == 1 else f"outputs {unknown}"
            raise InvalidInput(f"model {self.name!r} has no {named}; its outputs are {sorted(self._output_names)}")
        if len(set(wanted)) != len(wanted):
            raise InvalidInput(f"output(s) {sorted({o for o in wanted if wanted.count(o) > 1})} asked for more "
                               "than once")
        return wanted

    def run(self, inputs: Mapping[str, Any], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Validate and run; requests that started before a swap finish on this session."""
        wanted = self.select_outputs(outputs)
        result = self.run_unchecked(self.check_inputs(inputs))
        return result if wanted is None else {k: result[k] for k in wanted}

    def run_unchecked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run inputs already checked with ``check_inputs`` (the server's batching path)."""
        active = self._active
        active.append(None)
        try:
            if self._retiring:
                raise Retired(f"model {self.name!r} version {self.version} was replaced or unloaded; "
                               "look the model up again")
            return self.session.run(inputs)
        finally:
            active.pop()
            if self._retiring and not active:
                self._close()

    def retire(self) -> None:
        """Take no new runs; close once the runs in flight are done (at once if there are none)."""
        self._retiring = True
        if not self._active:
            self._close()

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._drained.wait(timeout)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.session.close()
        finally:
            self._drained.set()
            log.info("closed %s v%d (%s on %s)", self.name, self.version, self.variant.id, self.backend)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "variant": self.variant.id, "backend": self.backend,
                "format": self.variant.format, "precision": self.variant.precision,
                "sha256": self.variant.main_file.sha256, "memory_bytes": self.memory_bytes,
                "device": self.session.device, "validation": self.validation, "options": dict(self.options)}


@dataclass
class _Slot:
    versions: dict[int, LoadedModel] = field(default_factory=dict)
    latest: LoadedModel | None = None


class Runtime:
    """Loads model packages and runs inference in-process, with the same variant choice as the server.

    >>> rt = Runtime()
    >>> rt.load("examples/digits")                        # doctest: +SKIP
    >>> rt.infer("digits", {"input": x})["probabilities"]  # doctest: +SKIP
    """

    def __init__(self, *, profile: str | Profile | None = None, memory_budget: str | int | None = None,
                 threads: int | None = None, load_plugins: bool = True, plugin_manager: Any = None,
                 device_key: DeviceKey | str | Path | None = None):
        """``device_key``: what opens encrypted variants: a DeviceKey, or an age identity file; by default
        ``EDGERUN_DEVICE_KEY_FILE``, the systemd credential, or ``device.key`` in the default state directory."""
        if plugin_manager is None:
            self.pm, self.plugin_failures = make_plugin_manager(load_entry_points=load_plugins)
        else:
            self.pm, self.plugin_failures = plugin_manager, []
        self._profile_arg = profile
        self._memory_budget = memory_budget
        self._threads = threads
        self._facts: DeviceFacts | None = None
        self._profile_choice: ProfileChoice | None = None
        self._backends: dict[str, Backend] | None = None
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.RLock()
        # (model, version, variant, backend) -> why the variant failed the package's validation sample here
        self.rejected: dict[tuple[str, int, str, str], str] = {}
        self.tuned: dict[str, TuningInfo] = {}  # model -> what this device measured when it tuned the version serving
        if device_key is None:
            device_key = DeviceKey.default()
        self.device_key = device_key if isinstance(device_key, DeviceKey) else DeviceKey(Path(device_key))

    # --- host, profile, backends -------------------------------------------------------------

    @property
    def facts(self) -> DeviceFacts:
        if self._facts is None:
            self._facts = detect(self.pm)
        return self._facts

    @property
    def profile_choice(self) -> ProfileChoice:
        if self._profile_choice is None:
            if isinstance(self._profile_arg, Profile):
                self._profile_choice = ProfileChoice(self._profile_arg, "given by the caller", [])
            else:
                self._profile_choice = choose_profile(self.facts, self._profile_arg)
        return self._profile_choice

    @property
    def profile(self) -> Profile:
        return self.profile_choice.profile

    @property
    def backends(self) -> dict[str, Backend]:
        """Every registered backend by name, available or not."""
        if self._backends is None:
            classes: list[type[Backend]] = []
            _, failures = call_each(self.pm, "register_backends", register=classes.append)
            self.plugin_failures.extend(failures)
            backends: dict[str, Backend] = {}
            for cls in classes:
                try:
                    backends[cls.name] = cls()
                except Exception as exc:  # a broken plugin class must not break the runtime
                    log.warning("backend %s failed to initialise: %s", getattr(cls, "name", cls), exc)
                    self.plugin_failures.append(PluginFailure(getattr(cls, "name", repr(cls)), str(exc)))
            self._backends = backends
        return self._backends

    def backend_status(self) -> list[tuple[Backend, Availability]]:
        return [(b, b.check()) for b in self.backends.values()]

    def memory_budget(self) -> int:
        """The budget in bytes right now (a percentage follows MemAvailable)."""
        available = refresh_memory(self.facts).memory_available
        spec = self._memory_budget if self._memory_budget is not None else self.profile.memory_budget
        try:
            return parse_budget(spec, available)
        except ValueError as exc:
            raise EdgerunError(f"memory budget: {exc}") from None

    # --- choice and loading ----------------------------------------------------------------

    def open_package(self, package: str | Path | ModelPackage) -> ModelPackage:
        """A package as given, read from its directory (or edgerun.toml), or built from a bare model file."""
        if isinstance(package, ModelPackage):
            return package
        path = Path(package)
        if bare.is_model_file(path, self.backends):
            return bare.from_model_file(path, self.backends, self.profile.prefer)
        return ModelPackage.load(path)

    def explain(self, package: str | Path | ModelPackage, *, memory_budget: str | int | None = None) -> Choice:
        """Every candidate variant/backend, kept or dropped with the reason, and the winner."""
        pkg = self.open_package(package)
        if memory_budget is not None:
            try:
                budget = parse_budget(memory_budget, refresh_memory(self.facts).memory_available)
            except ValueError as exc:
                raise EdgerunError(f"memory budget: {exc}") from None
        else:
            budget = self.memory_budget()
        keys: frozenset[str] | str = frozenset()
        if any(v.encrypted for v in pkg.variants):
            keys = self.device_key.problem() or self.device_key.fingerprints()
        cands = choice_mod.candidates(pkg, self.profile, self.backends, budget, self.facts.cpu_class, keys)
        for c in cands:
            why = self.rejected.get((pkg.name, pkg.version, c.variant.id, c.backend))
            if why is not None and c.kept:
                c.kept, c.reason = False, f"failed this device's validation: {why}"
        chosen = self.pm.hook.choose_variant(package=pkg, profile=self.profile, candidates=cands)
        if chosen is not None:
            chosen.chosen = True
        if log.isEnabledFor(logging.DEBUG):
            for c in cands:
                log.debug("%s v%d: %s on %s needs %s%s: %s%s", pkg.name, pkg.version, c.variant.id, c.backend,
                          format_size(c.memory_bytes), "" if c.memory_measured else " (estimated)",
                          "kept" if c.kept else "dropped", f" ({c.reason})" if c.reason else "")
        return Choice(pkg, self.profile, budget, cands, chosen)

    def prepare(self, package: str | Path | ModelPackage, *, variant: str | None = None,
                backend: str | None = None, verify: bool = True, warmup: bool = True,
                memory_budget: str | int | None = None, options: Mapping[str, Any] | None = None) -> LoadedModel:
        """Load and warm up a package without serving it yet (the first half of a swap).

        A quantized variant that fails the package's validation sample here is set aside (``explain`` shows why)
        and the next choice is loaded, when its files are present; otherwise VariantRejected is raised.
        ``options`` (what tuning picked: ``threads`` and the backend's own options) go over the profile's.
        """
        pkg = self.open_package(package)
        while True:
            choice = self.explain(pkg, memory_budget=memory_budget)
            cand = self._pick(choice, variant, backend)
            try:
                return self._load(pkg, cand, verify=verify, warmup=warmup, options=options)
            except VariantRejected as exc:
                self.rejected[(pkg.name, pkg.version, cand.variant.id, cand.backend)] = str(exc)
                log.warning("%s v%d: %s; trying the next choice", pkg.name, pkg.version, exc)
                nxt = self.explain(pkg, memory_budget=memory_budget).chosen
                if variant is not None or backend is not None or nxt is None or not _files_present(pkg, nxt.variant):
                    raise

    def load_options(self, backend: str, options: Mapping[str, Any] | None = None) -> LoadOptions:
        """How ``backend`` loads models here: the profile's options and thread count, with ``options`` over them."""
        opts = self.profile.options_for(backend)
        given = dict(options or {})
        threads = given.pop("threads", None) or self._threads or self.profile.threads
        opts.update(given)
        return LoadOptions(device=opts.pop("device", None), threads=threads, extra=opts)

    def _load(self, pkg: ModelPackage, cand: choice_mod.Candidate, *, verify: bool, warmup: bool,
              options: Mapping[str, Any] | None = None) -> LoadedModel:
        """Load one candidate, check its interface, warm it up and check it on the validation sample."""
        if verify:
            pkg.verify(cand.variant)
        b = self.backends[cand.backend]
        load_opts = self.load_options(b.name, options)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        path = pkg.path_of(cand.variant.main_file)
        try:
            if cand.variant.encrypted:
                session = self._load_encrypted(pkg, cand.variant, b, load_opts)
            else:
                session = b.load(path, load_opts)
        except EdgerunError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{b.name} failed to load {path}: {exc}") from exc
        try:
            _check_interface(pkg, session)
            model = LoadedModel(pkg, cand.variant, b.name, session, 0, 0.0)
            model.options = dict(options or {})
            if warmup:
                _warm_up(model)
                _validate(model)
                model.batch_cost = _batch_cost(model)
        except BaseException:
            session.close()
            raise
        model.load_seconds = time.perf_counter() - t0
        model.memory_bytes = max(0, proc.memory_info().rss - rss0)
        log.info("loaded %s v%d: variant %s on %s in %.2fs, +%s RSS", pkg.name, pkg.version, cand.variant.id,
                 b.name, model.load_seconds, format_size(model.memory_bytes))
        return model

    def _load_encrypted(self, pkg: ModelPackage, variant: Variant, b: Backend, opts: LoadOptions) -> Session:
        """Decrypt into memory only and load from there (docs/protection.md); a decryption error wins over the
        backend's own (a model cut short by a bad segment reads as a malformed model)."""
        if variant.format not in b.memory_formats:
            raise BackendUnavailable(f"{variant.id} is encrypted and {b.name} cannot load {variant.format} models "
                                     "from memory")
        source = MemoryModel(pkg.root or Path("."), variant.files, variant.main_file.clear_path,
                             self.device_key.identities())
        try:
            session = b.load_memory(source, opts)
        except Exception:
            if source.errors:
                raise source.errors[0] from None
            raise
        if source.errors:
            session.close()
            raise source.errors[0]
        return session

    def _pick(self, choice: Choice, variant: str | None, backend: str | None) -> choice_mod.Candidate:
        if variant is None and backend is None:
            if choice.chosen is None:
                raise choice_mod.no_fit_error(choice.package, choice.candidates, choice.budget)
            return choice.chosen
        matching = [c for c in choice.candidates
                    if (variant is None or c.variant.id == variant) and (backend is None or c.backend == backend)]
        if not matching:
            if variant is not None:
                choice.package.variant(variant)  # raises naming the known variants
            raise BackendUnavailable(f"backend {backend!r} cannot run any variant of {choice.package.name!r}; "
                                     f"registered backends: {sorted(self.backends)}")
        kept = [c for c in matching if c.kept]
        if not kept:
            first = matching[0]
            rejected = self.rejected.get((choice.package.name, choice.package.version, first.variant.id, first.backend))
            if rejected is not None:
                raise VariantRejected(rejected)
            raise BackendUnavailable(f"{first.variant.id} on {first.backend}: {first.reason}")
        return choice_mod.best_of(kept, self.profile)

    def activate(self, model: LoadedModel, *, keep_other_versions: bool = False) -> list[LoadedModel]:
        """Start serving ``model``: one reference swap; old versions finish their requests, then close."""
        with self._lock:
            slot = self._slots.setdefault(model.name, _Slot())
            old = [] if keep_other_versions else [m for v, m in slot.versions.items() if v != model.version]
            replaced = slot.versions.get(model.version)
            versions = {model.version: model} if not keep_other_versions else {**slot.versions, model.version: model}
            slot.versions = versions
            slot.latest = versions[max(versions)]
        retired = old + ([replaced] if replaced is not None and replaced is not model else [])
        for m in retired:
            m.retire()
        # the swap has happened: a notification plugin that raises is logged, not allowed to undo it
        call_each(self.pm, "on_model_activated", model=model.name, version=model.version, variant=model.variant.id,
                  backend=model.backend)
        return retired

    def load(self, package: str | Path | ModelPackage, *, variant: str | None = None, backend: str | None = None,
             keep_other_versions: bool = False, verify: bool = True, warmup: bool = True,
             options: Mapping[str, Any] | None = None) -> LoadedModel:
        """Choose, load, warm up and serve a package; returns the loaded model."""
        model = self.prepare(package, variant=variant, backend=backend, verify=verify, warmup=warmup, options=options)
        self.activate(model, keep_other_versions=keep_other_versions)
        return model

    # --- serving ---------------------------------------------------------------------------

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        slot = self._slots.get(name)
        if slot is None or slot.latest is None:
            raise ModelNotFound(f"unknown model {name!r}; loaded: {sorted(self._slots)}")
        if version is None:
            return slot.latest
        m = slot.versions.get(version)
        if m is None:
            raise ModelNotFound(f"model {name!r} has no version {version}; loaded: {sorted(slot.versions)}")
        return m

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return [m for s in self._slots.values() for _, m in sorted(s.versions.items())]

    def infer(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
              outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Run one inference: ``{input name: array}`` in, ``{output name: array}`` out."""
        for _ in range(3):
            m = self.model(model, version)
            try:
                return m.run(inputs, outputs)
            except Retired:
                continue
        raise ModelNotReady(f"model {model!r} is being replaced; retry")

    def unload(self, name: str, version: int | None = None) -> None:
        """Stop serving a model (or one version) and free its memory once in-flight requests finish."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                raise ModelNotFound(f"unknown model {name!r}; loaded: {sorted(self._slots)}")
            if version is None:
                gone = list(slot.versions.values())
                del self._slots[name]
                self.tuned.pop(name, None)
            else:
                if version not in slot.versions:
                    raise ModelNotFound(f"model {name!r} has no version {version}")
                gone = [slot.versions.pop(version)]
                if slot.versions:
                    slot.latest = slot.versions[max(slot.versions)]
                else:
                    del self._slots[name]
                    self.tuned.pop(name, None)
        for m in gone:
            m.retire()

    def close(self) -> None:
        for name in list(self._slots):
            self.unload(name)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_interface(pkg: ModelPackage, session: Session) -> None:
    """The package's declared inputs and outputs must be the model's."""
    for kind, declared, actual in (("input", pkg.inputs, session.inputs), ("output", pkg.outputs, session.outputs)):
        have = {s.name: s for s in actual}
        for spec in declared:
            got = have.get(spec.name)
            if got is None:
                raise PackageError(f"package {pkg.name!r} declares {kind} {spec.name!r} but the model's {kind}s are "
                                   f"{sorted(have)}")
            if got.datatype != spec.datatype:
                raise PackageError(f"package {pkg.name!r}: {kind} {spec.name!r} is {spec.datatype} in edgerun.toml "
                                   f"but {got.datatype} in the model")
            if len(got.shape) != len(spec.shape) or any(
                    a >= 0 and b >= 0 and a != b for a, b in zip(got.shape, spec.shape)):
                raise PackageError(f"package {pkg.name!r}: {kind} {spec.name!r} has shape {list(spec.shape)} in "
                                   f"edgerun.toml but {list(got.shape)} in the model")
        if kind == "input" and len(have) != len(declared):
            extra = sorted(set(have) - {s.name for s in declared})
            raise PackageError(f"package {pkg.name!r} does not declare model input(s) {extra}")


def _warm_up(model: LoadedModel) -> None:
    """Run the package's samples, comparing outputs with the expected ones; or one zero input."""
    samples = model.package.samples
    if not samples:
        _warm_up_zeros(model)
        return
    v = model.variant
    # a quantized variant whose numbers differ here is set aside for the next choice; an fp32 one is broken
    differs = ModelLoadError if v.precision == "fp32" else VariantRejected
    for i, sample in enumerate(samples):
        try:
            got = model.run(sample.inputs)
        except EdgerunError as exc:
            raise ModelLoadError(f"warm-up sample {i} failed: {exc}") from None
        for name, want in sample.expected.items():
            out = got[name]
            if out.shape != want.shape:
                raise ModelLoadError(f"warm-up sample {i}: output {name!r} has shape {list(out.shape)}, "
                                     f"expected {list(want.shape)}")
            if out.dtype.kind in "fc":
                if not np.allclose(out, want, atol=v.atol, rtol=v.rtol, equal_nan=False):
                    diff = float(np.max(np.abs(out.astype(np.float64) - want.astype(np.float64))))
                    raise differs(f"warm-up sample {i}: output {name!r} differs from the expected output ({v.id}: "
                                  f"max abs diff {diff:.3g} > atol {v.atol:g}, rtol {v.rtol:g})")
            elif not np.array_equal(out, want):
                raise differs(f"warm-up sample {i}: output {name!r} differs from the expected output ({v.id})")


BATCH_PROBE_ROWS = 4
BATCH_PAYS = 0.8  # dynamic batching is on by default where a row in a batch costs at most this share of a lone run


def _batch_cost(model: LoadedModel) -> float | None:
    """A row's run time in a batch of BATCH_PROBE_ROWS over its time alone, the best of three runs each (interleaved):
    near 1 where stacking requests saves nothing (a large CNN on a CPU). None where it cannot be measured: no batch
    dimension, text inputs, or dynamic sizes without a warm-up sample to take them from."""
    specs = (*model.inputs, *model.outputs)
    if not all(s.shape and s.shape[0] < 0 for s in specs) or any(s.datatype == "BYTES" for s in model.inputs):
        return None
    if model.package.samples:
        one = {k: np.asarray(v)[:1] for k, v in model.package.samples[0].inputs.items()}
    elif all(d >= 0 for s in model.inputs for d in s.shape[1:]):
        one = {s.name: np.zeros((1, *s.shape[1:]), dtype=s.dtype) for s in model.inputs}
    else:
        return None
    if any(a.shape[:1] != (1,) for a in one.values()):
        return None
    many = {k: np.repeat(a, BATCH_PROBE_ROWS, axis=0) for k, a in one.items()}
    alone = batched = float("inf")
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            model.run_unchecked(one)
            t1 = time.perf_counter()
            model.run_unchecked(many)
            t2 = time.perf_counter()
            alone, batched = min(alone, t1 - t0), min(batched, t2 - t1)
    except Exception as exc:  # a model that runs one row but not several: batching will not be offered
        log.info("%s v%d: a batch of %d rows fails here (%s)", model.name, model.version, BATCH_PROBE_ROWS, exc)
        return None
    if alone <= 0:
        return None
    cost = batched / BATCH_PROBE_ROWS / alone
    log.info("%s v%d: in a batch of %d a row takes %.0f%% of its time alone (%.0f us)%s", model.name, model.version,
             BATCH_PROBE_ROWS, cost * 100, alone * 1e6,
             "" if cost <= BATCH_PAYS else ": no dynamic batching unless the configuration turns it on")
    return cost


VALIDATION_SLACK = 0.02  # agreement may be this much (or two examples) below what the hub measured


def _validate(model: LoadedModel) -> None:
    """Run a quantized variant on the package's validation sample; VariantRejected when its top-1 agrees with the
    fp32 model's clearly less here than it did on the hub (this CPU's int8 or fp16 kernels differ)."""
    val = model.package.validation
    v = model.variant
    if val is None or not len(val) or v.precision == "fp32":
        return
    first = model.outputs[0].name
    top = np.array([int(np.argmax(model.run(row)[first])) for row in val.rows()])
    agreement = float(np.mean(top == val.top1))
    hub = float((v.info.get("validation") or {}).get("agreement", 1.0))
    model.validation = {"agreement": round(agreement, 4), "hub_agreement": hub, "samples": len(val)}
    if agreement < hub - max(VALIDATION_SLACK, 2 / len(val)) - 1e-9:
        raise VariantRejected(f"{v.id} on {model.backend} agrees with fp32 on {agreement:.0%} of the package's "
                              f"{len(val)} validation examples here, the hub measured {hub:.0%}: this CPU's "
                              f"{v.precision} kernels give other answers")


def _files_present(pkg: ModelPackage, variant: Variant) -> bool:
    return pkg.root is not None and all((pkg.root / f.path).is_file() for f in variant.files)


def _warm_up_zeros(model: LoadedModel) -> None:
    """Without samples (a bare model file has none): one zero-filled batch of 1, its outputs checked by name."""
    if any(s.datatype == "BYTES" for s in model.inputs):
        return
    zeros = {s.name: np.zeros(tuple(d if d > 0 else 1 for d in s.shape), dtype=s.dtype) for s in model.inputs}
    try:
        got = model.run(zeros)
    except Exception as exc:
        shapes = {name: list(z.shape) for name, z in zeros.items()}
        if any(d < 0 for s in model.inputs for d in s.shape[1:]):  # a guessed size, e.g. an image of 1x1 pixels
            log.warning("%s: skipped the warm-up: the model rejects zero input(s) %s with its dynamic sizes set "
                        "to 1: %s", model.name, shapes, exc)
            return
        raise ModelLoadError(f"warm-up: model {model.name!r} fails on zero input(s) {shapes}: {exc}") from None
    missing = [s.name for s in model.outputs if s.name not in got]
    if missing:
        raise ModelLoadError(f"warm-up: model {model.name!r} returned outputs {sorted(got)}, not the declared "
                             f"{missing}")
