"""Fixtures for the core tests: profiles, copies of the digits package to tamper with, the CLI in-process."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgerun.package import ModelPackage, save_package
from edgerun.profiles import BUNDLED_DIR, Profile, load_profiles
from edgerun.runtime import Runtime
from edgerun.tomlfile import read_toml

# Measured peak memory written into the packages the choice tests use, so the outcome does not depend on the host.
FP32_NEED = 30 << 20
INT8_NEED = 12 << 20
FP32_ACCURACY = 0.978
INT8_ACCURACY = 0.975


@pytest.fixture(scope="session")
def bundled_profiles() -> dict[str, Profile]:
    """The profiles shipped in device_profiles/ (not /etc, not EDGERUN_PROFILE_PATH)."""
    return load_profiles([BUNDLED_DIR])


@pytest.fixture(scope="session")
def cpu_profile(bundled_profiles: dict[str, Profile]) -> Profile:
    """generic-x86_64: onnxruntime first, so results do not depend on which host runs the tests."""
    return bundled_profiles["generic-x86_64"]


@pytest.fixture
def runtime(cpu_profile: Profile):
    """A Runtime on the generic x86_64 profile, closed after the test."""
    rt = Runtime(profile=cpu_profile)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def measured_digits(digits_package: ModelPackage, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """The digits package with measured needs and accuracies recorded: fp32 30 MiB 0.978, int8 12 MiB 0.975."""
    root = tmp_path_factory.mktemp("measured") / "digits"
    shutil.copytree(digits_package.root, root)
    needs = {"fp32": FP32_NEED, "int8": INT8_NEED}
    accuracy = {"fp32": FP32_ACCURACY, "int8": INT8_ACCURACY}
    pkg = ModelPackage.load(root)
    pkg.variants = [dataclasses.replace(v, memory_bytes=needs[v.precision], accuracy=accuracy[v.precision])
                    for v in pkg.variants]
    save_package(pkg, root)
    return ModelPackage.load(root)


@pytest.fixture
def package_copy(digits_package: ModelPackage, tmp_path: Path) -> Callable[..., Path]:
    """Copy the digits package into tmp_path, optionally editing its edgerun.toml content first."""

    def copy(edit: Callable[[dict[str, Any]], None] | None = None, name: str = "digits") -> Path:
        root = tmp_path / name
        shutil.copytree(digits_package.root, root)
        if edit is not None:
            import tomli_w

            data = read_toml(root / "edgerun.toml")
            edit(data)
            (root / "edgerun.toml").write_text(tomli_w.dumps(data))
        return root

    return copy


@pytest.fixture(scope="session")
def digits_input(digits_package: ModelPackage) -> np.ndarray:
    """The package's first warm-up input (two digit images)."""
    return digits_package.samples[0].inputs["input"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> Callable[..., tuple[int, str, str]]:
    """Run ``edgerun ARGS`` in-process: (exit code, stdout, stderr), with a wide terminal so tables don't wrap, and
    a state directory of its own (the machine's default one may hold a tuning cache of the example model)."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr("edgerun.config.DEFAULT_STATE_DIR", tmp_path / "state")
    monkeypatch.setenv("EDGERUN_LOG_LEVEL", "WARNING")

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(*args: Any) -> tuple[int, str, str]:
        from edgerun.cli import main

        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        finally:  # the CLI configures logging on the root logger; give pytest its handlers back
            root.handlers[:], level = saved[0][:], saved[1]
            root.setLevel(level)
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run
