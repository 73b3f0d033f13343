"""TFLite variants for LiteRT, made by onnx2tf: fp32, fp16, full-integer int8 and dynamic-range int8.

One onnx2tf run per packaging job makes all of them, in a child process (``python -m edgerun.hub.tflite JOB.json``)
that works in a temporary directory of its own: TensorFlow and onnx2tf's output stay out of the packager's
process, the CLI and the logs, and nothing is written outside that directory. The child keeps the ONNX model's
interface (inputs of rank 3 to 5 stay channels-first; inputs and outputs get the ONNX names) and loads every file
on the LiteRT backend as a device would: the interface must be the ONNX model's, batch 1 and a batch of several
must run, and fp32 must reproduce onnxruntime's outputs. A file that fails is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from edgerun.device import CPU_CLASSES
from edgerun.hookspecs import hookimpl
from edgerun.hub.tools import Made, MakeJob, PrecisionUnavailable, VariantMaker
from edgerun.tensors import TensorSpec

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'edgerun[hub-tflite]'"
REQUIRED = {"tensorflow": "tensorflow", "tf_keras": "tf_keras", "onnx2tf": "onnx2tf",
            "onnx_graphsurgeon": "onnx-graphsurgeon", "sng4onnx": "sng4onnx", "ai_edge_litert": "ai-edge-litert"}
# variant id -> onnx2tf's output file model_<kind>.tflite (integer_quant: int8 inside, float32 inputs and outputs)
KINDS = {"tflite-fp32": "float32", "tflite-fp16": "float16", "tflite-int8": "integer_quant",
         "tflite-int8-dynamic": "dynamic_range_quant"}
MISSING_REASON = "{} not installed: TFLite variants are converted by onnx2tf (" + EXTRA_HINT + ")"
INT4_REASON = "onnx2tf makes no int4 TFLite model (its quantized models are int8, or int8 with int16 activations)"
CHECK_ROWS = 4  # validation rows each converted file is run on (one at a time, then as one batch)
TIMEOUT = 3600.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Unfit(Exception):
    """A converted file does not keep the ONNX model's interface or outputs; the message says how."""


@dataclass
class Conversion:
    """One onnx2tf run: the files it made by variant id, why it made no others, and how it ran."""

    work: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why it made nothing

    def cleanup(self) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)


_conversions: dict[tuple[Any, ...], Conversion] = {}


def conversion(job: MakeJob) -> Conversion:
    """The onnx2tf run for this job's model: made by the job's first TFLite maker, shared by the others."""
    st = job.source.stat()
    key = (str(job.source.resolve()), st.st_mtime_ns, st.st_size, str(job.stage))
    conv = _conversions.get(key)
    if conv is None:
        for old in _conversions.values():  # another job's run
            old.cleanup()
        _conversions.clear()
        conv = _conversions[key] = convert(job)
        # the work dir goes with the job's data, when the packaging job ends (or at exit)
        weakref.finalize(next(iter(job.validation.values())), _forget, key)
    return conv


def _forget(key: tuple[Any, ...]) -> None:
    conv = _conversions.pop(key, None)
    if conv is not None:
        conv.cleanup()


def missing_modules() -> list[str]:
    """The distributions onnx2tf needs that are not installed here."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def convert(job: MakeJob) -> Conversion:
    """Run onnx2tf on ``job.source`` in a child process and a fresh work dir; never raises for the model."""
    missing = missing_modules()
    if missing:
        return Conversion(None, error=MISSING_REASON.format(", ".join(missing)))
    work = Path(tempfile.mkdtemp(prefix="edgerun-tflite-"))
    conv = Conversion(work)
    np.savez(work / "check.npz", **{k: v[:CHECK_ROWS] for k, v in job.validation.items()})
    if job.calibration:
        np.savez(work / "calibration.npz", **job.calibration)
    spec = {"source": str(job.source.resolve()), "work": str(work), "log": str(work / "onnx2tf.log"),
            "calibration": bool(job.calibration), "inputs": [s.to_dict() for s in job.inputs],
            "outputs": [s.to_dict() for s in job.outputs]}
    (work / "job.json").write_text(json.dumps(spec))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(work / "keras")}
    t0 = time.perf_counter()
    try:
        with open(work / "onnx2tf.log", "wb") as out:
            proc = subprocess.run([sys.executable, "-m", "edgerun.hub.tflite", str(work / "job.json")],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        conv.error = f"onnx2tf did not finish in {TIMEOUT:.0f}s"
        return conv
    lines = (work / "onnx2tf.log").read_text(errors="replace").splitlines()
    log.debug("onnx2tf on %s: exit %d after %.1fs; its output ends:\n%s", job.source, proc.returncode,
              time.perf_counter() - t0, "\n".join(lines[-20:]))
    result_file = work / "result.json"
    if not result_file.is_file():
        conv.error = f"onnx2tf's process exited with code {proc.returncode}" + _said(lines, " ({})")
        return conv
    result = json.loads(result_file.read_text())
    conv.files = {vid: work / rel for vid, rel in result["files"].items()}
    conv.skipped, conv.info, conv.error = result["skipped"], result["info"], result["error"]
    return conv


def _said(lines: list[str], fmt: str = "{}") -> str:
    """The last error a log shows (onnx2tf's ``ERROR:`` line or a Python exception), formatted, or ''."""
    for line in reversed(lines):
        line = _ANSI.sub("", line).strip()
        if line.startswith("ERROR:"):
            return fmt.format(line[len("ERROR:"):].strip()[:300])
        if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line):
            return fmt.format(line[:300])
    return ""


