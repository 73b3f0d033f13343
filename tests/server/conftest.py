"""Real ``edgerun serve`` subprocesses on free ports, with real model packages, for HTTP tests."""

from __future__ import annotations

import httpx
import pytest

from edgerun.testing.serving import ServerProcess, make_echo_package, make_fixed_package


@pytest.fixture(scope="session")
def packages(digits_package, tmp_path_factory):
    from edgerun.testing.models import make_digits_package

    root = tmp_path_factory.mktemp("server-packages")
    return {"digits": digits_package,
            "digits2": make_digits_package(root / "digits-v2", version=2, int8=False, seed=1),
            "echo": make_echo_package(root / "echo"),
            "fixed": make_fixed_package(root / "fixed")}


@pytest.fixture(scope="session")
def server(packages, tmp_path_factory):
    """The main server: digits v1+v2 (batched), echo (every datatype), fixed (no batch dim, tiny queue)."""
    cfg = tmp_path_factory.mktemp("server-config") / "edgerun.toml"
    cfg.write_text(f"""
[server]
max_body = "1MiB"

[[models]]
path = "{packages['digits'].root}"
variant = "onnx-fp32"
[models.batching]
max_batch_size = 16
max_queue_delay_us = 2000

[[models]]
path = "{packages['digits2'].root}"

[[models]]
path = "{packages['echo'].root}"
backend = "onnxruntime"

[[models]]
path = "{packages['fixed'].root}"
backend = "onnxruntime"
max_inflight = 1
max_queue = 2
""")
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    yield proc
    assert proc.proc.poll() is None, f"the server died during the tests:\n{proc.output()}"
    code = proc.stop()
    assert code == 0, f"edgerun serve exited with {code} on SIGTERM:\n{proc.output()}"


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def triton(server):
    import tritonclient.http as th

    c = th.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)
    yield c
    c.close()
