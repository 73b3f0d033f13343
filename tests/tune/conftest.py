"""Packages for the tuning tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def checked_digits(tmp_path_factory):
    """The digits MLP (onnx fp32 and int8) with a validation sample of 60 held-out examples."""
    from edgerun.testing.models import make_digits_package

    return make_digits_package(tmp_path_factory.mktemp("tune") / "digits", validation=60)
