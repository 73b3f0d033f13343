"""The age format: files interoperate with pyrage (a Rust age) both ways; every damage is caught where it is."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import pytest

from edgerun import crypto
from edgerun.errors import DecryptError, EdgerunError

pyrage = pytest.importorskip("pyrage")

SEG = crypto.SEGMENT
SIZES = [0, 1, 100, SEG - 1, SEG, SEG + 1, 2 * SEG - 1, 2 * SEG, 2 * SEG + 1, 5 * SEG + 12345]


@pytest.fixture(scope="module")
def keys():
    """Three identities of ours, and the same keys as pyrage objects (parsed from our text)."""
    ids = [crypto.Identity.generate() for _ in range(3)]
    return ids, [pyrage.x25519.Identity.from_str(str(i)) for i in ids], \
        [pyrage.x25519.Recipient.from_str(str(i.recipient)) for i in ids]


def _ours(data: bytes, recipients) -> bytes:
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(data), out, recipients)
    return out.getvalue()


def _open(ct: bytes, identities) -> bytes:
    return b"".join(bytes(p) for p in crypto.Decryptor(io.BytesIO(ct), identities).read_all())


def test_keys_read_and_write_as_age_writes_them(keys):
    ids, theirs, _ = keys
    own = pyrage.x25519.Identity.generate()
    parsed = crypto.Identity.parse(str(own))
    assert str(parsed.recipient) == str(own.to_public())
    assert str(crypto.Identity.parse(str(ids[0]))) == str(ids[0])
    assert str(theirs[0].to_public()) == str(ids[0].recipient)
    assert str(ids[0]).startswith("AGE-SECRET-KEY-1") and str(ids[0].recipient).startswith("age1")
    assert str(ids[0]) not in repr(ids[0])  # the secret never shows in a repr
    with pytest.raises(EdgerunError, match="that is a secret key") as err:
        crypto.Recipient.parse(str(ids[0]))
    assert str(ids[0]) not in str(err.value)
    flipped = str(ids[0].recipient)[:-1] + ("q" if str(ids[0].recipient)[-1] != "q" else "p")
    with pytest.raises(EdgerunError, match="bad checksum"):
        crypto.Recipient.parse(flipped)


@pytest.mark.parametrize("size", SIZES)
def test_pyrage_files_open_here(keys, size):
    ids, _, theirs = keys
    data = os.urandom(size)
    ct = pyrage.encrypt(data, theirs)  # three stanzas, and the grease stanzas rage adds
    for identity in ids:
        assert _open(ct, [identity]) == data


@pytest.mark.parametrize("size", SIZES)
def test_our_files_open_with_pyrage(keys, size):
    ids, theirs_ids, _ = keys
    data = os.urandom(size)
    ct = _ours(data, [i.recipient for i in ids])
    for identity in theirs_ids:
        assert pyrage.decrypt(ct, [identity]) == data
    assert _open(ct, [ids[1]]) == data


@pytest.mark.parametrize("size", [*SIZES, 16 * SEG, 16 * SEG + 1, 40 * SEG + 3])
def test_files_encrypted_on_several_threads_open_with_pyrage(keys, tmp_path, size):
    """encrypt_file seals ranges of segments on several threads: the file is the age file a single thread writes."""
    ids, theirs_ids, _ = keys
    data = os.urandom(size)
    (tmp_path / "clear").write_bytes(data)
    crypto.encrypt_file(tmp_path / "clear", tmp_path / "m.age", [i.recipient for i in ids[:2]], threads=3)
    ct = (tmp_path / "m.age").read_bytes()
    assert len(ct) == len(_ours(data, [i.recipient for i in ids[:2]]))
    assert pyrage.decrypt(ct, [theirs_ids[1]]) == data
    assert crypto.check_file(tmp_path / "m.age", [ids[0]])[1] is None


def test_a_file_decrypts_into_one_buffer_of_its_exact_size(keys, tmp_path):
    """By default a writable buffer (a backend may share it); as ``bytes`` for a library that takes only those."""
    ids, _, theirs = keys
    for size in (0, SEG, 3 * SEG + 7):
        data = os.urandom(size)
        path = tmp_path / f"{size}.age"
        path.write_bytes(pyrage.encrypt(data, theirs[:1]))
        out = crypto.decrypt_to_memory(path, [ids[0]])
        view = memoryview(out)
        assert not view.readonly and view.nbytes == size and view.tobytes() == data
        view.release()
        out = crypto.decrypt_to_memory(path, [ids[0]], into=crypto.bytes_buffer)
        assert type(out) is bytes and out == data


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_a_file_of_many_ranges_decrypts_on_several_threads_and_names_its_first_damage(keys, tmp_path, threads):
    """Ranges of 16 segments go to several threads; the clear bytes land in place, in one buffer or a stream, and
    damage in two ranges is reported at the first one, as a single thread reports it."""
    ids, _, theirs = keys
    data = os.urandom(5 * crypto.RANGE_SEGMENTS * SEG + 777)  # 6 ranges, the last one short
    path = tmp_path / "big.age"
    ct = pyrage.encrypt(data, theirs[:1])
    path.write_bytes(ct)
    assert crypto.decrypt_to_memory(path, [ids[0]], threads=threads, into=crypto.bytes_buffer) == data
    assert memoryview(crypto.decrypt_to_memory(path, [ids[0]], threads=threads)).tobytes() == data
    with open(path, "rb") as f:
        dec = crypto.Decryptor(f, [ids[0]], total=len(ct))
        assert b"".join(bytes(p) for p in dec.read_parallel(f.fileno(), threads)) == data
    bad = bytearray(ct)
    for index in (70, 40):  # both in later ranges; 40 comes first
        bad[_segment_start(ct, index) + 5] ^= 0x01
    path.write_bytes(bad)
    with pytest.raises(DecryptError, match=r"segment 40 \(plaintext bytes 2621440-2686975\) does not authenticate"):
        crypto.decrypt_to_memory(path, [ids[0]], threads=threads)
    with open(path, "rb") as f, pytest.raises(DecryptError, match="segment 40 "):
        dec = crypto.Decryptor(f, [ids[0]], total=len(bad))
        for _ in dec.read_parallel(f.fileno(), threads):
            pass
    path.write_bytes(ct[:_segment_start(ct, 48)])  # cut at a range's boundary
    with pytest.raises(DecryptError, match="truncated: the file ends after segment 47 .* not its last segment"):
        crypto.decrypt_to_memory(path, [ids[0]], threads=threads)


def test_decryption_streams_in_bounded_memory(keys):
    ids, _, _ = keys
    data = os.urandom(64 * SEG)  # 4 MiB
    ct = _ours(data, [ids[0].recipient])
    dec = crypto.Decryptor(io.BytesIO(ct), [ids[0]])
    tracemalloc.start()
    seen = sum(len(p) for p in dec.read_all())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == len(data)
    assert peak < 512 << 10, f"streaming 4 MiB held {peak} bytes at once: it must not hold the whole file"


def _segment_start(ct: bytes, index: int) -> int:
    header = crypto.read_header(io.BytesIO(ct)).length
    return header + crypto.NONCE + index * crypto.CIPHER_SEGMENT


def test_a_tampered_segment_is_named(keys):
    ids, _, _ = keys
    ct = bytearray(_ours(os.urandom(4 * SEG + 10), [ids[0].recipient]))
    ct[_segment_start(bytes(ct), 2) + 1000] ^= 0x01
    with pytest.raises(DecryptError, match=r"segment 2 \(plaintext bytes 131072-196607\) does not authenticate"):
        _open(bytes(ct), [ids[0]])


def test_a_tampered_tag_is_named(keys):
    ids, _, _ = keys
    ct = bytearray(_ours(os.urandom(2 * SEG + 10), [ids[0].recipient]))
    ct[-1] ^= 0x80  # the last byte of the last segment's tag
    with pytest.raises(DecryptError, match=r"segment 2 \(plaintext bytes 131072-131081\) does not authenticate"):
        _open(bytes(ct), [ids[0]])


def test_truncated_at_a_segment_boundary_is_called_truncated(keys):
    ids, _, _ = keys
    ct = _ours(os.urandom(3 * SEG + 10), [ids[0].recipient])
    cut = ct[:_segment_start(ct, 2)]
    with pytest.raises(DecryptError, match="truncated: the file ends after segment 1 .* not its last segment"):
        _open(cut, [ids[0]])
    with pytest.raises(DecryptError, match="segment 3 .* does not authenticate"):
        _open(ct[:-5], [ids[0]])
    with pytest.raises(DecryptError, match="truncated: the file ends inside the age header"):
        _open(ct[:40], [ids[0]])


def test_a_file_for_other_keys_does_not_open(keys):
    ids, _, theirs = keys
    ct = pyrage.encrypt(b"model", theirs[:2])
    with pytest.raises(DecryptError, match=r"encrypted to 2 X25519 recipient\(s\), none of them this device's key "
                                           rf"\(fingerprint {ids[2].recipient.fingerprint}\)"):
        _open(ct, [ids[2]])


def test_an_altered_header_fails_its_mac(keys):
    ids, _, _ = keys
    ct = _ours(b"model bytes", [ids[0].recipient, ids[1].recipient])
    header = crypto.read_header(io.BytesIO(ct))
    second = header.stanzas[1].encode()
    # drop the second stanza: the first still opens, but the MAC covers the whole header
    altered = ct.replace(second, b"", 1)
    with pytest.raises(DecryptError, match="MAC does not match: the header was altered"):
        _open(altered, [ids[0]])


def test_a_clear_file_is_not_age(keys, tmp_path):
    ids, _, _ = keys
    with pytest.raises(DecryptError, match="not an age file"):
        _open(b"\x08\x07\x12\x07pytorch", [ids[0]])
    p = tmp_path / "clear.onnx"
    p.write_bytes(b"\x08\x07" * 100)
    assert not crypto.is_age(p)
    p.write_bytes(_ours(b"x", [ids[0].recipient]))
    assert crypto.is_age(p)


def test_check_file_hashes_the_ciphertext_and_authenticates_every_segment(keys, tmp_path):
    import hashlib

    ids, _, _ = keys
    path = tmp_path / "m.age"
    path.write_bytes(_ours(os.urandom(50 * SEG), [ids[0].recipient]))  # four ranges, checked on several threads
    assert crypto.check_file(path, [ids[0]]) == (hashlib.sha256(path.read_bytes()).hexdigest(), None)
    data = bytearray(path.read_bytes())
    data[_segment_start(bytes(data), 40) + 5] ^= 0x10
    data[_segment_start(bytes(data), 1) + 5] ^= 0x10
    path.write_bytes(bytes(data))
    digest, error = crypto.check_file(path, [ids[0]])
    assert digest == hashlib.sha256(bytes(data)).hexdigest()  # the whole file is hashed, also after the bad segment
    assert "segment 1" in str(error)


def test_identity_files_read_like_age_keygen_writes_them(keys, tmp_path: Path):
    ids, _, _ = keys
    text = crypto.identity_file(ids[0], "2026-01-01T00:00:00Z")
    assert text.splitlines()[1] == f"# public key: {ids[0].recipient}"
    assert crypto.read_identities(text, "f") == [ids[0]]
    with pytest.raises(EdgerunError, match="f, line 3: not an age identity"):
        crypto.read_identities(text.replace("AGE-SECRET-KEY-1", "AGE-SECRET-KEY-2"), "f")
