"""Fixtures of the MQTT update tests: a real Mosquitto, real `edgerun serve` device processes, real HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from edgerun.hub.keys import generate
from edgerun.manifest import load_private_key
from edgerun.testing.mosquitto import Mosquitto, find_mosquitto
from mqtt_helpers import Device, Hub, Watcher

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def keydir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    generate(d, "hub-test")
    other = tmp_path_factory.mktemp("rogue")
    generate(other, "rogue")
    return d


@pytest.fixture(scope="session")
def rogue_key(keydir) -> Any:
    return load_private_key(next(Path(keydir).parent.glob("rogue*/rogue.key")))


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def fleet() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hub(broker, fleet, keydir) -> Hub:
    return Hub(broker, fleet, keydir)


@pytest.fixture
def watcher(broker, fleet):
    w = Watcher(broker, fleet)
    yield w
    w.close()


@pytest.fixture
def device_factory(tmp_path, broker, fleet, keydir):
    made: list[Device] = []

    def make(name: str = "dev1", **kw) -> Device:
        d = Device(tmp_path / name, broker, fleet, keydir, name, **kw)
        d.workdir.mkdir(parents=True, exist_ok=True)
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()
