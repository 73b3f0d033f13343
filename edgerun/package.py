"""Model packages: ``edgerun.toml`` plus variant files, read, checked and verified."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.errors import IntegrityError, PackageError
from edgerun.tensors import DATATYPE_TO_DTYPE, TensorSpec, dtype_of
from edgerun.tomlfile import Table, read_toml

PACKAGE_FILE = "edgerun.toml"
FORMAT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")  # which formats and precisions exist is up to the backends
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}  # the built-in precisions; backends bring more


def precision_bits(precision: str) -> int:
    """A precision's bits: a built-in one's, or what an installed backend declares (``Backend.precisions``);
    0 for a precision nothing here declares."""
    if precision in PRECISION_BITS:
        return PRECISION_BITS[precision]
    from edgerun.plugins import backend_classes

    for cls in backend_classes():
        bits = (getattr(cls, "precisions", None) or {}).get(precision)
        if isinstance(bits, int) and bits > 0:
            return bits
    return 0


def precision_rank(precision: str) -> int:
    """Lower is more precise (minus the bits); a precision no installed backend declares comes last."""
    return -precision_bits(precision)
ENCRYPTED_SUFFIX = ".age"
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Encryption:
    """How a file is encrypted (docs/protection.md): the scheme and the fingerprints of the keys it opens with."""

    scheme: str  # "age"
    recipients: tuple[str, ...]  # each key's fingerprint: 16 hex digits of the sha256 of its public key

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "recipients": list(self.recipients)}


@dataclass(frozen=True)
class FileEntry:
    """One file of a variant, with the size and sha256 it must have (an encrypted file's: of its ciphertext)."""

    path: str
    sha256: str
    size: int
    chunk_size: int | None = None
    source: dict[str, Any] | None = None
    encryption: Encryption | None = None

    @property
    def clear_path(self) -> str:
        """The file's name once decrypted: an encrypted ``model.onnx.age`` is ``model.onnx`` to a backend."""
        return self.path.removesuffix(ENCRYPTED_SUFFIX) if self.encryption else self.path


@dataclass(frozen=True)
class Measurement:
    """What the hub measured for a variant on one backend."""

    latency_ms: float | None = None
    memory_bytes: int | None = None
    accuracy: float | None = None
    latency_err_ms: float | None = None  # how far the latency moved between the hub's timing processes


@dataclass(frozen=True)
class Variant:
    """One way of running the model: a format, a precision and its files."""

    id: str
    format: str
    precision: str
    files: tuple[FileEntry, ...]
    accuracy: float | None = None
    memory_bytes: int | None = None
    atol: float = 1e-3
    rtol: float = 1e-3
    measured: dict[str, Measurement] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # backend -> why the hub could not run it there
    info: dict[str, Any] = field(default_factory=dict)  # how it was made and validated (int8 settings, CPUs)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def main_file(self) -> FileEntry:
        """The file a backend loads (an OpenVINO IR's .xml; its .bin sits beside it)."""
        for f in self.files:
            if f.clear_path.endswith(".xml"):
                return f
        return self.files[0]

    @property
    def encrypted(self) -> bool:
        return any(f.encryption is not None for f in self.files)

    @property
    def recipients(self) -> frozenset[str]:
        """The key fingerprints every encrypted file of the variant opens with (empty when it is clear)."""
        sets = [set(f.encryption.recipients) for f in self.files if f.encryption is not None]
        return frozenset(set.intersection(*sets)) if sets else frozenset()

    @property
    def precision_rank(self) -> int:
        """Lower is more precise (see ``precision_rank``)."""
        return precision_rank(self.precision)


@dataclass(frozen=True)
class Sample:
    """Warm-up inputs and, optionally, the outputs they must produce."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


@dataclass(frozen=True)
class Validation:
    """A few validation examples and the fp32 model's top-1 on each: a device checks a quantized variant with them
    before serving it (its agreement with fp32 here must be close to what the hub measured)."""

    inputs: dict[str, np.ndarray]  # examples along the first axis
    top1: np.ndarray  # the fp32 model's class per example

    def __len__(self) -> int:
        return len(self.top1)

    def rows(self) -> list[dict[str, np.ndarray]]:
        return [{k: v[i:i + 1] for k, v in self.inputs.items()} for i in range(len(self))]


@dataclass
class ModelPackage:
    """A model with its interface, samples and variants, rooted at a directory (or not yet on disk)."""

    name: str
    version: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: list[Variant]
    samples: list[Sample] = field(default_factory=list)
    validation: Validation | None = None
    description: str = ""
    root: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    model_file: Path | None = None  # set when the package is a bare model file, with no edgerun.toml (edgerun.bare)

    @classmethod
    def load(cls, root: str | Path) -> "ModelPackage":
        """Read and check ``root/edgerun.toml``."""
        root = Path(root)
        if root.is_file() and root.name == PACKAGE_FILE:
            root = root.parent
        toml_path = root / PACKAGE_FILE
        if not root.is_dir():
            raise PackageError(f"{root}: not a model package directory")
        if not toml_path.is_file():
            raise PackageError(f"{root}: no {PACKAGE_FILE} (is this a model package directory?)")
        data = read_toml(toml_path, PackageError)
        return cls.from_dict(data, root=root, source=str(toml_path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path | None = None, source: str | None = None) -> "ModelPackage":
        """Build a package from its edgerun.toml content (also the ``package`` of a release manifest)."""
        t = Table(data, source, error=PackageError)
        t.only("name", "version", "description", "inputs", "outputs", "samples", "variants", "validation")
        name = t.get("name", str, required=True)
        if not name or "/" in name or name.startswith("."):
            raise t.fail("name", f"expected a model name without '/', got {name!r}")
        version = t.get("version", int, required=True)
        if version < 1:
            raise t.fail("version", f"expected a positive integer, got {version}")
        inputs = [_tensor_spec(x) for x in t.tables("inputs", required=True)]
        outputs = [_tensor_spec(x) for x in t.tables("outputs", required=True)]
        if not inputs or not outputs:
            raise t.fail("inputs" if not inputs else "outputs", "expected at least one tensor")
        variants = [_variant(v) for v in t.tables("variants")]
        ids = [v.id for v in variants]
        if len(set(ids)) != len(ids):
            raise t.fail("variants", f"variant ids must be unique, got {ids}")
        samples = [_sample(s, inputs, outputs) for s in t.tables("samples")]
        validation = _validation(t.table("validation"), inputs) if "validation" in t.data else None
        return cls(name=name, version=version, inputs=inputs, outputs=outputs, variants=variants,
                   samples=samples, validation=validation, description=t.get("description", str, ""), root=root,
                   raw=data)

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise PackageError(f"package {self.name!r} has no variant {variant_id!r}; it has {[v.id for v in self.variants]}")

    def path_of(self, entry: FileEntry) -> Path:
        if self.root is None:
            raise PackageError(f"package {self.name!r} has no directory on disk")
        return self.root / entry.path

    def verify(self, variant: Variant) -> None:
        """Check that every file of ``variant`` is present with the recorded size and sha256."""
        for entry in variant.files:
            verify_file(self.path_of(entry), entry)


def verify_file(path: Path, entry: FileEntry) -> None:
    """Raise IntegrityError unless ``path`` has ``entry``'s size and sha256."""
    if not path.is_file():
        raise IntegrityError(f"{path}: file missing (variant file {entry.path!r})")
    size = path.stat().st_size
    if size != entry.size:
        raise IntegrityError(f"{path}: size {size} bytes, expected {entry.size}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise IntegrityError(f"{path}: sha256 {digest}, expected {entry.sha256}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_spec(t: Table) -> TensorSpec:
    t.only("name", "datatype", "shape")
    datatype = t.get("datatype", str, required=True)
    if datatype not in DATATYPE_TO_DTYPE:
        raise t.fail("datatype", f"expected one of {', '.join(DATATYPE_TO_DTYPE)}, got {datatype!r}")
    shape = t.list_of("shape", int)
    if any(d < -1 or d == 0 for d in shape):
        raise t.fail("shape", f"dimensions must be positive or -1 (dynamic), got {shape}")
    return TensorSpec(t.get("name", str, required=True), datatype, tuple(shape))


def _variant(t: Table) -> Variant:
    t.only("id", "format", "precision", "files", "accuracy", "memory_bytes", "atol", "rtol", "measured",
           "latency_ms", "failed", "info")
    fmt = t.get("format", str, required=True)
    if not FORMAT_NAME.match(fmt):
        raise t.fail("format", f"expected a format name such as onnx, openvino or tflite, got {fmt!r}")
    precision = t.get("precision", str, required=True)
    if not FORMAT_NAME.match(precision):
        raise t.fail("precision", f"expected a precision name such as {', '.join(PRECISION_BITS)}, got {precision!r}")
    files = []
    for f in t.tables("files", required=True):
        f.only("path", "sha256", "size", "chunk_size", "source", "encryption")
        path = f.get("path", str, required=True)
        if path.startswith("/") or ".." in Path(path).parts:
            raise f.fail("path", f"expected a relative path inside the package, got {path!r}")
        encryption = _encryption(f.table("encryption")) if "encryption" in f.data else None
        if (encryption is not None) != path.endswith(ENCRYPTED_SUFFIX):
            raise f.fail("path", f"{path!r}: an encrypted file's path ends in {ENCRYPTED_SUFFIX} and has an "
                                 f"'encryption' table; a clear file's has neither")
        sha = f.get("sha256", str, required=True).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise f.fail("sha256", f"expected 64 hex digits, got {sha!r}")
        size = f.get("size", int, required=True)
        chunk = f.get("chunk_size", int, None)
        if size < 0 or (chunk is not None and chunk <= 0):
            raise f.fail("size" if size < 0 else "chunk_size", "expected a positive integer")
        files.append(FileEntry(path, sha, size, chunk, f.get("source", dict, None), encryption))
    if not files:
        raise t.fail("files", "expected at least one file")
    measured = {}
    m = t.table("measured")
    for backend in m.data:
        b = m.table(backend)
        b.only("latency_ms", "memory_bytes", "accuracy", "latency_err_ms")
        measured[backend] = Measurement(b.get("latency_ms", float, None), b.get("memory_bytes", int, None),
                                        b.get("accuracy", float, None), b.get("latency_err_ms", float, None))
    failed = t.get("failed", dict, {})
    for backend, why in failed.items():
        if not isinstance(why, str):
            raise t.fail(f"failed.{backend}", f"expected the reason as a string, got {why!r}")
    return Variant(id=t.get("id", str, required=True), format=fmt, precision=precision, files=tuple(files),
                   accuracy=t.get("accuracy", float, None), memory_bytes=t.get("memory_bytes", int, None),
                   atol=t.get("atol", float, 1e-3), rtol=t.get("rtol", float, 1e-3), measured=measured,
                   failed=dict(failed), info=t.get("info", dict, {}))


def _encryption(t: Table) -> Encryption:
    t.only("scheme", "recipients")
    scheme = t.get("scheme", str, required=True)
    if scheme != "age":
        raise t.fail("scheme", f"expected \"age\" (the only scheme this device reads), got {scheme!r}")
    recipients = t.list_of("recipients", str)
    if not recipients or any(not FINGERPRINT.match(r) for r in recipients):
        raise t.fail("recipients", "expected the fingerprints (16 hex digits) of the keys the file is encrypted to")
    return Encryption(scheme, tuple(recipients))


def _sample(t: Table, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Sample:
    t.only("inputs", "expected")
    ins = {spec.name: spec for spec in inputs}
    outs = {spec.name: spec for spec in outputs}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for part, specs in (("inputs", ins), ("expected", outs)):
        table = t.table(part, required=(part == "inputs"))
        arrays[part] = {}
        for name in table.data:
            if name not in specs:
                raise table.fail(name, f"not a model {'input' if part == 'inputs' else 'output'}; expected one of {sorted(specs)}")
            arrays[part][name] = decode_array(table.table(name))
    missing = set(ins) - set(arrays["inputs"])
    if missing:
        raise t.fail("inputs", f"sample lacks inputs {sorted(missing)}")
    return Sample(arrays["inputs"], arrays["expected"])


def _validation(t: Table, inputs: list[TensorSpec]) -> Validation:
    t.only("inputs", "top1")
    arrays = {}
    table = t.table("inputs", required=True)
    names = {s.name for s in inputs}
    for name in table.data:
        if name not in names:
            raise table.fail(name, f"not a model input; expected one of {sorted(names)}")
        arrays[name] = decode_array(table.table(name))
    if set(arrays) != names:
        raise t.fail("inputs", f"expected an array for every input {sorted(names)}")
    top1 = np.asarray(t.list_of("top1", int), np.int64)
    if any(len(a) != len(top1) for a in arrays.values()):
        raise t.fail("top1", f"expected one class per example ({len(next(iter(arrays.values())))}), got {len(top1)}")
    return Validation(arrays, top1)


def decode_array(t: Table) -> np.ndarray:
    """A tensor written as {datatype, shape, data=[...]} or {datatype, shape, b64="..."} (little-endian)."""
    t.only("datatype", "shape", "data", "b64")
    try:
        dtype = dtype_of(t.get("datatype", str, required=True))
    except ValueError as exc:
        raise t.fail("datatype", str(exc)) from None
    shape = tuple(t.list_of("shape", int))
    count = int(np.prod(shape)) if shape else 1
    if "b64" in t.data:
        raw = base64.b64decode(t.get("b64", str))
        arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    else:
        arr = np.asarray(t.get("data", list, required=True), dtype=dtype)
    if arr.size != count:
        raise t.fail(None, f"has {arr.size} elements, shape {list(shape)} needs {count}")
    return arr.astype(dtype).reshape(shape)


def encode_array(arr: np.ndarray, inline_limit: int = 16) -> dict[str, Any]:
    """The TOML/JSON form of a tensor: a data list when small, else base64 of its little-endian bytes."""
    from edgerun.tensors import datatype_of

    out: dict[str, Any] = {"datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
    if arr.size <= inline_limit:
        out["data"] = arr.reshape(-1).tolist()
    else:
        out["b64"] = base64.b64encode(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()).decode()
    return out


def variant_to_dict(v: Variant) -> dict[str, Any]:
    """The edgerun.toml / manifest form of a variant."""
    d: dict[str, Any] = {"id": v.id, "format": v.format, "precision": v.precision, "files": []}
    for f in v.files:
        fd: dict[str, Any] = {"path": f.path, "sha256": f.sha256, "size": f.size}
        if f.chunk_size is not None:
            fd["chunk_size"] = f.chunk_size
        if f.source is not None:
            fd["source"] = f.source
        if f.encryption is not None:
            fd["encryption"] = f.encryption.to_dict()
        d["files"].append(fd)
    for key in ("accuracy", "memory_bytes"):
        if getattr(v, key) is not None:
            d[key] = getattr(v, key)
    d["atol"], d["rtol"] = v.atol, v.rtol
    if v.measured:
        d["measured"] = {b: {k: val for k, val in (("latency_ms", m.latency_ms), ("memory_bytes", m.memory_bytes),
                                                    ("accuracy", m.accuracy), ("latency_err_ms", m.latency_err_ms))
                             if val is not None}
                         for b, m in v.measured.items()}
    if v.failed:
        d["failed"] = dict(v.failed)
    if v.info:
        d["info"] = v.info
    return d


def package_to_dict(pkg: ModelPackage) -> dict[str, Any]:
    """The edgerun.toml content of a package (also the ``package`` member of a release manifest)."""
    d: dict[str, Any] = {"name": pkg.name, "version": pkg.version}
    if pkg.description:
        d["description"] = pkg.description
    d["inputs"] = [s.to_dict() for s in pkg.inputs]
    d["outputs"] = [s.to_dict() for s in pkg.outputs]
    if pkg.samples:
        d["samples"] = [{"inputs": {k: encode_array(a) for k, a in s.inputs.items()},
                         **({"expected": {k: encode_array(a) for k, a in s.expected.items()}} if s.expected else {})}
                        for s in pkg.samples]
    if pkg.validation is not None:
        d["validation"] = {"inputs": {k: encode_array(a) for k, a in pkg.validation.inputs.items()},
                           "top1": [int(x) for x in pkg.validation.top1]}
    d["variants"] = [variant_to_dict(v) for v in pkg.variants]
    return d


def file_entry(root: Path, rel: str) -> FileEntry:
    """A FileEntry for ``root/rel`` with its real size and sha256."""
    p = root / rel
    return FileEntry(rel, sha256_file(p), p.stat().st_size)


def save_package(pkg: ModelPackage, root: str | Path) -> Path:
    """Write ``root/edgerun.toml`` atomically."""
    import os
    import tempfile

    import tomli_w

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = tomli_w.dumps(package_to_dict(pkg))
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".edgerun.toml.")
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # readable by a service user, like the model files beside it
    os.replace(tmp, root / PACKAGE_FILE)
    pkg.root = root
    return root / PACKAGE_FILE
