"""Logs: journald priorities under systemd, plain lines on a terminal, and never a secret."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from edgerun.logs import configure, hide

TOKEN = "tok-3f9a1c77e2b4"
PASSWORD = "pw-8d1e55a0c9"


def test_secrets_never_reach_the_log(service, digits_package, tmp_path):
    pw = tmp_path / "mqtt-password"
    pw.write_text(PASSWORD)
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[mqtt]\nenabled = false\npassword_file = "{pw}"\n')
    s = service(["--config", str(cfg), "--model", str(digits_package.root)],
                env={"EDGERUN_API_TOKEN": TOKEN, "EDGERUN_LOG_LEVEL": "DEBUG"})
    s.wait_ready()
    assert httpx.get(f"{s.url}/v2/models/digits", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"{s.url}/v2/models/digits", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert s.stop() == 0
    out = s.output()
    assert "<7>" in out, "DEBUG lines expected with EDGERUN_LOG_LEVEL=DEBUG"
    assert TOKEN not in out and PASSWORD not in out


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_a_secret_in_a_message_is_masked(capsys, monkeypatch):
    monkeypatch.setenv("INVOCATION_ID", "0123")
    configure("INFO")
    hide(TOKEN)
    logging.getLogger("edgerun.test").warning("connecting with %s", TOKEN)
    err = capsys.readouterr().err
    assert err == "<4>edgerun.test: connecting with ***\n"


def test_plain_lines_with_time_and_level_on_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure("INFO")
    logging.getLogger("edgerun.test").error("boom")
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR   edgerun.test: boom\n", capsys.readouterr().err)


def test_a_secret_in_a_traceback_is_masked(capsys, monkeypatch):
    monkeypatch.setenv("INVOCATION_ID", "0123")
    configure("INFO")
    hide(PASSWORD)
    try:
        raise ConnectionError(f"broker refused user dev1 with password {PASSWORD}")
    except ConnectionError:
        logging.getLogger("edgerun.test").exception("MQTT connection failed")
    err = capsys.readouterr().err
    assert PASSWORD not in err and "password ***" in err and "<3>Traceback" in err, err
