"""``edgerun config check/show`` and ``edgerun service install``, run as a user would run them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgerun.cli.service import edgerun_executable
from edgerun.config import load_config, parse_config

CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"
REPO = Path(__file__).resolve().parents[2]


def edgerun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGERUN_")}
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**base, "COLUMNS": "200", **(env or {})})


def test_config_check_names_file_key_and_expectation(tmp_path, digits_package):
    good = tmp_path / "good.toml"
    good.write_text(f'[server]\nport = 9100\n[[models]]\npath = "{digits_package.root}"\n')
    r = edgerun("config", "check", "--config", str(good))
    assert r.returncode == 0, r.stderr
    assert str(good) in r.stdout and "1 model(s)" in r.stdout and "9100" in r.stdout

    cases = {
        '[server]\nport = 70000\n': ("key 'server.port'", "expected a port number 1-65535"),
        '[mqtt]\nkeepalive = "30s"\n': ("key 'mqtt.keepalive'", "expected an integer"),
        '[mqtt]\nstall_timeout = 0\n': ("key 'mqtt.stall_timeout'", "expected seconds >= 1, got 0"),
        '[server]\nprot = 1\n': ("key 'server.prot'", "unknown key; expected one of"),
        '[mqtt]\npassword = "hunter2"\n': ("key 'mqtt.password'", "mqtt.password_file or EDGERUN_MQTT_PASSWORD"),
        '[[models]]\npath = "missing-package"\n': ("key 'models[0].path'", "expected a model package directory"),
        'memory_budget = "lots"\n': ("key 'memory_budget'", "expected a size or a percentage"),
        '[server]\ngrpc_frontend = "fast"\n': ("key 'server.grpc_frontend'",
                                               'expected "auto", "loop", "native" or "grpcio", got \'fast\''),
        '[server\n': ("invalid TOML", ""),
    }
    for text, (key, expected) in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        r = edgerun("config", "check", "--config", str(bad))
        assert r.returncode == 78, (text, r.stdout, r.stderr)
        assert f"file {bad}" in r.stderr and key in r.stderr and expected in r.stderr, (text, r.stderr)
        assert "hunter2" not in r.stderr

    r = edgerun("config", "check", "--config", str(good), env={"EDGERUN_SERVER_PORT": "eighty"})
    assert r.returncode == 78 and "environment variable EDGERUN_SERVER_PORT" in r.stderr and "integer" in r.stderr
    r = edgerun("config", "check", "--config", str(tmp_path / "nowhere.toml"))
    assert r.returncode == 78 and "nowhere.toml" in r.stderr and "not found" in r.stderr


def test_config_show_is_the_effective_config_without_secrets(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-value\n")
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'log_level = "WARNING"\n[server]\nport = 9200\ntoken_file = "{token_file}"\n'
                   '[mqtt]\nenabled = true\nusername = "dev1"\n')
    env = {"EDGERUN_MQTT_PASSWORD": "mqtt-s3cret-value", "EDGERUN_API_TOKEN": "api-s3cret-value",
           "EDGERUN_SERVER_PORT": "9300", "EDGERUN_MQTT_HOST": "broker.local"}
    r = edgerun("config", "show", "--config", str(cfg), env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for secret in ("mqtt-s3cret-value", "api-s3cret-value", "file-token-value"):
        assert secret not in out
    assert "<from EDGERUN_MQTT_PASSWORD>" in out and "<from EDGERUN_API_TOKEN>" in out
    assert "EDGERUN_SERVER_PORT" in out  # says what the environment overrode
    shown = parse_config(tomllib.loads(out))  # a valid config file that means the same thing
    assert shown.server.port == 9300 and shown.mqtt.host == "broker.local" and shown.log_level == "WARNING"
    effective = load_config(cfg, environ=env)
    assert (shown.server, shown.mqtt, shown.models) == (effective.server, effective.mqtt, effective.models)


def test_defaults_without_a_config_file(tmp_path):
    r = edgerun("config", "show")
    if Path("/etc/edgerun/edgerun.toml").exists():
        pytest.skip("this machine has /etc/edgerun/edgerun.toml")
    shown = tomllib.loads(r.stdout)
    assert (shown["server"]["host"], shown["server"]["port"], shown["mqtt"]["enabled"]) == ("127.0.0.1", 8000, False)


def test_service_install_dry_run_matches_the_shipped_unit(tmp_path):
    r = edgerun("service", "install", "--dry-run", "--exec", "/usr/local/bin/edgerun")
    assert r.returncode == 0, r.stderr
    shipped_unit = (REPO / "packaging/systemd/edgerun.service").read_text()
    shipped_config = (REPO / "packaging/edgerun.toml").read_text()
    assert shipped_unit in r.stdout and shipped_config in r.stdout
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=edgerun", "DynamicUser=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "RestrictAddressFamilies=", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert f"\n{line}" in shipped_unit, line
    assert not (tmp_path / "etc").exists()
    # the shipped default config is valid and means the documented defaults
    cfg = parse_config(tomllib.loads(shipped_config))
    assert (cfg.server.host, cfg.server.port, cfg.mqtt.enabled, cfg.models) == ("127.0.0.1", 8000, False, ())


def test_service_install_writes_and_keeps_config(tmp_path):
    r = edgerun("service", "install", "--prefix", str(tmp_path), "--user", "edgerun")
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "etc/systemd/system/edgerun.service").read_text()
    assert "User=edgerun" in unit and "DynamicUser" not in unit.split("[Service]")[1].split("#")[0]
    config = tmp_path / "etc/edgerun/edgerun.toml"
    config.write_text("# mine\n")
    r = edgerun("service", "install", "--prefix", str(tmp_path))
    assert r.returncode == 0 and "kept" in r.stdout and config.read_text() == "# mine\n"
    r = edgerun("service", "install", "--prefix", str(tmp_path), "--force")
    assert r.returncode == 0 and config.read_text() != "# mine\n"
    assert edgerun("config", "check", "--config", str(config)).returncode == 0


ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install "
                                   "systemd): the unit file was not verified")


def verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says is wrong with ``unit`` (it exits 0 even for an unknown key)."""
    v = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    out = (v.stdout + v.stderr).splitlines()
    problems = [ln for ln in out if unit.name in ln or "Unknown" in ln or "ignoring" in ln.lower()]
    return problems if problems or v.returncode == 0 else out or [f"exit code {v.returncode}"]


