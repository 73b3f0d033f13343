"""Shared by the hub tests: what a test measures (``measured[name] = ...``) is printed at the end of the run."""

from __future__ import annotations

import json
from typing import Any

import pytest

MEASURED = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Print the measurements, whether or not output is captured (timings are reported, never asserted)."""
    got = config.stash.get(MEASURED, None)
    if got:
        terminalreporter.write_sep("-", "hub measurements")
        terminalreporter.write_line(json.dumps(got))


@pytest.fixture(scope="session")
def measured(request) -> dict[str, Any]:
    return request.config.stash.setdefault(MEASURED, {})
