"""The age file format (age-encryption.org/v1) with X25519 recipients: keys, streaming encryption and decryption.

A reviewed format with interoperable tools (``age``, ``rage``, ``pyrage``), written here on ``cryptography``'s
primitives so a file is read and written in 64 KiB segments: memory stays bounded and a tampered segment is
reported where it is. docs/protection.md says why age and what the device does with it.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import mmap
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgerun.errors import DecryptError, EdgerunError

INTRO = b"age-encryption.org/v1\n"
SEGMENT = 64 << 10  # plaintext bytes per STREAM segment
TAG = 16
CIPHER_SEGMENT = SEGMENT + TAG
NONCE = 16  # the payload's random nonce, after the header
MAX_HEADER = 4 << 20  # about 40,000 X25519 recipients
X25519_LABEL = b"age-encryption.org/v1/X25519"
_RAW = serialization.Encoding.Raw
_ZERO_NONCE = bytes(12)
RANGE_SEGMENTS = 16  # segments (1 MiB) one thread decrypts at a time when a file is decrypted on several cores
MAX_THREADS = 4


# --- keys ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipient:
    """An X25519 public key, written ``age1...``: what a file is encrypted to."""

    key: bytes  # 32 bytes

    @classmethod
    def parse(cls, text: str) -> "Recipient":
        """An ``age1...`` key; the error never repeats the text (a secret key pasted by mistake stays unprinted)."""
        text = text.strip()
        if text.upper().startswith("AGE-SECRET-KEY-"):
            raise EdgerunError("that is a secret key (AGE-SECRET-KEY-1...); give the public key, age1... "
                               "(`edgerun device key` prints it)")
        try:
            hrp, data = bech32_decode(text)
        except ValueError as exc:
            raise EdgerunError(f"not an age recipient (age1..., 62 characters): {exc}") from None
        if hrp != "age" or len(data) != 32 or text != text.lower():
            raise EdgerunError("not an age X25519 recipient (age1..., 62 characters)")
        return cls(data)

    def __str__(self) -> str:
        return bech32_encode("age", self.key)

    @property
    def fingerprint(self) -> str:
        """What a manifest names a recipient by: the first 16 hex digits of the sha256 of the public key."""
        return fingerprint(self.key)


@dataclass(frozen=True)
class Identity:
    """An X25519 private key, written ``AGE-SECRET-KEY-1...``: what opens a file encrypted to its recipient."""

    key: bytes  # 32 bytes

    @classmethod
    def generate(cls) -> "Identity":
        return cls(X25519PrivateKey.generate().private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                                            serialization.NoEncryption()))

    @classmethod
    def parse(cls, text: str) -> "Identity":
        text = text.strip()
        try:
            hrp, data = bech32_decode(text)
        except ValueError as exc:
            raise EdgerunError(f"not an age identity: {exc}") from None
        if hrp != "age-secret-key-" or len(data) != 32 or text != text.upper():
            raise EdgerunError("not an age X25519 identity (AGE-SECRET-KEY-1...)")
        return cls(data)

    def __str__(self) -> str:
        return bech32_encode("age-secret-key-", self.key).upper()

    def __repr__(self) -> str:
        return f"Identity(recipient={self.recipient})"  # never the secret

    @property
    def recipient(self) -> Recipient:
        private = X25519PrivateKey.from_private_bytes(self.key)
        return Recipient(private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def read_identities(text: str, source: str) -> list[Identity]:
    """Every identity of an age identity file (``age-keygen``'s format: ``#`` comments, one key a line)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(Identity.parse(line))
        except EdgerunError:
            raise EdgerunError(f"{source}, line {n}: not an age identity (AGE-SECRET-KEY-1...)") from None
    if not out:
        raise EdgerunError(f"{source}: no age identity (AGE-SECRET-KEY-1...) in it")
    return out


def identity_file(identity: Identity, created: str) -> str:
    """The text of an identity file, as ``age-keygen`` writes it."""
    return f"# created: {created}\n# public key: {identity.recipient}\n{identity}\n"


# --- bech32 (BIP 173), as age encodes its keys ---------------------------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert(data: Iterable[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or (acc << (tobits - bits)) & maxv):
        raise ValueError("invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    five = _convert(data, 8, 5, True)
    chk = _polymod(_expand(hrp) + five + [0] * 6) ^ 1
    return hrp + "1" + "".join(_CHARSET[d] for d in five + [(chk >> 5 * (5 - i)) & 31 for i in range(6)])


def bech32_decode(text: str) -> tuple[str, bytes]:
    """(human-readable part, data) of a bech32 string in one case; ValueError when it is not one."""
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise ValueError("no separator or too short")
    hrp, rest = text[:pos], text[pos + 1:]
    if any(not 33 <= ord(c) <= 126 for c in hrp) or any(c not in _CHARSET for c in rest):
        raise ValueError("invalid character")
    values = [_CHARSET.index(c) for c in rest]
    if _polymod(_expand(hrp) + values) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_convert(values[:-6], 5, 8, False))


# --- primitives ----------------------------------------------------------------------------------

def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt or None, info).derive(ikm)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    """Canonical unpadded standard base64 (age's encoding), or DecryptError."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raw = None
    if raw is None or "=" in text or _b64(raw) != text:
        raise DecryptError(f"malformed age header: {what} is not canonical base64")
    return raw


def _stream_nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _wrap_key(shared: bytes, share: bytes, recipient: bytes) -> bytes:
    if shared == bytes(32):
        raise DecryptError("malformed age header: an X25519 share gives the all-zero secret")
    return _hkdf(shared, share + recipient, X25519_LABEL)


# --- the header ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stanza:
    """One recipient stanza of a header: ``-> type args...`` and its body."""

    args: tuple[str, ...]
    body: bytes

    def encode(self) -> bytes:
        b64 = _b64(self.body)
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append("")
        return ("-> " + " ".join(self.args) + "\n" + "\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Header:
    """A parsed age header: its stanzas, its MAC, and the bytes the MAC covers."""

    stanzas: tuple[Stanza, ...]
    mac: bytes
    covered: bytes  # the header up to and including "---"
    length: int  # bytes of the header in the file, its final newline included

    def x25519(self) -> list[Stanza]:
        return [s for s in self.stanzas if s.args[0] == "X25519"]


def _read_line(src: BinaryIO, used: int) -> bytes:
    line = src.readline(MAX_HEADER - used + 1)
    if not line.endswith(b"\n"):
        if used + len(line) > MAX_HEADER:
            raise DecryptError(f"malformed age header: longer than {MAX_HEADER >> 20} MiB")
        raise DecryptError("truncated: the file ends inside the age header")
    return line


def _vchar(arg: str) -> bool:
    return bool(arg) and all(0x21 <= ord(c) <= 0x7E for c in arg)


def read_header(src: BinaryIO) -> Header:
    """Parse the header at the start of ``src``, leaving it just past the header."""
    intro = src.read(len(INTRO))
    if intro != INTRO:
        raise DecryptError("not an age file: it does not start with 'age-encryption.org/v1'")
    covered = bytearray(intro)
    stanzas = []
    line = _read_line(src, len(covered))
    while line.startswith(b"-> "):
        covered += line
        try:
            args = tuple(line[3:-1].decode("ascii").split(" "))
        except UnicodeDecodeError:
            raise DecryptError("malformed age header: a stanza line is not ASCII") from None
        if not args or not all(_vchar(a) for a in args):
            raise DecryptError("malformed age header: a stanza has an empty or invalid argument")
        body = bytearray()
        while True:
            text = _read_line(src, len(covered))
            covered += text
            chunk = text[:-1].decode("ascii", "replace")
            if len(chunk) > 64:
                raise DecryptError("malformed age header: a stanza body line is longer than 64 columns")
            body += _unb64(chunk, "a stanza body")
            if len(chunk) < 64:
                break
        stanzas.append(Stanza(args, bytes(body)))
        line = _read_line(src, len(covered))
    if not line.startswith(b"--- "):
        raise DecryptError("malformed age header: expected a recipient stanza ('-> ...') or the MAC ('--- ...')")
    if not stanzas:
        raise DecryptError("malformed age header: no recipient stanza")
    mac = _unb64(line[4:-1].decode("ascii", "replace"), "the header MAC")
    if len(mac) != 32:
        raise DecryptError("malformed age header: the MAC is not 32 bytes")
    length = len(covered) + len(line)
    covered += b"---"
    return Header(tuple(stanzas), mac, bytes(covered), length)


def unwrap(header: Header, identities: Sequence[Identity]) -> bytes:
    """The file key: the first X25519 stanza one of ``identities`` opens, its header MAC checked."""
    stanzas = header.x25519()
    for s in stanzas:
        if len(s.args) != 2 or len(s.body) != 32:
            raise DecryptError("malformed age header: an X25519 stanza needs one 32-byte share and a 32-byte body")
    for identity in identities:
        private = X25519PrivateKey.from_private_bytes(identity.key)
        mine = identity.recipient.key
        for s in stanzas:
            share = _unb64(s.args[1], "an X25519 share")
            if len(share) != 32:
                raise DecryptError("malformed age header: an X25519 share is not 32 bytes")
            key = _wrap_key(private.exchange(X25519PublicKey.from_public_bytes(share)), share, mine)
            try:
                file_key = ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, s.body, None)
            except InvalidTag:
                continue
            if len(file_key) != 16:
                raise DecryptError("malformed age header: the file key is not 16 bytes")
            mac = hmac.new(_hkdf(file_key, b"", b"header"), header.covered, hashlib.sha256).digest()
            if not hmac.compare_digest(mac, header.mac):
                raise DecryptError("the age header's MAC does not match: the header was altered")
            return file_key
    mine = ", ".join(i.recipient.fingerprint for i in identities) or "none"
    raise DecryptError(f"no key of this device opens the file: it is encrypted to {len(stanzas)} X25519 "
                       f"recipient(s), none of them this device's key (fingerprint {mine})")


# --- decryption ----------------------------------------------------------------------------------

def clear_size(payload: int) -> int:
    """Plaintext bytes of a STREAM payload of ``payload`` bytes (after the nonce); DecryptError when impossible."""
    segments = max(1, -(-payload // CIPHER_SEGMENT))
    size = payload - TAG * segments
    if size < 0 or (payload % CIPHER_SEGMENT and payload % CIPHER_SEGMENT < TAG) \
            or (segments > 1 and payload % CIPHER_SEGMENT == TAG):
        raise DecryptError(f"truncated: a payload of {payload} bytes cannot end a segment")
    return size


class Decryptor:
    """Reads one age file's payload segment by segment, each authenticated before its bytes are used."""

    def __init__(self, src: BinaryIO, identities: Sequence[Identity], *, total: int | None = None):
        """``total``: the file's size when known (a file on disk), so the clear size is known before reading."""
        self._src = src
        self.header = read_header(src)
        self._file_key = unwrap(self.header, identities)
        nonce = src.read(NONCE)
        if len(nonce) != NONCE:
            raise DecryptError("truncated: the file ends before the payload's nonce")
        self._aead = ChaCha20Poly1305(_hkdf(self._file_key, nonce, b"payload"))
        self._payload_at = self.header.length + NONCE
        self._payload = None if total is None else total - self._payload_at
        self.size = None if self._payload is None else clear_size(self._payload)
        self._scratch = threading.local()  # each decrypting thread's buffers, reused from range to range

    def segments(self) -> Iterator[tuple[int, memoryview, bool]]:
        """(index, ciphertext segment, is last) in order, reading one byte ahead to know the last one; each view
        is valid until the next (one reused buffer)."""
        buf = bytearray(CIPHER_SEGMENT + 1)
        view = memoryview(buf)
        n, index = 0, 0
        while True:
            while n < CIPHER_SEGMENT + 1:  # a short read is not the end: fill up, or reach the end
                got = self._src.readinto(view[n:])
                if not got:
                    break
                n += got
            last = n <= CIPHER_SEGMENT
            length = n if last else CIPHER_SEGMENT
            if length < TAG:
                raise DecryptError(f"truncated: the file ends inside segment {index}, before its tag")
            if last and length == TAG and index > 0:
                raise DecryptError(f"segment {index} is an empty final segment, which age allows only as the first")
            yield index, view[:length], last
            if last:
                return
            buf[0] = buf[CIPHER_SEGMENT]
            n = 1
            index += 1

    def decrypt_segment(self, index: int, segment: memoryview, out: memoryview, last: bool) -> int:
        """Authenticate and decrypt one segment into the start of ``out``; returns the plaintext length."""
        size = len(segment) - TAG
        where = f"segment {index} (plaintext bytes {index * SEGMENT}-{index * SEGMENT + max(size, 1) - 1})"
        try:
            return self._aead.decrypt_into(_stream_nonce(index, last), segment, None, out[:size])
        except InvalidTag:
            pass
        if last:  # a segment that opens as a middle one: the file was cut after it
            try:
                self._aead.decrypt(_stream_nonce(index, False), bytes(segment), None)
                raise DecryptError(f"truncated: the file ends after {where}, which is not its last segment")
            except InvalidTag:
                pass
        raise DecryptError(f"{where} does not authenticate: the ciphertext or its tag was altered")

    def read_all(self) -> Iterator[memoryview]:
        """Every segment's plaintext, in order (each view valid until the next)."""
        out = memoryview(bytearray(SEGMENT))
        for index, segment, last in self.segments():
            yield out[:self.decrypt_segment(index, segment, out, last)]

    def ranges(self) -> list[tuple[int, int]]:
        """The payload as (first segment, count) ranges of RANGE_SEGMENTS, for a file of known size."""
        if self._payload is None:
            raise ValueError("the file's size is not known")
        segments = max(1, -(-self._payload // CIPHER_SEGMENT))
        return [(first, min(RANGE_SEGMENTS, segments - first)) for first in range(0, segments, RANGE_SEGMENTS)]

    def decrypt_range(self, fd: int, first: int, count: int, out: memoryview | None) -> int:
        """Read segments ``first``.. ``first + count - 1`` at their offsets in the file ``fd`` (of the size given
        at construction) and decrypt them into the start of ``out`` (or only authenticate them: None); returns the
        plaintext length. Several threads may decrypt ranges of one file at once (the cipher releases the GIL); each
        reads into a buffer of its own that it reuses, so a range costs no allocation."""
        assert self._payload is not None
        last_index = max(1, -(-self._payload // CIPHER_SEGMENT)) - 1
        at = first * CIPHER_SEGMENT
        length = min(count * CIPHER_SEGMENT, self._payload - at)
        view = self._buffer("cipher", max(count, RANGE_SEGMENTS) * CIPHER_SEGMENT)[:length]
        if out is None:
            out = self._buffer("clear", max(count, RANGE_SEGMENTS) * SEGMENT)
        got = 0
        while got < length:  # a regular file reads whole; a short read is retried, an early end is an error
            n = os.preadv(fd, [view[got:]], self._payload_at + at + got)
            if not n:
                raise DecryptError(f"truncated: the file shrank while it was read (segment {first})")
            got += n
        done = 0
        for k in range(count):
            index = first + k
            done += self.decrypt_segment(index, view[k * CIPHER_SEGMENT:(k + 1) * CIPHER_SEGMENT], out[done:],
                                         index == last_index)
        return done

    def _buffer(self, name: str, size: int) -> memoryview:
        buf = getattr(self._scratch, name, None)
        if buf is None or len(buf) < size:
            buf = memoryview(bytearray(size))
            setattr(self._scratch, name, buf)
        return buf

    def read_parallel(self, fd: int, threads: int | None = None) -> Iterator[memoryview]:
        """Every range's plaintext in order, decrypted ahead on ``threads`` cores (by default this machine's, up to
        MAX_THREADS), at most two ranges per thread held at once; each view is valid until the next is taken (the
        buffers are reused, so a stream of any length allocates a few MiB once)."""
        threads = threads or decrypt_threads()
        ranges = self.ranges()
        if threads < 2 or len(ranges) < 2:
            out = memoryview(bytearray(RANGE_SEGMENTS * SEGMENT))
            for first, count in ranges:
                yield out[:self.decrypt_range(fd, first, count, out)]
            return

        depth = 2 * threads
        free = deque(memoryview(bytearray(RANGE_SEGMENTS * SEGMENT)) for _ in range(depth + 1))

        def one(first: int, count: int, out: memoryview) -> tuple[memoryview, int]:
            return out, self.decrypt_range(fd, first, count, out)

        with ThreadPoolExecutor(threads, thread_name_prefix="edgerun-decrypt") as pool:
            ahead: deque = deque()
            todo = iter(ranges)
            try:
                for first, count in todo:
                    ahead.append(pool.submit(one, first, count, free.popleft()))
                    if len(ahead) >= depth:
                        out, n = ahead.popleft().result()
                        yield out[:n]
                        free.append(out)  # the caller is done with it: it asked for the next
                while ahead:
                    out, n = ahead.popleft().result()
                    yield out[:n]
            finally:
                for fut in ahead:
                    fut.cancel()


def decrypt_threads() -> int:
    """Threads to decrypt one file with: this process's cores, up to MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


def anonymous_buffer(size: int) -> tuple[object, memoryview]:
    """A writable buffer of ``size`` bytes from an anonymous map: nothing is zeroed up front, each page is given
    (zeroed) by the kernel when first written, so threads that fill parts of it fault their own parts in parallel;
    freed when the last reference goes."""
    buf: object = mmap.mmap(-1, size) if size else bytearray()
    return buf, memoryview(buf)  # type: ignore[arg-type]


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype, _new_bytes.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_data = ctypes.pythonapi.PyBytes_AsString
_bytes_data.restype, _bytes_data.argtypes = ctypes.c_void_p, (ctypes.py_object,)


def bytes_buffer(size: int) -> tuple[object, memoryview]:
    """A new ``bytes`` object of ``size`` bytes and a writable view of its content, for a library that takes only
    ``bytes``: the C API's way of building one (``PyBytes_FromStringAndSize(NULL, n)``, filled, then shared), which
    spares zeroing it and copying a filled buffer into it. The caller fills it through the view before anything
    else sees the object, and drops the view."""
    obj = _new_bytes(None, size)
    if not size:
        return obj, memoryview(bytearray())
    return obj, memoryview((ctypes.c_char * size).from_address(_bytes_data(obj))).cast("B")


def decrypt_to_memory(path: Path, identities: Sequence[Identity], threads: int | None = None,
                      into: Callable[[int], tuple[object, memoryview]] = anonymous_buffer):
    """The clear content of the age file ``path``, decrypted into one buffer of its exact size made by ``into``
    (an anonymous map by default; ``bytes_buffer`` for ``bytes``), never on disk; its segments are decrypted, and
    the buffer's pages first touched, on several cores. The first segment (in order) that fails raises
    DecryptError."""
    with open(path, "rb") as f:
        fd = f.fileno()
        dec = Decryptor(f, identities, total=os.fstat(fd).st_size)
        out, view = into(dec.size or 0)
        try:
            ranges = dec.ranges()
            threads = min(threads or decrypt_threads(), len(ranges))
            if threads < 2:
                for first, count in ranges:
                    dec.decrypt_range(fd, first, count, view[first * SEGMENT:])
                return out
            with ThreadPoolExecutor(threads, thread_name_prefix="edgerun-decrypt") as pool:
                futures = [pool.submit(dec.decrypt_range, fd, first, count, view[first * SEGMENT:])
                           for first, count in ranges]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
            return out
        finally:
            view.release()


def check_file(path: Path, identities: Sequence[Identity]) -> tuple[str, DecryptError | None]:
    """Authenticate every segment of the age file ``path`` (the plaintext goes nowhere; ranges of segments on
    several cores) while hashing the whole file: (its sha256, the first decryption error or None)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        total = os.fstat(fd).st_size
        try:
            dec = Decryptor(f, identities, total=total)
        except DecryptError as exc:
            return _sha256_of(fd, digest), exc

        def authenticate(first: int, count: int) -> None:
            dec.decrypt_range(fd, first, count, None)

        ranges = dec.ranges()
        with ThreadPoolExecutor(min(decrypt_threads(), len(ranges)), thread_name_prefix="edgerun-check") as pool:
            futures = [pool.submit(authenticate, first, count) for first, count in ranges]
            sha256 = _sha256_of(fd, digest)  # hashed on this thread meanwhile
            error = None
            for fut in futures:
                try:
                    fut.result()
                except DecryptError as exc:
                    error = exc
                    break
            for fut in futures:
                fut.cancel()
    return sha256, error


def _sha256_of(fd: int, digest) -> str:
    buf = bytearray(1 << 20)
    view, at = memoryview(buf), 0
    while n := os.preadv(fd, [buf], at):
        digest.update(view[:n])
        at += n
    return digest.hexdigest()


class _Hashing:
    """A reader that hashes what it reads."""

    def __init__(self, src: BinaryIO, digest):
        self._src, self._digest = src, digest

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._digest.update(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self._src.readline(limit)
        self._digest.update(data)
        return data

    def readinto(self, buf) -> int:
        n = self._src.readinto(buf)
        self._digest.update(memoryview(buf)[:n])
        return n


def is_age(path: Path) -> bool:
    """True when the file starts like an age file."""
    with open(path, "rb") as f:
        return f.read(len(INTRO)) == INTRO


# --- encryption ----------------------------------------------------------------------------------

def header_for(recipients: Sequence[Recipient], file_key: bytes) -> bytes:
    """A header giving ``file_key`` to each recipient, one X25519 stanza each, with its MAC."""
    if not recipients:
        raise EdgerunError("encrypting needs at least one recipient")
    out = bytearray(INTRO)
    for r in recipients:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        key = _wrap_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(r.key)), share, r.key)
        out += Stanza(("X25519", _b64(share)), ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)).encode()
    out += b"---"
    mac = hmac.new(_hkdf(file_key, b"", b"header"), bytes(out), hashlib.sha256).digest()
    return bytes(out) + b" " + _b64(mac).encode() + b"\n"


def encrypt_stream(src: BinaryIO, dst: BinaryIO, recipients: Sequence[Recipient]) -> None:
    """Encrypt everything ``src`` holds to ``dst`` for every recipient (one stanza each), 64 KiB at a time."""
    file_key = os.urandom(16)
    nonce = os.urandom(NONCE)
    dst.write(header_for(recipients, file_key))
    dst.write(nonce)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    cur, nxt = bytearray(SEGMENT), bytearray(SEGMENT)
    out = bytearray(CIPHER_SEGMENT)
    n = _fill(src, cur)
    index = 0
    while True:
        m = _fill(src, nxt) if n == SEGMENT else 0
        last = m == 0
        k = aead.encrypt_into(_stream_nonce(index, last), memoryview(cur)[:n], None, memoryview(out)[:n + TAG])
        dst.write(memoryview(out)[:k])
        if last:
            return
        cur, nxt, n = nxt, cur, m
        index += 1


def _fill(src: BinaryIO, buf: bytearray) -> int:
    view, n = memoryview(buf), 0
    while n < len(buf):
        got = src.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def encrypt_file(src: Path, dst: Path, recipients: Sequence[Recipient], threads: int | None = None) -> None:
    """Encrypt the file ``src`` to ``dst`` (written in place; callers write to a temp name and rename), ranges of
    segments encrypted on several cores and written in order; the same age file as ``encrypt_stream`` writes."""
    file_key = os.urandom(16)
    nonce = os.urandom(NONCE)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd = fin.fileno()
        size = os.fstat(fd).st_size
        last = max(1, -(-size // SEGMENT)) - 1

        def seal(first: int, count: int) -> memoryview:
            clear = os.pread(fd, min(count * SEGMENT, size - first * SEGMENT), first * SEGMENT)
            if len(clear) != min(count * SEGMENT, size - first * SEGMENT):
                raise EdgerunError(f"{src} changed while it was encrypted")
            view, out = memoryview(clear), bytearray(len(clear) + count * TAG)
            at = 0
            for k in range(count):
                piece = view[k * SEGMENT:(k + 1) * SEGMENT]
                at += aead.encrypt_into(_stream_nonce(first + k, first + k == last), piece, None,
                                        memoryview(out)[at:at + len(piece) + TAG])
            return memoryview(out)[:at]

        fout.write(header_for(recipients, file_key))
        fout.write(nonce)
        ranges = [(first, min(RANGE_SEGMENTS, last + 1 - first)) for first in range(0, last + 1, RANGE_SEGMENTS)]
        with ThreadPoolExecutor(min(threads or decrypt_threads(), len(ranges)),
                                thread_name_prefix="edgerun-encrypt") as pool:
            ahead: deque = deque()
            for first, count in ranges:
                ahead.append(pool.submit(seal, first, count))
                if len(ahead) >= 2 * (threads or decrypt_threads()):
                    fout.write(ahead.popleft().result())
            while ahead:
                fout.write(ahead.popleft().result())
