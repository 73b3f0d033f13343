"""Model packages and `edgerun serve` subprocesses for tests of the HTTP and gRPC front ends."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from edgerun.package import ModelPackage, Sample, Variant, file_entry, save_package
from edgerun.tensors import TensorSpec
from edgerun.testing.processes import terminate

ALL_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                 "FP64", "BYTES"]
TOKEN = "s3cret-token-for-tests"
CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_echo_package(root: Path) -> ModelPackage:
    """An ONNX model echoing one input of every KServe datatype (Identity nodes), shapes [-1, -1]."""
    import onnx
    from onnx import TensorProto, helper

    onnx_types = {"BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
                  "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
                  "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
                  "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
                  "BYTES": TensorProto.STRING}
    nodes, ins, outs = [], [], []
    for dt, code in onnx_types.items():
        nodes.append(helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]))
        ins.append(helper.make_tensor_value_info(f"in_{dt}", code, ["batch", "n"]))
        outs.append(helper.make_tensor_value_info(f"out_{dt}", code, ["batch", "n"]))
    model = helper.make_model(helper.make_graph(nodes, "echo", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "echo.onnx"))
    pkg = ModelPackage(name="echo", version=1,
                       inputs=[TensorSpec(f"in_{dt}", dt, (-1, -1)) for dt in onnx_types],
                       outputs=[TensorSpec(f"out_{dt}", dt, (-1, -1)) for dt in onnx_types],
                       variants=[Variant("onnx", "onnx", "fp32", (file_entry(root, "echo.onnx"),))])
    save_package(pkg, root)
    return ModelPackage.load(root)


def make_fixed_package(root: Path, hidden: int = 1024) -> ModelPackage:
    """An MLP with a fixed batch of 1 (no batch dimension to batch on)."""
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    mlp_onnx(random_mlp_weights([64, hidden, hidden, 10]), root / "model.onnx", batch=1)
    pkg = ModelPackage(name="fixed", version=1, inputs=[TensorSpec("input", "FP32", (1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (1, 10))],
                       variants=[Variant("onnx-fp32", "onnx", "fp32", (file_entry(root, "model.onnx"),))])
    save_package(pkg, root)
    return ModelPackage.load(root)


def make_slow_package(root: Path, size: int = 256, per_row: bool = False, sample_rounds: int = 0) -> ModelPackage:
    """Echoes ``x`` ([-1, 1] FP32) after max(x) rounds of a size x size MatMul: the client sets how long it takes.
    ``per_row``: sum(x) rounds instead, so a batch costs what its rows cost alone (batching saves nothing);
    ``sample_rounds``: a warm-up sample of that many rounds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "W"], ["mm"]), helper.make_node("Tanh", ["mm"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "rounds",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [size, size])])
    nodes = [helper.make_node("ReduceSum" if per_row else "ReduceMax", ["x"], ["xmax"], keepdims=0),
             helper.make_node("Cast", ["xmax"], ["trips"], to=TensorProto.INT64),
             helper.make_node("Mul", ["xmax", "zero"], ["x0"]),  # makes the loop depend on x: no constant folding
             helper.make_node("Add", ["W", "x0"], ["v0"]),
             helper.make_node("Loop", ["trips", "true", "v0"], ["v"], body=body),
             helper.make_node("ReduceSum", ["v"], ["vsum"], keepdims=0),
             helper.make_node("Mul", ["vsum", "zero"], ["v_zero"]),
             helper.make_node("Add", ["x", "v_zero"], ["y"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(True), "true")]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "slow.onnx"))
    pkg = ModelPackage(name="slow", version=1, inputs=[TensorSpec("x", "FP32", (-1, 1))],
                       outputs=[TensorSpec("y", "FP32", (-1, 1))],
                       variants=[Variant("onnx", "onnx", "fp32", (file_entry(root, "slow.onnx"),))],
                       samples=[Sample({"x": x}, {"y": x}) for x in [np.full((1, 1), sample_rounds, np.float32)]
                                if sample_rounds])
    save_package(pkg, root)
    return ModelPackage.load(root)


def echo_request(**override: dict) -> dict:
    """A JSON infer request for the echo model, one [1, 1] tensor per datatype; ``in_X={...}`` replaces fields."""
    tensors = []
    for dt in ALL_DATATYPES:
        data = ["a"] if dt == "BYTES" else [True] if dt == "BOOL" else [1]
        tensor = {"name": f"in_{dt}", "shape": [1, 1], "datatype": dt, "data": data}
        tensor.update(override.get(f"in_{dt}", {}))
        tensors.append(tensor)
    return {"inputs": tensors}


class ServerProcess:
    """``edgerun serve`` in a subprocess; ``url`` once ready.

    ``tls``: (CA file, client certificate, client key) for a server on HTTPS; its readiness is asked with them.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None):
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = True
        if tls is not None:
            self.verify = ssl.create_default_context(cafile=str(tls[0]))
            self.verify.load_cert_chain(str(tls[1]), str(tls[2]))
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgerun-serve-{self.port}.log"
        full_env = {**os.environ, "EDGERUN_LOG_LEVEL": "INFO", **(env or {})}
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", str(self.port),
                                      "--state-dir", str(self.log.parent / f"state-{self.port}"), *args],
                                     env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgerun serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"edgerun serve not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        terminate(self.proc)
        self._log_file.close()
        return self.proc.returncode


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``edgerun ARGS...`` in a subprocess: its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def create_token(tokens_file: Path, name: str, *scopes: str) -> str:
    """``edgerun token create NAME --scope ...``: the token it prints."""
    r = run_cli("token", "create", name, *(a for s in scopes for a in ("--scope", s)), "--tokens-file", str(tokens_file))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def reference(package: ModelPackage, x: np.ndarray) -> np.ndarray:
    """The fp32 model run by onnxruntime directly: what the server must answer."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(package.path_of(package.variant("onnx-fp32").main_file)),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]
