"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest

MEASURED = pytest.StashKey[dict]()
EXIT_STATUS = pytest.StashKey[int]()

os.environ.setdefault("EDGERUN_LOG_LEVEL", "WARNING")
os.environ.setdefault("EDGERUN_SERVER_GRPC_PORT", "0")  # servers that tests start serve gRPC only where asked
os.environ.setdefault("EDGERUN_TUNING_MODE", "off")  # servers that tests start tune only where asked (tests/tune)


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


def pytest_addoption(parser) -> None:
    parser.addoption("--screenshots", metavar="DIR", default=os.environ.get("EDGERUN_TEST_SCREENSHOTS"),
                     help="keep the browser tests' screenshots in DIR (also EDGERUN_TEST_SCREENSHOTS; "
                          "default: each test's tmp_path, which pytest deletes)")


@pytest.fixture
def screenshots(request, tmp_path) -> Path:
    """Where a browser test saves its screenshots: ``--screenshots DIR`` if given, else its tmp_path."""
    given = request.config.getoption("--screenshots")
    if not given:
        return tmp_path
    out = Path(given)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Print what tests measured (``measured[name] = ...``), whether or not output is captured: timings are
    reported, never asserted (benchmarks/ checks targets)."""
    got = config.stash.get(MEASURED, None)
    if got:
        terminalreporter.write_sep("-", "measurements")
        terminalreporter.write_line(json.dumps(got))


@pytest.fixture(scope="session")
def measured(request) -> dict[str, Any]:
    return request.config.stash.setdefault(MEASURED, {})


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config) -> None:
    """A thread a test started and left running (say a runner a failed assertion never stopped) would keep the
    interpreter from exiting after the summary, and a CI job would wait for it until its time-out: name the
    threads, show where they are, and exit with the session's status."""
    for t in _test_threads():
        t.join(10)
    left = [t for t in _test_threads() if t.is_alive()]
    if not left:
        return
    frames = sys._current_frames()
    sys.stderr.write(f"\n{len(left)} thread(s) a test started are still running; exiting without them:\n")
    for t in left:
        frame = frames.get(t.ident)
        sys.stderr.write(f"--- {t.name}\n" + ("".join(traceback.format_stack(frame)) if frame else ""))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(EXIT_STATUS, 1))


def _test_threads() -> list[threading.Thread]:
    """The threads that would keep the interpreter from exiting, but for the workers of thread pools: the
    interpreter's exit stops and joins those itself."""
    return [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon
            and getattr(getattr(t, "_target", None), "__module__", None) != "concurrent.futures.thread"]
