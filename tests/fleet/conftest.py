"""Fixtures of the simulated-fleet tests: a real Mosquitto, hub keys, a fresh fleet name per test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from edgerun.hub.keys import generate
from edgerun.testing.mosquitto import Mosquitto, find_mosquitto

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def keydir(tmp_path_factory) -> Path:
    """The trusted keys of every simulated device: ``hub-test.pub`` (``hub-test.key`` signs)."""
    d = tmp_path_factory.mktemp("fleet-keys")
    generate(d, "hub-test")
    return d


@pytest.fixture(scope="session")
def rogue_keydir(tmp_path_factory) -> Path:
    """A key pair the devices do not trust."""
    d = tmp_path_factory.mktemp("fleet-rogue")
    generate(d, "rogue")
    return d


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("fleet-broker")) as b:
        yield b


@pytest.fixture
def fleet_name() -> str:
    return f"s{uuid.uuid4().hex[:8]}"