# --- the makers --------------------------------------------------------------------------------------


class _TfliteMaker(VariantMaker):
    """A TFLite variant: one of the files of the job's onnx2tf run, copied into the package."""

    format = "tflite"
    quantization: ClassVar[str]
    how: ClassVar[str]  # the note, formatted with the run's info
    recorded: ClassVar[tuple[str, ...]] = ()  # the run's info that concerns this variant

    activations: ClassVar[str | None] = None  # an int8 variant's activations (its int8 record)

    def missing(self) -> str | None:
        lacking = missing_modules()
        return MISSING_REASON.format(", ".join(lacking)) if lacking else None

    def make(self, job: MakeJob) -> Made:
        if self.method == "static" and not job.calibration:
            raise PrecisionUnavailable("static int8 needs calibration data")
        conv = conversion(job)
        reason = conv.error or conv.skipped.get(self.id)
        if reason or self.id not in conv.files:
            raise PrecisionUnavailable(reason or f"onnx2tf made no {KINDS[self.id]} model")
        rel = f"{self.id}.tflite"
        partial = job.stage / f".{rel}.partial"
        shutil.copyfile(conv.files[self.id], partial)
        os.replace(partial, job.stage / rel)  # never a half-written file under the variant's name
        info = {k: conv.info[k] for k in ("onnx2tf", "tensorflow", "nchw_inputs", "onnxsim", *self.recorded)}
        made = {"tflite": {"quantization": self.quantization, **info}}
        if self.activations is not None:  # TFLite's int8 scheme, for every target: the emulated check tells
            made["int8"] = {"tool": f"onnx2tf {conv.info['onnx2tf']} (TensorFlow Lite converter)",
                            "weights": "int8 symmetric", "per_channel": conv.info["weights"] == "per-channel",
                            "activations": self.activations,
                            "targets": list(job.options.get("int8_targets") or CPU_CLASSES)}
        return Made([rel], f"onnx2tf {conv.info['onnx2tf']}: " + self.how.format(**conv.info), made)


class TfliteFp32(_TfliteMaker):
    """The model as onnx2tf converts it, in float32."""

    id, precision, method, order = "tflite-fp32", "fp32", "convert", 50
    quantization, recorded = "none", ("fp32_max_deviation", "check_rows")
    how = "float32, max deviation from onnxruntime {fp32_max_deviation:.2g} on {check_rows} validation rows"


class TfliteFp16(_TfliteMaker):
    """fp16 weights, which LiteRT turns back into fp32 at load: half the file, fp32 compute."""

    id, precision, method, order = "tflite-fp16", "fp16", "fp16", 51
    quantization, how = "float16 weights", "float16 weights, float32 compute"


class TfliteInt8Static(_TfliteMaker):
    """Full-integer int8 (weights and activations) calibrated on the calibration set, float inputs and outputs."""

    id, precision, method, order = "tflite-int8", "int8", "static", 52
    quantization, recorded = "full-integer int8, float32 inputs and outputs", ("weights", "calibration_rows")
    activations = "int8 asymmetric per tensor"
    how = ("full-integer int8: {weights} int8 weights, int8 activations calibrated on {calibration_rows} rows, "
           "float32 inputs and outputs")


