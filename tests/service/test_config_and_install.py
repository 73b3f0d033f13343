"""``edgerun config check/show`` and ``edgerun service install``, run as a user would run them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
        '[server]\nprot = 1\n': ("key 'server.prot'", "unknown key; expected one of"),
        '[mqtt]\npassword = "hunter2"\n': ("key 'mqtt.password'", "mqtt.password_file or EDGERUN_MQTT_PASSWORD"),
        '[[models]]\npath = "missing-package"\n': ("key 'models[0].path'", "expected a model package directory"),
        'memory_budget = "lots"\n': ("key 'memory_budget'", "expected a size or a percentage"),
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


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); the unit was not verified")
    r = edgerun("service", "install", "--prefix", str(tmp_path), "--exec", sys.executable)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system/edgerun.service"
    v = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (v.stdout + v.stderr).splitlines()
                if str(unit) in ln or "Unknown" in ln or "ignoring" in ln.lower()]
    assert v.returncode == 0 and not problems, v.stdout + v.stderr
