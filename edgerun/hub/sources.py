"""The built-in model sources: an ONNX file as it is, and PyTorch and TensorFlow models converted to ONNX by their
framework's own exporter (``torch.onnx.export``, tf2onnx).

A framework is imported only when one of its models is converted: importing this module imports neither.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgerun.errors import PackageError
from edgerun.hookspecs import hookimpl
from edgerun.hub.tools import ConverterMissing, ModelSource

log = logging.getLogger(__name__)

TORCH_EXTRA = "pip install 'edgerun[hub-torch]'"
TF_EXTRA = "pip install 'edgerun[hub-tf]'"
DYNAMO_OPSET = 18  # the torch.export-based exporter's own opset (a lower one is reached by version conversion)
TORCHSCRIPT_OPSET = 17
TF_OPSET = 17
BATCH = "batch"
_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def example_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """The first row of each array of a validation .npz (``labels`` aside), in file order: a source's ``example``."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"validation data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            rows = {k: z[k][:1] for k in z.files if k != "labels"}
    except Exception as exc:
        raise PackageError(f"validation data {path}: not a readable .npz file ({exc})") from None
    if not rows or any(len(a) == 0 or a.ndim == 0 for a in rows.values()):
        raise PackageError(f"validation data {path}: needs one array per model input with at least one example, "
                           f"found {sorted(rows) or 'none'}")
    return rows


def conversion_note(source: ModelSource, spec: str, onnx_path: Path) -> str:
    """What the model was converted from, e.g. ``PyTorch module pkg.mod:make via torch.onnx.export (...), opset 18``."""
    what, exporter = getattr(source, "what", None), getattr(source, "exporter", None)
    opset = _opset(onnx_path)
    if what and exporter:
        return f"{what} {spec} via {exporter}, opset {opset}"
    return f"{spec} (model source {source.name!r}), opset {opset}"


class OnnxFile(ModelSource):
    """An ``.onnx`` file."""

    name = "onnx"
    describe = "an ONNX file (.onnx)"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith(".onnx")

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        shutil.copyfile(spec, out)
        return out


class _Converted(ModelSource):
    """A framework's model, converted by that framework's exporter."""

    describe: ClassVar[str]
    what: ClassVar[str]  # "PyTorch module", for the report
    exporter: ClassVar[str]  # "torch.onnx.export (TorchScript exporter)", for the report


# --- PyTorch ----------------------------------------------------------------------------------------


class TorchModule(_Converted):
    """A ``module:callable`` reference to a PyTorch module, exported with the torch.export-based exporter."""

    name = "pytorch-module"
    extra = "hub-torch"
    describe = ("a PyTorch module as module:callable (pkg.models:make_net, importable from the current directory or "
                "PYTHONPATH: an nn.Module instance, an nn.Module class built without arguments, or a function "
                "returning one)")
    what = "PyTorch module"
    exporter = "torch.onnx.export (torch.export-based exporter, dynamo=True)"

    def matches(self, spec: str) -> bool:
        return bool(_REFERENCE.fullmatch(spec)) and not os.path.exists(spec)

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        torch = _import_torch(spec, dynamo=True)
        with _cwd_on_path():
            module = _resolve_module(torch, spec)
            module.eval()
            args = _torch_args(torch, example, 2)
            batch = torch.export.Dim(BATCH)
            return _torch_export(torch, module, module, spec, out, args, list(example), self.exporter,
                                 dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args))


class TorchExportedProgram(_Converted):
    """A ``torch.export.save`` file, exported with the torch.export-based exporter (its shapes as exported)."""

    name = "pytorch-exported-program"
    extra = "hub-torch"
    describe = "a PyTorch ExportedProgram (.pt2, torch.export.save)"
    what = "PyTorch ExportedProgram"
    exporter = "torch.onnx.export (torch.export-based exporter, dynamo=True)"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith(".pt2")

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        torch = _import_torch(spec, dynamo=True)
        if not Path(spec).is_file():
            raise PackageError(f"{spec}: no such file")
        try:
            with _quiet_torch():
                program = torch.export.load(spec)
        except Exception as exc:
            raise PackageError(f"{spec}: not an ExportedProgram saved with torch.export.save "
                               f"({type(exc).__name__}: {_first_line(exc)})") from None
        batch = _program_batch(program, spec)
        args = _torch_args(torch, example, batch or 2)
        return _torch_export(torch, program, program.module(), spec, out, args, list(example), self.exporter,
                             dynamo=True)