class TfliteInt8Dynamic(_TfliteMaker):
    """Dynamic-range int8: int8 weights, activations quantized at run time."""

    id, precision, method, order = "tflite-int8-dynamic", "int8", "dynamic", 53
    quantization, recorded = "dynamic-range int8", ("weights",)
    activations = "int8 at run time"
    how = "dynamic-range int8: {weights} int8 weights, activations quantized at run time"


class TfliteInt4(VariantMaker):
    """int4 TFLite, which onnx2tf does not make."""

    id, format, precision, method, order = "tflite-int4", "tflite", "int4", "weights", 54

    def missing(self) -> str | None:
        lacking = missing_modules()
        return MISSING_REASON.format(", ".join(lacking)) if lacking else None

    def make(self, job: MakeJob) -> Made:
        raise PrecisionUnavailable(INT4_REASON)


BUILTIN: list[Callable[[], VariantMaker]] = [TfliteFp32, TfliteFp16, TfliteInt8Static, TfliteInt8Dynamic, TfliteInt4]


@hookimpl
def register_variant_makers(register: Callable[[VariantMaker], None]) -> None:
    for cls in BUILTIN:
        register(cls())


# --- the child ---------------------------------------------------------------------------------------


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Convert, name and check; the result names the files made and the reasons for the ones that are not."""
    import onnx

    result: dict[str, Any] = {"files": {}, "skipped": {}, "info": {}, "error": None}
    try:
        import onnx2tf
        import tensorflow as tf
    except Exception as exc:
        result["error"] = f"onnx2tf cannot be imported ({type(exc).__name__}: {exc}; {EXTRA_HINT})"
        return result
    work = Path(job["work"])
    inputs = [TensorSpec.from_dict(d) for d in job["inputs"]]
    outputs = [TensorSpec.from_dict(d) for d in job["outputs"]]
    version = getattr(onnx2tf, "__version__", "?")
    with np.load(work / "check.npz") as z:
        rows = {k: z[k] for k in z.files}
    calibration = None
    if job["calibration"]:
        with np.load(work / "calibration.npz") as z:
            calibration = {k: z[k] for k in z.files}
    float_inputs = all(s.datatype == "FP32" for s in inputs)
    static = calibration is not None and float_inputs
    nchw = [s.name for s in inputs if 3 <= len(s.shape) <= 5]
    info = result["info"] = {"onnx2tf": version, "tensorflow": tf.__version__, "weights": "per-channel",
                            "nchw_inputs": nchw, "onnxsim": shutil.which("onnxsim") is not None,
                            "calibration_rows": len(next(iter(calibration.values()))) if static else 0,
                            "check_rows": len(next(iter(rows.values())))}
    if calibration is not None and not float_inputs:
        result["skipped"]["tflite-int8"] = "full-integer int8 needs float32 inputs to calibrate (onnx2tf)"
    model = work / "model.onnx"  # onnx2tf rewrites the file it converts
    onnx.save(onnx.load(job["source"]), str(model))
    data = []  # calibration data, which onnx2tf also runs the ONNX model on to check its conversion
    if float_inputs:
        for i, s in enumerate(inputs):
            np.save(work / f"data{i}.npy", (calibration if static else rows)[s.name])
            data.append([s.name, str(work / f"data{i}.npy"), 0.0, 1.0])
    _patch_onnx2tf()
    out = work / "tf"
    try:
        onnx2tf.convert(input_onnx_file_path=str(model), output_folder_path=str(out),
                        keep_ncw_or_nchw_or_ncdhw_input_names=nchw or None,
                        custom_input_op_name_np_data_path=data or None,
                        output_integer_quantized_tflite=static, output_dynamic_range_quantized_tflite=True,
                        quant_type="per-channel", not_use_onnxsim=not info["onnxsim"],
                        non_verbose=False, verbosity="warn")  # into the log: warnings say why a file is missing
    except SystemExit:
        sys.stdout.flush()
        result["error"] = f"onnx2tf {version} stopped" + _said(_log_lines(job), ": {}")
        return result
    except Exception as exc:
        result["error"] = _reason(exc, model, version)
        return result
    _check_all(out, inputs, outputs, rows, job, result)
    return result


def _patch_onnx2tf() -> None:
    """Two fixes to onnx2tf for this use: no downloads, and calibration data of inputs kept channels-first.

    For models with small fixed-batch 4-D inputs it downloads sample images from GitHub, used only when no data
    is passed (here: zeros instead). And it transposes the data of inputs it keeps channels-first as if they were
    channels-last; onnxruntime then rejects it and onnx2tf skips the shape estimation that checks its conversion.
    """
    import importlib

    from onnx2tf.ops import Input

    importlib.import_module("onnx2tf.onnx2tf").download_test_image_data = lambda: np.zeros((20, 128, 128, 3),
                                                                                           np.float32)
    make_node = Input.make_node

    def keeping(**kw: Any) -> Any:
        made = make_node(**kw)
        entry = kw["tf_layers_dict"].get(kw.get("subgraph_input_name", kw["graph_input"].name), {})
        if entry.get("ncw_nchw_ncdhw_keep"):
            entry["ncw_nchw_ncdhw_perm"] = None
        return made

    Input.make_node = keeping


def _log_lines(job: dict[str, Any]) -> list[str]:
    return Path(job["log"]).read_text(errors="replace").splitlines()


def _reason(exc: BaseException, model: Path, version: str) -> str:
    """onnx2tf's error, shortened to its point."""
    name = getattr(exc, "name", None) or ""
    if isinstance(exc, ModuleNotFoundError) and name.startswith("onnx2tf.ops."):
        return f"onnx2tf {version} cannot convert op {name.rsplit('.', 1)[1]} (not implemented)"
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    text = lines[0].removeprefix("ERROR:").strip()[:300] if lines else type(exc).__name__
    node = getattr(exc, "onnx_op_name", None)
    if node:
        import onnx

        ops = {n.name: n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
        return f"onnx2tf {version} failed on op {ops.get(node, node)} ({type(exc).__name__}: {text})"
    return f"onnx2tf {version} failed ({type(exc).__name__}: {text})"


def _check_all(out: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], rows: dict[str, np.ndarray],
               job: dict[str, Any], result: dict[str, Any]) -> None:
    """Name and check each file onnx2tf wrote; fp32 first, as it tells whether the conversion is right at all."""
    import onnxruntime as ort

    from edgerun.runtime import Runtime

    litert = Runtime(threads=1).backends.get("litert")
    avail = litert.availability() if litert is not None else None
    if avail is None or not avail.available:
        result["error"] = f"the litert backend cannot check the converted files here ({avail or 'not installed'})"
        return
    sess = ort.InferenceSession(job["source"], providers=["CPUExecutionProvider"])
    n = len(next(iter(rows.values())))
    singles = [sess.run(None, {k: v[i:i + 1] for k, v in rows.items()}) for i in range(n)]
    ref = {s.name: np.concatenate([o[j] for o in singles]) for j, s in enumerate(outputs)}
    said = _said(_log_lines(job), " ({})")
    for vid, kind in KINDS.items():
        path = out / f"model_{kind}.tflite"
        if vid in result["skipped"]:
            continue
        if not path.is_file():
            if vid != "tflite-int8" or job["calibration"]:
                result["skipped"][vid] = f"onnx2tf wrote no {kind} model{said}"
            continue
        try:
            _rename(path, [s.name for s in inputs], [s.name for s in outputs])
            dev = _check(litert, path, inputs, outputs, rows, ref if vid == "tflite-fp32" else None)
        except _Unfit as exc:
            if vid == "tflite-fp32":  # the other files are the same graph
                result["error"] = f"onnx2tf's conversion does not keep the model: {exc}"
                return
            result["skipped"][vid] = str(exc)
            continue
        if dev is not None:
            result["info"]["fp32_max_deviation"] = dev
        result["files"][vid] = str(path.relative_to(Path(job["work"])))


