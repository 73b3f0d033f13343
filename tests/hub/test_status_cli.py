"""`edgerun hub status` on a fleet too large for one table, and without its broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from edgerun.hub.keys import generate
from edgerun.testing.fleet import SimFleet
from edgerun.testing.mosquitto import Mosquitto, find_mosquitto, free_port

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

CLI = "import sys; from edgerun.cli import main; sys.exit(main())"


def hub(*args: str, db: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "hub", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EDGERUN_HUB_DB": db, "COLUMNS": "220"})


def test_a_large_fleet_gets_a_summary_and_the_devices_that_need_a_look(tmp_path):
    generate(tmp_path / "keys", "k")
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    with Mosquitto(tmp_path / "broker") as broker, SimFleet(broker.port, "big", tmp_path / "keys", n=150) as fleet:
        fleet.set_offline("sim-0042")
        time.sleep(0.5)
        common = ["--fleet", "big", "--port", str(broker.port)]
        r = hub("status", *common, db=db)
        assert r.returncode == 0, r.stderr
        assert "150 known, 149 connected" in r.stdout
        assert "online: 149" in r.stdout and "offline: 1" in r.stdout  # the summary
        listed = [line for line in r.stdout.splitlines() if "sim-0" in line]
        assert len(listed) == 1 and "sim-0042" in listed[0], listed  # only the one that needs a look
        r = hub("status", *common, "--all", db=db)
        assert sum(1 for line in r.stdout.splitlines() if line.startswith("sim-")) == 150
        r = hub("status", *common, "--select", "devices=sim-004*", "--json", db=db)
        assert sorted(d["device"] for d in json.loads(r.stdout)) == [f"sim-004{i}" for i in range(10)]
        fleet_tags = {d["tags"]["site"] for d in json.loads(hub("status", *common, "--json", db=db).stdout)}
        site = sorted(fleet_tags)[0]
        picked = json.loads(hub("status", *common, "--select", f"tag:site={site}", "--json", db=db).stdout)
        assert picked and all(d["tags"]["site"] == site for d in picked) and len(picked) < 150

    r = hub("status", "--fleet", "big", "--port", str(free_port()), db=db)  # the broker is gone
    assert r.returncode == 0 and "showing the registry as last seen" in r.stderr, r.stderr
    assert "150 known" in r.stdout


def test_an_unusable_registry_stops_a_command_with_a_clear_message(tmp_path):
    db = f"postgresql://edgerun@127.0.0.1:{free_port()}/hub"
    r = hub("status", "--offline", db=db)
    assert r.returncode == 69 and "registry postgresql+psycopg://edgerun@127.0.0.1" in r.stderr, r.stderr
    assert "cannot be used" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "keys").mkdir()
    generate(tmp_path / "keys", "k")
    pkg = tmp_path / "pkg"
    from edgerun.testing.models import make_digits_package

    make_digits_package(pkg)
    r = subprocess.run([sys.executable, "-c", CLI, "hub", "publish", str(pkg), "--key", str(tmp_path / "keys" / "k.key"),
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "EDGERUN_HUB_DB": db})
    assert r.returncode == 69 and "cannot be used" in r.stderr, r.stderr  # refused before anything was sent


def test_hub_watch_keeps_the_registry_current_and_logs_events_until_sigterm(tmp_path):
    import signal

    from edgerun.hub.registry import Registry

    generate(tmp_path / "keys", "k")
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    with Mosquitto(tmp_path / "broker") as broker, SimFleet(broker.port, "w", tmp_path / "keys", n=5) as fleet:
        watch = subprocess.Popen([sys.executable, "-c", CLI, "hub", "watch", "--fleet", "w", "--port", str(broker.port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "EDGERUN_HUB_DB": db, "EDGERUN_LOG_LEVEL": "INFO"})
        try:
            deadline = time.monotonic() + 30
            while len(Registry(db).devices("w")) < 5:
                assert time.monotonic() < deadline and watch.poll() is None, "the watcher wrote no device"
                time.sleep(0.2)
            fleet.set_offline("sim-0001")
            deadline = time.monotonic() + 30
            while Registry(db).device("w", "sim-0001").online is not False:
                assert time.monotonic() < deadline, "the last will did not reach the registry"
                time.sleep(0.2)
            watch.send_signal(signal.SIGTERM)
            out, _ = watch.communicate(timeout=30)
        finally:
            watch.kill()
    assert watch.returncode == 0, out
    assert "watching fleet 'w'" in out and "sim-0001: offline" in out, out