class TorchScriptFile(_Converted):
    """A ``torch.jit.save`` file, exported with the TorchScript exporter (the one that reads TorchScript)."""

    name = "torchscript"
    extra = "hub-torch"
    describe = "a TorchScript module (.pt, .pth; torch.jit.save, not a state_dict)"
    what = "TorchScript module"
    exporter = "torch.onnx.export (TorchScript exporter, dynamo=False)"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith((".pt", ".pth"))

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        torch = _import_torch(spec, dynamo=False)
        _refuse_non_torchscript(torch, spec)
        try:
            with _quiet_torch():  # "torch.jit.load is deprecated" (TorchScript still exports)
                module = torch.jit.load(spec, map_location="cpu")
        except Exception as exc:
            raise PackageError(f"{spec}: torch.jit.load cannot read it ({type(exc).__name__}: {_first_line(exc)})") \
                from None
        module.eval()
        args = _torch_args(torch, example, 2)
        return _torch_export(torch, module, module, spec, out, args, list(example), self.exporter, dynamo=False)


def _import_torch(spec: str, dynamo: bool) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConverterMissing(f"{spec}: reading a PyTorch model needs torch ({exc}): {TORCH_EXTRA}") from None
    if dynamo:
        try:
            import onnxscript  # noqa: F401  (the torch.export-based exporter writes ONNX with it)
        except ImportError as exc:
            raise ConverterMissing(f"{spec}: torch.onnx.export's torch.export-based exporter needs onnxscript "
                                   f"({exc}): {TORCH_EXTRA}") from None
    return torch


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory on sys.path while a ``module:callable`` is imported and run, as under ``python -m``."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _resolve_module(torch: Any, spec: str) -> Any:
    """The nn.Module that ``module:callable`` names or returns."""
    mod_name, _, attr = spec.partition(":")
    importlib.invalidate_caches()
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:
        raise PackageError(f"{spec}: cannot import module {mod_name!r} ({type(exc).__name__}: {exc}); it must be "
                           f"importable from the current directory or PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PackageError(f"{spec}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise PackageError(f"{spec}: is a {type(obj).__name__}, not a torch.nn.Module nor a callable returning one")
    try:
        made = obj()
    except Exception as exc:
        raise PackageError(f"{spec}: calling {attr}() with no arguments failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(made, torch.nn.Module):
        raise PackageError(f"{spec}: {attr}() returned a {type(made).__name__}, not a torch.nn.Module")
    return made


def _refuse_non_torchscript(torch: Any, spec: str) -> None:
    """PackageError for a .pt/.pth that is not TorchScript: a state_dict, a pickled object, or no torch file."""
    path = Path(spec)
    if not path.is_file():
        raise PackageError(f"{spec}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return
        if any(n.endswith("/models/model.json") for n in names):
            raise PackageError(f"{spec}: this is an ExportedProgram (torch.export.save); name it .pt2")
    how = ("the packager needs the module itself: save it with torch.jit.save(torch.jit.script(model), 'model.pt') "
           "or torch.export.save(torch.export.export(model, args), 'model.pt2'), or give the code that builds it as "
           "module:callable")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise PackageError(f"{spec}: a pickled Python object (torch.save of a whole module?), which the packager "
                               f"does not unpickle (that runs arbitrary code); {how}") from None
        raise PackageError(f"{spec}: neither a TorchScript file nor a torch.save file ({type(exc).__name__}: "
                           f"{_first_line(exc)})") from None
    if isinstance(obj, dict):
        keys = list(obj)
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        kind = "a state_dict" if tensors == len(keys) else "a checkpoint dict"
        shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise PackageError(f"{spec}: {kind} ({len(keys)} entries: {shown}) saved with torch.save: it holds "
                           f"parameters, not the module that uses them; {how}")
    raise PackageError(f"{spec}: a torch.save file holding a {type(obj).__name__}, not a module; {how}")


def _program_batch(program: Any, spec: str) -> int | None:
    """The fixed batch an ExportedProgram was exported with (None when its first dimension is dynamic)."""
    user = set(program.graph_signature.user_inputs)
    fixed = None
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if val is None or not hasattr(val, "shape") or not len(val.shape):
            continue
        first = val.shape[0]
        if isinstance(first, int):
            if first != 1:
                raise PackageError(f"{spec}: the program was exported with a fixed batch of {first} (input "
                                   f"{node.name!r} {list(val.shape)}), and the packager runs batch 1: export it with "
                                   f"dynamic_shapes (a torch.export.Dim on axis 0) or with a batch of 1")
            fixed = 1
    return fixed


def _torch_args(torch: Any, example: dict[str, np.ndarray], batch: int) -> tuple[Any, ...]:
    """The example as forward arguments, ``batch`` rows each (float64 becomes float32)."""
    def tensor(a: np.ndarray) -> Any:
        a = np.repeat(a[:1], batch, axis=0)
        return torch.from_numpy(np.ascontiguousarray(a.astype(np.float32) if a.dtype == np.float64 else a))

    return tuple(tensor(a) for a in example.values())


def _flat_outputs(out: Any) -> list[np.ndarray]:
    if hasattr(out, "detach"):
        return [out.detach().cpu().numpy()]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flat_outputs(o)]
    raise PackageError(f"the module returned a {type(out).__name__}; the packager takes tensors (or a tuple, list "
                       f"or dict of them)")


def _torch_export(torch: Any, model: Any, run: Callable[..., Any], spec: str, out: Path, args: tuple[Any, ...],
                  names: list[str], exporter: str, *, dynamo: bool, dynamic_shapes: Any = None) -> Path:
    """Run the model once on ``args`` (the reference), export it with torch.onnx.export, check the ONNX agrees."""
    try:
        with torch.no_grad():
            expected = _flat_outputs(run(*args))
    except PackageError as exc:
        raise PackageError(f"{spec}: {exc}") from None
    except Exception as exc:
        raise PackageError(f"{spec}: calling the model with the validation data's arrays {names} (in file order, "
                           f"as forward's arguments) failed ({type(exc).__name__}: {_first_line(exc)})") from None
    outputs = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    try:
        with torch.no_grad(), _quiet_torch():
            if dynamo:
                torch.onnx.export(model, args, str(out), dynamo=True, input_names=names, output_names=outputs,
                                  opset_version=DYNAMO_OPSET, dynamic_shapes=dynamic_shapes, external_data=False,
                                  verbose=False)
            else:
                torch.onnx.export(model, args, str(out), dynamo=False, input_names=names, output_names=outputs,
                                  opset_version=TORCHSCRIPT_OPSET,
                                  dynamic_axes={n: {0: BATCH} for n in names + outputs})
    except Exception as exc:
        raise PackageError(f"{spec}: {exporter} failed: {_export_failure(exc)}") from None
    _name_batch(out)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    _check_outputs(out, feeds, dict(zip(outputs, expected)), spec, exporter)
    return out


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep the exporter's progress lines, graph dumps and deprecation warnings off the terminal (logged at debug)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if buf.getvalue():
            log.debug("exporter output:\n%s", buf.getvalue())


def _export_failure(exc: BaseException) -> str:
    """The exporter's own reason, short: its exception summary and the user code that raised it."""
    text = _ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if not reason.startswith("<class") and type(exc).__name__ not in reason:
        reason = f"{type(exc).__name__}: {reason}"
    reason = re.sub(r"^<class '[\w.]*?(\w+)'>", r"\1", reason)
    marker = "The following call raised this error:"
    if marker in lines:
        at = lines[lines.index(marker) + 1: lines.index(marker) + 3]
        reason += f" (raised at {' '.join(at)})"
    if "data-dependent" in reason:
        reason += ("; torch.export cannot follow Python control flow on tensor values (if/while on a tensor): "
                   "use torch.cond, or compute the branch without Python control flow")
    return reason


# --- TensorFlow -------------------------------------------------------------------------------------


class TfSavedModel(_Converted):
    """A SavedModel directory, converted from its ``serving_default`` signature."""

    name = "tf-saved-model"
    extra = "hub-tf"
    describe = "a TensorFlow SavedModel directory (its serving_default signature)"
    what = "TensorFlow SavedModel"
    exporter = "tf2onnx.convert.from_function (serving_default signature)"

    def matches(self, spec: str) -> bool:
        p = Path(spec)
        return p.is_dir() and ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file())

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        tf, tf2onnx = _import_tf(spec)
        try:
            loaded = tf.saved_model.load(spec)
        except Exception as exc:
            raise PackageError(f"{spec}: TensorFlow cannot load this SavedModel ({type(exc).__name__}: "
                               f"{_first_line(exc)})") from None
        signatures = [s for s in loaded.signatures if not s.startswith("_")]
        if "serving_default" not in loaded.signatures:
            raise PackageError(f"{spec}: the SavedModel has no 'serving_default' signature (it has "
                               f"{', '.join(repr(s) for s in signatures) or 'no signature'}); save it with "
                               f"signatures={{'serving_default': ...}} (Keras: model.export(path))")
        sig = loaded.signatures["serving_default"]
        specs = sig.structured_input_signature[1]
        names = list(specs)
        _check_names(spec, names, example, "its serving_default signature")
        signature = [tf.TensorSpec(specs[n].shape, specs[n].dtype, name=n) for n in names]

        @tf.function(input_signature=signature)
        def serve(*args: Any) -> Any:
            return sig(**dict(zip(names, args)))

        feeds = _tf_feeds(example, names, signature)
        expected = {k: v.numpy() for k, v in sig(**{n: tf.constant(a) for n, a in feeds.items()}).items()}
        _tf_convert(lambda: tf2onnx.convert.from_function(serve, input_signature=signature, opset=TF_OPSET),
                    spec, out, self.exporter)
        _check_outputs(out, feeds, expected, spec, self.exporter)
        return out


class KerasFile(_Converted):
    """A ``.keras``/``.h5`` model, loaded with the Keras that wrote it (Keras 3 or tf_keras) and converted."""

    name = "keras"
    extra = "hub-tf"
    describe = "a Keras model file (.keras, .h5; Keras 3 or tf_keras, as recorded in the file)"
    what = "Keras model"
    exporter = "tf2onnx.convert.from_keras"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith((".keras", ".h5", ".hdf5"))

    def to_onnx(self, spec: str, out: Path, example: dict[str, np.ndarray]) -> Path:
        tf, tf2onnx = _import_tf(spec)
        if not Path(spec).is_file():
            raise PackageError(f"{spec}: no such file")
        keras = _keras_for(spec)
        try:
            model = keras.models.load_model(spec, compile=False)
        except Exception as exc:
            raise PackageError(f"{spec}: {keras.__name__} cannot load this model ({type(exc).__name__}: "
                               f"{_first_line(exc)})") from None
        inputs = list(getattr(model, "inputs", None) or [])
        if not inputs:
            raise PackageError(f"{spec}: the Keras model has no defined inputs (a subclassed model?); save it as a "
                               f"SavedModel with a serving signature instead (model.export(path))")
        names = [t.name.split(":")[0] for t in inputs]
        _check_names(spec, names, example, "its Keras inputs")
        signature = [tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=n) for t, n in zip(inputs, names)]
        feeds = _tf_feeds(example, names, signature)
        got = model([feeds[n] for n in names] if len(names) > 1 else feeds[names[0]], training=False)
        got = got if isinstance(got, (list, tuple)) else [got]
        _tf_convert(lambda: tf2onnx.convert.from_keras(model, input_signature=signature, opset=TF_OPSET),
                    spec, out, self.exporter)
        expected = {n: np.asarray(g.numpy() if hasattr(g, "numpy") else g) for n, g in zip(_output_names(out), got)}
        _check_outputs(out, feeds, expected, spec, self.exporter)
        return out