@needs_analyze
def test_installed_unit_passes_systemd_analyze_verify(tmp_path):
    r = edgerun("service", "install", "--prefix", str(tmp_path))  # ExecStart= is this installation's edgerun
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system/edgerun.service"
    exec_start = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    program = Path(exec_start.split("=", 1)[1].split()[0])
    assert program.name == "edgerun" and os.access(program, os.X_OK), exec_start
    assert verify(unit) == []
    sec = subprocess.run([ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert sec.returncode == 0, sec.stdout[-600:]  # exposure 2.0 or better ("OK")


@needs_analyze
def test_shipped_unit_passes_systemd_analyze_verify(tmp_path):
    shipped = (REPO / "packaging/systemd/edgerun.service").read_text()
    # verify checks that ExecStart= names an executable: /usr/local/bin/edgerun (a `pip install` as root)
    # is not there on a development machine, so that one path is swapped for this installation's edgerun
    here = edgerun_executable()
    text = shipped if Path("/usr/local/bin/edgerun").exists() else shipped.replace("/usr/local/bin/edgerun", here)
    assert [a for a, b in zip(shipped.splitlines(), text.splitlines()) if a != b] in (
        [], ["ExecStart=/usr/local/bin/edgerun serve --config /etc/edgerun/edgerun.toml"])
    unit = tmp_path / "edgerun.service"
    unit.write_text(text)
    assert verify(unit) == []
    # and the check can fail: a misspelt setting and a bad value are both reported
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict").replace("ProtectHome=yes",
                                                                                       "ProtectHome=maybe"))
    problems = verify(unit)
    assert any("ProtectSytem" in p for p in problems) and any("maybe" in p for p in problems), problems


