"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("EDGERUN_LOG_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def digits_package(tmp_path_factory):
    """A real digits MLP package (onnx fp32 + int8 variants) built once per session."""
    from edgerun.testing.models import make_digits_package

    return make_digits_package(tmp_path_factory.mktemp("digits") / "digits")
