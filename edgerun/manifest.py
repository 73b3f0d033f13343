"""Release manifests: parse, check, sign and verify (Ed25519 over canonical JSON), trusted keys, expiry."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgerun.errors import EdgerunError, ManifestError

if TYPE_CHECKING:  # imported by parse(): a hub that only signs and digests releases does not load numpy
    from edgerun.package import ModelPackage, Variant

log = logging.getLogger(__name__)

SCHEMA = "edgerun.release/1"
OLD_FORMATS = ("onnx", "openvino", "tflite")  # the only variant formats a device before contract 1.2 accepts
SIGNATURE_ALG = "ed25519"
_TOP_KEYS = {"schema", "model", "version", "created", "expires", "package", "variants", "signature"}


@dataclass(frozen=True)
class Manifest:
    """A checked, signed release of one model version with the variants a device may choose from."""

    model: str
    version: int
    created: str
    expires: str | None
    package: ModelPackage  # the package with every variant of the release, not on disk
    key_id: str
    digest: str  # sha256 of the canonical JSON including the signature: tells two publishes apart
    raw: dict[str, Any]

    @property
    def variants(self) -> list[Variant]:
        return self.package.variants


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: the manifest without ``signature``, keys sorted, no spaces."""
    return _canonical({k: v for k, v in obj.items() if k != "signature"})


def sign(obj: Mapping[str, Any], key: Ed25519PrivateKey, key_id: str) -> dict[str, Any]:
    """A copy of ``obj`` with its Ed25519 ``signature`` member."""
    value = base64.b64encode(key.sign(canonical_json(obj))).decode()
    return {**{k: v for k, v in obj.items() if k != "signature"},
            "signature": {"alg": SIGNATURE_ALG, "key_id": key_id, "value": value}}


