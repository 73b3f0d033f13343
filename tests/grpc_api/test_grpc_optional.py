"""gRPC is an extra: without grpcio and protobuf, edgerun and its HTTP server import and nothing loads edgerun.grpc."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = textwrap.dedent("""
    import sys

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name == "grpc" or name.startswith(("grpc.", "grpc_tools", "google.protobuf")):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    import edgerun, edgerun.cli, edgerun.cli.serve, edgerun.client, edgerun.runtime, edgerun.server.app
    assert not [m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "google.protobuf"))]
    print("loaded:", sorted(m for m in sys.modules if m.startswith("edgerun.grpc")))
    try:
        import edgerun.grpc.tensors
    except ModuleNotFoundError as exc:
        print("edgerun.grpc.tensors:", exc.name)
""")


def test_edgerun_imports_without_grpcio_or_protobuf() -> None:
    env = {**os.environ, "EDGERUN_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["loaded: []", "edgerun.grpc.tensors: google.protobuf"]