def _aliases(name: str) -> set[str]:
    """The names onnx2tf may give an ONNX tensor (':' and a leading '/' are not allowed in TF names)."""
    safe = name.replace(":", "__")
    return {name, safe, re.sub("^/", "wa/", safe)}


def _rename(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Give the file's inputs and outputs the ONNX model's names: the tensors and the signature, if any."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    sig = model.signatureDefs[0] if model.signatureDefs else None

    def text(b: Any) -> str:
        return b.decode() if isinstance(b, bytes) else str(b)

    signature = (sig.inputs or []) + (sig.outputs or []) if sig else []
    signed = {t.tensorIndex: text(t.name) for t in signature}
    names: dict[int, str] = {}
    for i in graph.inputs:
        given = signed.get(i) or text(graph.tensors[i].name)
        found = [n for n in inputs if given in _aliases(n) or given == f"serving_default_{n}:0"]
        if len(found) != 1:
            raise _Unfit(f"cannot tell which ONNX input the TFLite input {given!r} is (ONNX inputs {inputs})")
        names[i] = found[0]
    for i in graph.outputs:  # outputs are Identity, Identity_1... (no signature) or output_0, output_1...
        given = signed.get(i) or text(graph.tensors[i].name)
        m = re.fullmatch(r"(?:output_|Identity_?)(\d*)", given)
        k = int(m.group(1) or 0) if m else -1
        if not 0 <= k < len(outputs):
            raise _Unfit(f"cannot tell which ONNX output the TFLite output {given!r} is (ONNX outputs {outputs})")
        names[i] = outputs[k]
    if sorted(names.values()) != sorted(inputs + outputs):
        raise _Unfit(f"the TFLite inputs and outputs do not map one to one onto the ONNX model's ({names})")
    for i, name in names.items():
        graph.tensors[i].name = name
    for t in signature:
        t.name = names.get(t.tensorIndex, text(t.name))
    flatbuffer_utils.write_model(model, str(path))


def _check(litert: Any, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], rows: dict[str, np.ndarray],
           ref: dict[str, np.ndarray] | None) -> float | None:
    """Load ``path`` on LiteRT like a device: the interface must be the ONNX model's, each row must run alone and
    all together; with ``ref`` (onnxruntime's outputs), return the largest deviation from them (raise if large)."""
    from edgerun.backend import LoadOptions

    session = litert.load(path, LoadOptions(threads=1))
    try:
        for kind, want, got in (("input", inputs, session.inputs), ("output", outputs, session.outputs)):
            have = {s.name: s for s in got}
            if sorted(have) != sorted(s.name for s in want):
                raise _Unfit(f"its {kind}s are {sorted(have)}, the ONNX model's {sorted(s.name for s in want)}")
            for s in want:
                g = have[s.name]
                if (g.datatype, g.shape) != (s.datatype, s.shape):
                    last = len(s.shape) >= 3 and g.shape == (s.shape[0], *s.shape[2:], s.shape[1])
                    raise _Unfit(f"{kind} {s.name!r} is {g.datatype} {list(g.shape)} in TFLite, {s.datatype} "
                                 f"{list(s.shape)} in ONNX" + (" (onnx2tf's channels-last layout)" if last else ""))
        n = len(next(iter(rows.values())))
        batches = [{k: v[i:i + 1] for k, v in rows.items()} for i in range(n)]
        if n > 1 and all(s.shape and s.shape[0] == -1 for s in inputs):
            batches.append(rows)
        try:
            got = [session.run(b) for b in batches]
        except Exception as exc:
            raise _Unfit(f"LiteRT cannot run it on a batch of {n}: {exc}") from None
        for s in outputs:
            for b, g in zip(batches, got):
                size = len(next(iter(b.values())))
                if g[s.name].shape[:1] != (size,) and s.shape[:1] == (-1,):
                    raise _Unfit(f"output {s.name!r} is {list(g[s.name].shape)} for a batch of {size}")
        if ref is None:
            return None
        dev = 0.0
        for s in outputs:
            mine, want = np.concatenate([g[s.name] for g in got[:n]]), ref[s.name]
            close = mine.shape == want.shape and np.allclose(mine, want, rtol=1e-3,
                                                             atol=1e-3 * max(1.0, float(np.max(np.abs(want)))))
            if not close:
                if want.ndim >= 3 and mine.shape == np.moveaxis(want, 1, -1).shape and np.allclose(
                        mine, np.moveaxis(want, 1, -1), rtol=1e-3, atol=1e-3):
                    raise _Unfit(f"output {s.name!r} comes out channels-last (onnx2tf's layout), the ONNX "
                                 f"model's is channels-first")
                diff = float(np.max(np.abs(mine - want))) if mine.shape == want.shape else float("nan")
                raise _Unfit(f"output {s.name!r} differs from onnxruntime's (max deviation {diff:.3g})")
            dev = max(dev, float(np.max(np.abs(mine.astype(np.float64) - want))) if mine.dtype.kind == "f" else 0.0)
            if len(got) > n and not np.allclose(got[-1][s.name], mine, rtol=1e-4, atol=1e-5):
                raise _Unfit(f"output {s.name!r} on a batch of {n} differs from the same rows one at a time")
        return dev
    finally:
        session.close()


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    result = _child(job)
    (Path(job["work"]) / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
