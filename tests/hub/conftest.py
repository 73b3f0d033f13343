"""Fixtures of the hub tests: a broker, a signing key, and a fleet with its registry on SQLite or PostgreSQL."""

from __future__ import annotations

import pytest

from edgerun.hub.keys import generate
from edgerun.testing.mosquitto import Mosquitto
from edgerun.testing.postgres import drop_database, fresh_database
from rollout_helpers import Setup


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate(d, "hub-t")
    return d


@pytest.fixture
def setup(broker, keys, tmp_path, digits_package, request):
    """A fresh fleet; its registry is SQLite, or PostgreSQL on 127.0.0.1:5432 with ``indirect`` "postgresql"
    (skipped when no server runs there)."""
    kind = getattr(request, "param", "sqlite")
    fleet = f"s{abs(hash(request.node.name)) % 10**8}"
    if kind == "sqlite":
        yield Setup(broker, keys, tmp_path, digits_package, fleet, f"sqlite:///{tmp_path / 'hub.db'}")
        return
    url = fresh_database()
    if url is None:
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    s = Setup(broker, keys, tmp_path, digits_package, fleet, url)
    try:
        yield s
    finally:
        s.registry.close()
        drop_database(url)
