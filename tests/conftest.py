"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("EDGERUN_LOG_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def digits_package(tmp_path_factory):
    """A real digits MLP package (onnx fp32 + int8 variants) built once per session."""
    from edgerun.testing.models import make_digits_package

    return make_digits_package(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def testhooks(tmp_path_factory) -> dict[str, str]:
    """The environment that loads tests/plugins/edgerun_testhooks into an ``edgerun serve`` subprocess."""
    from edgerun.testing.plugins import site_dir

    site = site_dir(Path(__file__).parent / "plugins" / "edgerun_testhooks", tmp_path_factory.mktemp("testhooks"))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