SAMPLE = {bool: "true", int: "7", float: "7.5"}
SPECIAL = {"log_level": "DEBUG", "memory_budget": "50%", "max_body": "1MiB", "host": "::1", "threads": "2",
           "protocol": "3.1.1", "tags": "site=berlin", "mode": "first", "grpc_frontend": "grpcio"}


def test_every_key_is_documented_with_its_environment_variable_which_works(tmp_path):
    from dataclasses import fields

    from edgerun.config import BatchingConfig, Config, ModelConfig, MqttConfig, ServerConfig, TuningConfig

    doc = (REPO / "docs/configuration.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in doc.splitlines() if ln.startswith("| `")}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for prefix, cls in (("", Config), ("server_", ServerConfig), ("mqtt_", MqttConfig), ("tuning_", TuningConfig)):
        for f in fields(cls):
            if f.name in ("models", "server", "mqtt", "tuning", "source", "overrides"):
                continue
            var = f"EDGERUN_{prefix}{f.name}".upper()
            row = rows.get(f"`{f.name}`") if not prefix else next(
                (r for r in doc.split(f"### `[{prefix[:-1]}]`")[1].split("###")[0].splitlines()
                 if r.startswith(f"| `{f.name}` |")), None)
            assert row is not None and f"`{var}`" in row, f"{prefix}{f.name}: no schema row naming {var}"
            default = getattr(cls(), f.name)
            value = SPECIAL.get(f.name) or SAMPLE.get(type(default), str(tmp_path / "x"))
            cfg = load_config(empty, environ={var: value})
            assert var in cfg.overrides, f"{var}={value} did not take effect"
    for cls in (ModelConfig, BatchingConfig):
        for f in fields(cls):
            assert f"`{f.name}`" in doc or f"`[models.{f.name}]`" in doc, f"models: {f.name} is not documented"


def test_config_check_reports_the_fleet_and_validates_trusted_keys(tmp_path):
    keys = tmp_path / "trusted"
    keys.mkdir()
    r = edgerun("hub", "keygen", "--out", str(tmp_path / "hub"), "--key-id", "hub-2026")
    assert r.returncode == 0, r.stderr
    r = edgerun("hub", "pubkey", str(tmp_path / "hub" / "hub-2026.key"))
    assert r.returncode == 0 and r.stdout.startswith("-----BEGIN PUBLIC KEY-----"), r.stdout + r.stderr
    (keys / "hub-2026.pub").write_text(r.stdout)  # the hub's own output, as it is
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[mqtt]\nenabled = true\nhost = "broker.lan"\nport = 8883\ntls = true\nfleet = "lab"\n'
                   f'device_id = "pi-kitchen"\ntrusted_keys = "{keys}"\n')
    r = edgerun("config", "check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    for words in ("broker broker.lan:8883 (TLS)", "fleet 'lab'", "device 'pi-kitchen'", "1 trusted key(s): hub-2026"):
        assert words in r.stdout, r.stdout

    (keys / "hub-2027.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    r = edgerun("config", "check", "--config", str(cfg))
    assert r.returncode == 78 and "key 'mqtt.trusted_keys'" in r.stderr and "hub-2027.pub" in r.stderr, r.stderr
    (keys / "hub-2027.pub").unlink()
    (keys / "hub 2027.pub").write_text((keys / "hub-2026.pub").read_text())
    r = edgerun("config", "check", "--config", str(cfg))
    assert r.returncode == 78 and "key id 'hub 2027'" in r.stderr, r.stderr
    (keys / "hub 2027.pub").unlink()
    (keys / "hub-2026.pub").unlink()
    r = edgerun("config", "check", "--config", str(cfg))
    assert r.returncode == 78 and "no <key_id>.pub file" in r.stderr and "edgerun hub pubkey" in r.stderr, r.stderr
    cfg.write_text('[mqtt]\nenabled = true\n')
    r = edgerun("config", "check", "--config", str(cfg))
    assert r.returncode == 78 and "no trusted_keys directory" in r.stderr, r.stderr