def _import_tf(spec: str) -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import tensorflow as tf
        import tf2onnx
        import tf2onnx.convert
    except ImportError as exc:
        raise ConverterMissing(f"{spec}: reading a TensorFlow model needs tensorflow and tf2onnx ({exc}): "
                               f"{TF_EXTRA}") from None
    return tf, tf2onnx


def _keras_for(spec: str) -> Any:
    """Keras 3 or tf_keras, whichever wrote the file (its recorded keras_version); the other if only it is here."""
    version = ""
    try:
        if zipfile.is_zipfile(spec):
            import json

            with zipfile.ZipFile(spec) as z:
                version = json.loads(z.read("metadata.json")).get("keras_version", "")
        else:
            import h5py

            with h5py.File(spec, "r") as h:
                version = h.attrs.get("keras_version", "")
                version = version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:
        log.debug("%s: no keras_version recorded (%s)", spec, exc)
    order = ("tf_keras", "keras") if version.startswith("2.") else ("keras", "tf_keras")
    for name in order:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ConverterMissing(f"{spec}: reading a Keras model needs keras or tf_keras: {TF_EXTRA}")


def _check_names(spec: str, names: list[str], example: dict[str, np.ndarray], where: str) -> None:
    if sorted(names) != sorted(example):
        raise PackageError(f"{spec}: the model's inputs are named {names} ({where}), the validation data's arrays "
                           f"are {list(example)}: name the .npz arrays after the model's inputs (plus 'labels')")