def verify_signature(obj: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """Check the signature against the trusted keys; returns the key id, or raises ManifestError."""
    sig = obj.get("signature")
    if not isinstance(sig, dict):
        raise ManifestError("unsigned manifest: no 'signature' member")
    if sig.get("alg") != SIGNATURE_ALG:
        raise ManifestError(f"unsupported signature algorithm {sig.get('alg')!r}; expected {SIGNATURE_ALG!r}")
    key_id = sig.get("key_id")
    if not isinstance(key_id, str) or key_id not in trusted:
        raise ManifestError(f"signed by unknown key {key_id!r}; trusted keys: {sorted(trusted) or 'none'}")
    try:
        raw = base64.b64decode(str(sig.get("value", "")), validate=True)
        trusted[key_id].verify(raw, canonical_json(obj))
    except (InvalidSignature, ValueError):
        raise ManifestError(f"bad signature (key {key_id!r}): the manifest was altered or signed by another key") \
            from None
    return key_id


def parse(payload: bytes, trusted: Mapping[str, Ed25519PublicKey], *, topic_model: str | None = None,
          now: dt.datetime | None = None, clock_skew: float = 300) -> Manifest:
    """Decode, verify the signature, then check the content; every failure is a ManifestError saying why."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"malformed manifest: not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"malformed manifest: expected a JSON object, got {type(obj).__name__}")
    key_id = verify_signature(obj, trusted)
    return check(obj, key_id, topic_model=topic_model, now=now, clock_skew=clock_skew)


def check(obj: dict[str, Any], key_id: str, *, topic_model: str | None = None, now: dt.datetime | None = None,
          clock_skew: float = 300) -> Manifest:
    """Check a manifest whose signature is already verified."""
    if obj.get("schema") != SCHEMA:
        raise ManifestError(f"incompatible manifest: schema {obj.get('schema')!r}, this device reads {SCHEMA!r}")
    unknown = set(obj) - _TOP_KEYS
    if unknown:
        raise ManifestError(f"malformed manifest: unknown member(s) {sorted(unknown)}")
    model, version = obj.get("model"), obj.get("version")
    if not isinstance(model, str) or not model:
        raise ManifestError("malformed manifest: 'model' must be a non-empty string")
    if topic_model is not None and model != topic_model:
        raise ManifestError(f"manifest for model {model!r} published on the topic of {topic_model!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"malformed manifest: 'version' must be a positive integer, got {version!r}")
    created = obj.get("created")
    if not isinstance(created, str):
        raise ManifestError("malformed manifest: 'created' must be an ISO 8601 time")
    _parse_time(created, "created")
    expires = obj.get("expires")
    if expires is not None:
        if not isinstance(expires, str):
            raise ManifestError("malformed manifest: 'expires' must be an ISO 8601 time or null")
        when = _parse_time(expires, "expires")
        now = now or dt.datetime.now(dt.timezone.utc)
        if now - dt.timedelta(seconds=clock_skew) > when:
            raise ManifestError(f"manifest expired at {expires} (device time {now.isoformat(timespec='seconds')}, "
                                f"clock-skew allowance {clock_skew:g}s)")
    pkg_data, variants = obj.get("package"), obj.get("variants")
    if not isinstance(pkg_data, dict):
        raise ManifestError("malformed manifest: 'package' must be an object")
    if not isinstance(variants, list) or not variants:
        raise ManifestError("malformed manifest: 'variants' must be a non-empty list")
    missing = [k for k in ("name", "version") if pkg_data.get(k) is None]
    if missing:
        raise ManifestError(f"malformed manifest: its 'package' has no {' and no '.join(repr(k) for k in missing)} "
                            f"(it must name {model!r} v{version})")
    if pkg_data.get("name") != model or pkg_data.get("version") != version:
        raise ManifestError(f"manifest names {model!r} v{version} but its package is "
                            f"{pkg_data.get('name')!r} v{pkg_data.get('version')!r}")
    from edgerun.package import ModelPackage

    try:
        pkg = ModelPackage.from_dict({**pkg_data, "variants": variants}, source="release manifest")
    except EdgerunError as exc:
        raise ManifestError(f"incompatible manifest: {exc}") from None
    for v in pkg.variants:
        for f in v.files:
            src = f.source or {"mqtt": True}
            if not src.get("mqtt") and not src.get("url"):
                raise ManifestError(f"malformed manifest: file {f.path!r} of {v.id!r} has no source (mqtt or url)")
            if src.get("mqtt") and not f.chunk_size:
                raise ManifestError(f"malformed manifest: file {f.path!r} of {v.id!r} has no chunk_size")
    return Manifest(model, version, created, expires, pkg, key_id, digest(obj), obj)


def digest(obj: Mapping[str, Any]) -> str:
    """Identifies one publish of a release: sha256 of the canonical JSON including the signature."""
    return hashlib.sha256(_canonical(obj)).hexdigest()


def contract_needed(obj: Mapping[str, Any]) -> str:
    """The oldest contract version whose devices take this manifest: "1.3" when a file is encrypted, "1.2" when
    it carries a member that 1.2 added (a device refuses members it does not know), else "1.0"."""
    pkg = obj.get("package") if isinstance(obj.get("package"), dict) else {}
    variants = [v for v in obj.get("variants") or [] if isinstance(v, dict)]
    if any(isinstance(f, dict) and "encryption" in f for v in variants for f in v.get("files") or []):
        return "1.3"
    if "validation" in pkg or any("failed" in v or "info" in v or v.get("format") not in OLD_FORMATS
                                  or any(isinstance(m, dict) and "latency_err_ms" in m
                                         for m in (v.get("measured") or {}).values())
                                  for v in variants):
        return "1.2"
    return "1.0"


def payload_digest(payload: bytes) -> str:
    """The digest a Manifest gets for this payload; the plain sha256 of a payload that is not JSON."""
    try:
        return digest(json.loads(payload))
    except (ValueError, TypeError, AttributeError):
        return hashlib.sha256(payload).hexdigest()


def _parse_time(value: str, key: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(f"malformed manifest: {key!r} is not an ISO 8601 time: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- keys -----------------------------------------------------------------------------------------

def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or a file holding the raw 32 bytes in base64."""
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except ValueError as exc:
        raise EdgerunError(f"{path}: not an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgerunError(f"{path}: not an Ed25519 public key")
    return key


KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def read_trusted_keys(directory: Path) -> tuple[dict[str, Ed25519PublicKey], list[str]]:
    """Every ``<key_id>.pub`` in ``directory``, and a sentence for each file that is not a usable key."""
    keys: dict[str, Ed25519PublicKey] = {}
    problems: list[str] = []
    for p in sorted(Path(directory).glob("*.pub")):
        if not KEY_ID.match(p.stem):
            problems.append(f"{p}: the key id {p.stem!r} (the file name without .pub) must be letters, digits, "
                            f"'.', '_' or '-', at most 64")
            continue
        try:
            keys[p.stem] = load_public_key(p)
        except (OSError, EdgerunError) as exc:
            problems.append(str(exc) if str(p) in str(exc) else f"{p}: {exc}")
    return keys, problems


def load_trusted_keys(directory: Path | None) -> dict[str, Ed25519PublicKey]:
    """Every ``<key_id>.pub`` in ``directory``; an unreadable key is logged and skipped."""
    if directory is None or not Path(directory).is_dir():
        if directory is not None:
            log.warning("trusted keys directory %s does not exist: every release will be rejected", directory)
        return {}
    keys, problems = read_trusted_keys(Path(directory))
    for problem in problems:
        log.warning("skipping trusted key %s", problem)
    return keys


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The public half as PEM: what a device's ``<key_id>.pub`` holds."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise EdgerunError(f"{path}: cannot read the Ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgerunError(f"{path}: not an Ed25519 private key")
    return key
