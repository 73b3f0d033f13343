"""The device's key: made once under state_dir (0600), read from a file or a systemd credential, never if others can
read it; `edgerun device key` prints only the public half."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgerun import crypto
from edgerun.config import Config
from edgerun.devicekey import CREDENTIAL, DeviceKey, create_key_file
from edgerun.errors import DeviceKeyError

pyrage = pytest.importorskip("pyrage")


def edgerun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "EDGERUN_DEVICE_KEY_FILE")}
    return subprocess.run([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=60, env={**full, **(env or {})})


def test_device_key_is_made_once_private_and_printed_public(tmp_path):
    state = tmp_path / "state"
    first = edgerun("device", "key", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    key_file = state / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    text = key_file.read_text()
    secret = next(line for line in text.splitlines() if line.startswith("AGE-SECRET-KEY-1"))
    assert first.stdout.strip() == str(pyrage.x25519.Identity.from_str(secret).to_public())  # age's own reading
    assert secret not in first.stdout + first.stderr
    again = edgerun("device", "key", "--state-dir", str(state))
    assert again.stdout == first.stdout and key_file.read_text() == text


def test_a_key_file_others_can_read_is_refused(tmp_path):
    state = tmp_path / "state"
    create_key_file(state / "device.key")
    os.chmod(state / "device.key", 0o644)
    r = edgerun("device", "key", "--state-dir", str(state))
    assert r.returncode == 77
    assert f"device key {state / 'device.key'} has mode 0644: its group or others can read it, so it is not used; " \
           f"make it private to the service user (chmod 600 {state / 'device.key'})" in " ".join(r.stderr.split())
    assert r.stdout == ""
    key = DeviceKey(state / "device.key", create=True)
    with pytest.raises(DeviceKeyError, match="mode 0644"):
        key.identities()
    os.chmod(state / "device.key", 0o600)  # fixed: the next use reads it, no restart needed
    assert len(key.identities()) == 1


def test_a_systemd_credential_is_the_key_and_nothing_is_made(tmp_path):
    creds = tmp_path / "creds"
    identity = create_key_file(creds / CREDENTIAL)
    os.chmod(creds / CREDENTIAL, 0o400)  # as systemd's LoadCredential= leaves it
    state = tmp_path / "state"
    r = edgerun("device", "key", "--state-dir", str(state), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(identity.recipient)
    assert not (state / "device.key").exists()


def test_a_configured_key_file_is_never_made(tmp_path):
    missing = tmp_path / "etc" / "device.key"
    key = DeviceKey.from_config(Config(state_dir=tmp_path / "state", device_key_file=missing))
    with pytest.raises(DeviceKeyError, match=f"device key {missing} does not exist"):
        key.ensure()
    assert not missing.exists()
    r = edgerun("device", "key", env={"EDGERUN_DEVICE_KEY_FILE": str(missing), "EDGERUN_STATE_DIR": str(tmp_path)})
    assert r.returncode == 77 and "does not exist" in r.stderr


def test_an_age_keygen_file_and_a_fleet_key_are_both_identities(tmp_path):
    own, fleet = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    for name, ident in (("device.key", own), ("fleet.key", fleet)):
        (tmp_path / name).write_text(f"# created: 2026-01-01T00:00:00Z\n# public key: {ident.to_public()}\n{ident}\n")
        os.chmod(tmp_path / name, 0o600)
    key = DeviceKey.from_config(Config(state_dir=tmp_path, fleet_key_file=tmp_path / "fleet.key"))
    assert [str(i.recipient) for i in key.identities()] == [str(own.to_public()), str(fleet.to_public())]
    assert key.fingerprints() == {crypto.Recipient.parse(str(own.to_public())).fingerprint,
                                  crypto.Recipient.parse(str(fleet.to_public())).fingerprint}


def test_config_check_refuses_a_loose_key_file(tmp_path):
    create_key_file(tmp_path / "device.key")
    os.chmod(tmp_path / "device.key", 0o640)
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\ndevice_key_file = "{tmp_path / "device.key"}"\n')
    r = edgerun("config", "check", "--config", str(cfg))
    assert r.returncode == 78
    assert "key 'device_key_file'" in r.stderr and "mode 0640" in r.stderr


def test_two_processes_making_the_key_at_once_agree(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "device.key"
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: create_key_file(path), range(8)))
    assert len({str(i.recipient) for i in made}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]