def _tf_feeds(example: dict[str, np.ndarray], names: list[str], signature: list[Any]) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(example[n].astype(s.dtype.as_numpy_dtype)) for n, s in zip(names, signature)}


def _tf_convert(convert: Callable[[], Any], spec: str, out: Path, exporter: str) -> None:
    import onnx

    try:
        proto, _ = convert()
    except Exception as exc:
        raise PackageError(f"{spec}: {exporter} failed ({type(exc).__name__}: {_first_line(exc)})") from None
    onnx.save(proto, str(out))
    _name_batch(out)


# --- both -------------------------------------------------------------------------------------------


def _name_batch(path: Path) -> None:
    """Call every symbolic first dimension of the inputs and outputs ``batch`` (tf2onnx writes unk__6, ...)."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and dims[0].dim_param != BATCH and dims[0].dim_param.isidentifier():
            dims[0].dim_param = BATCH
            changed = True
    if changed:
        onnx.save(model, str(path))


def _check_outputs(path: Path, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray], spec: str,
                   exporter: str) -> None:
    """PackageError unless onnxruntime runs the written model and gets the framework's outputs on the example."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})))
    except Exception as exc:
        raise PackageError(f"{spec}: onnxruntime cannot run the ONNX model {exporter} wrote "
                           f"({type(exc).__name__}: {_first_line(exc)})") from None
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape or not np.allclose(have, want, rtol=1e-3, atol=1e-4):
            dev = (f"max deviation {float(np.max(np.abs(have - want))):.3g}" if have is not None
                   and have.shape == want.shape else f"got {None if have is None else list(have.shape)}")
            raise PackageError(f"{spec}: the ONNX model {exporter} wrote does not compute what the framework does "
                               f"on the validation data's first row (output {name!r}: {dev})")


def _output_names(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path)).graph.output]


def _opset(path: Path) -> int | str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


@hookimpl
def register_model_sources(register: Callable[[ModelSource], None]) -> None:
    for source in (OnnxFile(), TorchModule(), TorchExportedProgram(), TorchScriptFile(), TfSavedModel(), KerasFile()):
        register(source)
