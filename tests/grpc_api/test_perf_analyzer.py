"""Triton's own load tool, ``perf_analyzer``, runs unchanged against ``edgerun serve`` over HTTP and gRPC.

A short bounded run each: it reads the model's metadata and config, sends requests, and reads the server's
statistics; every request must succeed and the server-side counts must be edgerun's.
"""

from __future__ import annotations

import re
import subprocess

import pytest

pytest.importorskip("grpc")

from edgerun.testing import perf_analyzer  # noqa: E402
from edgerun.testing.serving import ServerProcess, free_port  # noqa: E402

try:
    BINARY, ENV = perf_analyzer.find()
except LookupError as exc:
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def served(digits_package):
    port = free_port()
    proc = ServerProcess(["--model", str(digits_package.root)], env={"EDGERUN_SERVER_GRPC_PORT": str(port)})
    proc.wait_ready()
    proc.grpc_port = port
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.mark.parametrize("protocol,extra", [("http", []), ("grpc", []), ("grpc", ["--streaming"])],
                         ids=["http", "grpc", "grpc-stream"])
def test_perf_analyzer_runs_unchanged(served, protocol, extra):
    port = served.port if protocol == "http" else served.grpc_port
    cmd = [BINARY, "-m", "digits", "-u", f"127.0.0.1:{port}", "-i", protocol, *extra, "--concurrency-range", "4",
           "--measurement-mode", "count_windows", "--measurement-request-count", "100", "--max-trials", "10",
           "--stability-percentage", "200"]  # a noisy shared host: a bounded run, not a stable measurement
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    client = int(re.search(r"Client:\s+Request count: (\d+)", out).group(1))
    server = re.search(r"Server:\s+Inference count: (\d+)\s+Execution count: (\d+)\s+Successful request count: (\d+)",
                       out)
    assert server, f"perf_analyzer read no server-side statistics:\n{out}"
    inferences, executions, successes = map(int, server.groups())
    # the server's counts cover the client's windows, give or take the requests in flight at their edges
    assert client >= 100 and successes >= client - 8 and inferences >= client - 8, out
    assert 0 < executions <= inferences, out  # batching: one run may serve several requests
    assert "compute infer" in out
