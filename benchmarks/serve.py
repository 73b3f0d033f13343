"""Benchmark ``edgerun serve`` beside Triton, the in-process runtime (the floor) and a hand-rolled FastAPI server.

    python benchmarks/serve.py                 # full run: table on stdout, results in benchmarks/results/serve.json
    python benchmarks/serve.py --quick         # 1 repeat of 2 s, for a smoke test
    python benchmarks/serve.py --profile       # also py-spy the edgerun server at c=8/32 (MLP, JSON)

Method (as in shared/PEERS.md): the servers and everything they start pinned to CPU 0, the load generators to
CPU 1; onnxruntime with 1 intra-op and 1 inter-op thread everywhere; batch-1 FP32 requests to
``POST /v2/models/{m}/infer`` (JSON, and binary tensors) and to gRPC ``ModelInfer``; warm-up, then a measured
run; median of the repeats. All servers of a model run at once (all idle but one); each (model, concurrency)
cell measures every contender in turn, repeat by repeat, so each figure's ratio to Triton and to the floor
compares runs taken side by side on this shared host.

Contenders: edgerun with its default settings (``EDGERUN_THREADS=1``; batching where it measures faster at load, as
the rows say) and with batching off; Triton 2.51 (the ``tritonserver`` inside ``nvidia-pytriton`` 0.7.0's wheel)
serving a python-backend model that runs onnxruntime, with dynamic batching of at most 16 rows and a 500 us queue
delay, installed once into its own venv under ``~/.cache/edgerun-bench`` (it needs numpy<2 and tritonclient 2.5x);
FastAPI + onnxruntime; in-process ``Runtime.infer`` threads. HTTP load: ``wrk`` (one thread, keep-alive, closed loop);
gRPC load: ``h2load`` (nghttp2's HTTP/2 load generator: one thread, one connection per unit of concurrency, one call
at a time on each, closed loop), the call's status read from the server's failure count. edgerun's gRPC rows are
its default server (the loop one where it is built; the results say which) and, beside it, the same edgerun
with ``server.grpc_frontend = "native"`` (where it is built) and ``"grpcio"``.
Every server's answer is first checked against in-process onnxruntime with tritonclient.http (and tritonclient.grpc).
Triton's own ``perf_analyzer`` (from tritonclient 2.51's wheel, in the same venv) runs against both servers. Needs
``wrk`` and ``h2load`` (Debian packages wrk, nghttp2-client), ``fastapi`` for the baseline, PyPI for Triton's venv, ``py-spy`` for --profile.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("EDGERUN_TUNING_MODE", "off")  # tune.py measures tuning: here it would skew the figures

# benchmarks/packaging.py would shadow the packaging library (tritonclient.grpc imports it)
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
TCP_RTT = ROOT / "benchmarks" / "tools" / "tcp_rtt.c"
SERVER_CPU, CLIENT_CPU = "0", "1"
CONCURRENCY = (1, 8, 32)
TRITON_VENV = Path(os.environ.get("EDGERUN_BENCH_CACHE", Path.home() / ".cache" / "edgerun-bench")) / "triton-venv"
TRITON_MAX_BATCH, TRITON_QUEUE_DELAY_US = 16, 500
# where edgerun will answer KServe v2 gRPC by default; until it does, its gRPC rows are skipped with the reason
CLIENT_BOUND = 0.9  # a load generator using this much of its core may be the limit, not the server

LUA = """
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")
local hl = os.getenv("BENCH_HLEN")
if hl ~= nil and hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end
"""

FASTAPI_SERVER = '''
import sys
import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request

so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], sess_options=so, providers=["CPUExecutionProvider"])
inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
app = FastAPI()

@app.get("/v2/health/ready")
async def ready():
    return {}

@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request):
    body = await request.json()
    t = body["inputs"][0]
    x = np.array(t["data"], dtype=np.float32).reshape(t["shape"])
    y = sess.run([out], {inp: x})[0]
    return {"model_name": model, "model_version": "1",
            "outputs": [{"name": out, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]}

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
'''

# Triton's python backend: the model Triton users write (model.py), running onnxruntime on each dynamic batch
TRITON_MODEL = '''
import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(config["parameters"]["onnx"]["string_value"], sess_options=so,
                                         providers=["CPUExecutionProvider"])
        self.inp, self.out = self.sess.get_inputs()[0].name, self.sess.get_outputs()[0].name

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, self.inp).as_numpy() for r in requests]
        y = self.sess.run([self.out], {self.inp: np.concatenate(xs) if len(xs) > 1 else xs[0]})[0]
        responses, i = [], 0
        for x in xs:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out, y[i:i + len(x)])]))
            i += len(x)
        return responses
'''

TRITON_CONFIG = '''
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "input", data_type: TYPE_FP32, dims: [ {dims} ] }} ]
output [ {{ name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
parameters {{ key: "onnx", value: {{ string_value: "{onnx}" }} }}
'''


# --- models ----------------------------------------------------------------------------------------------

def make_packages(root: Path) -> dict:
    """The digits-sized MLP (64-512-512-10) and a MobileNet-like CNN (224x224x3), as edgerun packages."""
    from edgerun.package import ModelPackage, Variant, file_entry, save_package
    from edgerun.tensors import TensorSpec
    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    out = {}
    mlp = root / "mlp"
    mlp_onnx(random_mlp_weights([64, 512, 512, 10]), mlp / "model.onnx")
    save_package(ModelPackage("mlp", 1, [TensorSpec("input", "FP32", (-1, 64))],
                              [TensorSpec("probabilities", "FP32", (-1, 10))],
                              [Variant("onnx-fp32", "onnx", "fp32", (file_entry(mlp, "model.onnx"),))]), mlp)
    out["mlp"] = (mlp, (1, 64))
    cnn = root / "cnn"
    cnn_onnx(cnn / "model.onnx")
    save_package(ModelPackage("cnn", 1, [TensorSpec("input", "FP32", (-1, 3, 224, 224))],
                              [TensorSpec("probabilities", "FP32", (-1, 10))],
                              [Variant("onnx-fp32", "onnx", "fp32", (file_entry(cnn, "model.onnx"),))]), cnn)
    out["cnn"] = (cnn, (1, 3, 224, 224))
    return out


def cnn_onnx(path: Path, alpha: float = 1.0, seed: int = 0) -> Path:
    """MobileNet-v1-shaped (depthwise-separable convs) with random weights, width ``alpha``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int = 1) -> str:
        i = counter[0] = counter[0] + 1
        w = rng.normal(0, np.sqrt(2 / (k * k * cin / group)), (cout, cin // group, k, k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32),
                                                                                  f"b{i}")])
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, group=group))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        return f"r{i}"

    c = lambda n: max(8, int(n * alpha))  # noqa: E731
    x = conv("input", 3, c(32), 3, 2)
    cin = c(32)
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                         (512, 1), (512, 1), (1024, 2), (1024, 1)]:
        x = conv(x, cin, cin, 3, stride, group=cin)
        x = conv(x, cin, c(cout), 1, 1)
        cin = c(cout)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.extend([numpy_helper.from_array(rng.normal(0, 0.05, (cin, 10)).astype(np.float32), "fcw"),
                  numpy_helper.from_array(np.zeros(10, np.float32), "fcb")])
    nodes.append(helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --- request bodies ---------------------------------------------------------------------------------------

def make_bodies(x: np.ndarray, model: str, workdir: Path) -> dict:
    """The request each client sends, encoded once: JSON, binary tensors (tritonclient's encoding), gRPC."""
    import tritonclient.http as th
    from tritonclient.grpc import service_pb2

    out = {}
    json_body = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                          "data": np.round(x, 4).ravel().tolist()}]})
    p = workdir / f"{model}.json"
    p.write_bytes(json_body)
    out["json"] = (p, "application/json", "")
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    body, hlen = th.InferenceServerClient.generate_request_body(
        [i], outputs=[th.InferRequestedOutput("probabilities", binary_data=True)])
    p = workdir / f"{model}.bin"
    p.write_bytes(body)
    out["binary"] = (p, "application/octet-stream", str(hlen) if hlen is not None else "")
    req = service_pb2.ModelInferRequest(
        model_name=model, inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(x.shape))],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        raw_input_contents=[np.ascontiguousarray(x).tobytes()])
    p = workdir / f"{model}.grpc"
    p.write_bytes(req.SerializeToString())
    out["grpc"] = (p, "", "")
    return out


# --- Triton's venv ---------------------------------------------------------------------------------------

def triton_requirements() -> list[str]:
    """nvidia-pytriton 0.7.0 (tritonserver 2.51), perf_analyzer's tritonclient and its CUDA runtime, our onnxruntime."""
    import onnxruntime

    return ["nvidia-pytriton==0.7.0", "tritonclient[all]==2.51.0", "nvidia-cuda-runtime-cu12",
            f"onnxruntime=={onnxruntime.__version__}"]


def triton_venv() -> Path:
    """The venv Triton runs from, made once and kept; made again when its requirements or Python change."""
    want = {"python": sys.version, "requirements": triton_requirements()}
    marker = TRITON_VENV / "edgerun-bench.json"
    if marker.exists() and json.loads(marker.read_text()) == want:
        return TRITON_VENV
    shutil.rmtree(TRITON_VENV, ignore_errors=True)
    print(f"creating Triton's venv in {TRITON_VENV} (once, ~500 MB from PyPI)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], check=True)
    done = subprocess.run([str(TRITON_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                           *want["requirements"]], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cannot install Triton's venv:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    marker.write_text(json.dumps(want))
    return TRITON_VENV


def _venv_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def triton_env(venv: Path) -> dict:
    # the python backend's stub takes its packages (numpy<2, onnxruntime) from the python first on PATH: the venv's
    env = _venv_env(venv)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        # the python backend's stub links libpython3.x: this interpreter's, not the system's of another patch level
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                        env.get("LD_LIBRARY_PATH")]))
    return env


def find_perf_analyzer() -> tuple[str, dict]:
    """Triton's perf_analyzer (tritonclient 2.51's wheel, in Triton's venv) and the environment it runs in."""
    venv = triton_venv()
    path = venv / "bin" / "perf_analyzer"
    libs = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    if not path.exists() or not libs:
        raise RuntimeError(f"perf_analyzer or libcudart.so.12 missing from {venv}")
    env = _venv_env(venv)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(libs[0]), env.get("LD_LIBRARY_PATH")]))
    done = subprocess.run([str(path), "--version"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"perf_analyzer does not run here (it needs Debian's libb64-0d):\n{done.stderr}")
    return str(path), env


# --- load generation -------------------------------------------------------------------------------------

def _seconds(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, body: tuple, conc: int, duration: float, lua: Path) -> dict:
    path, ctype, hlen = body
    env = {**os.environ, "BENCH_BODY": str(path), "BENCH_CTYPE": ctype, "BENCH_HLEN": hlen}
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency",
           "--timeout", "10s", "-s", str(lua), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall
    pct = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M))
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None or "50" not in pct or "99" not in pct:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    rps, p50, p99 = float(rate.group(1)), _seconds(pct["50"]), _seconds(pct["99"])
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        raise RuntimeError(f"wrk saw failures against {url}:\n{out}")
    return {"rps": rps, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "client_cpu": cpu}


def grpc_load(target: str, request: Path, conc: int, warmup: float, duration: float, stats_url: str) -> dict:
    """Closed-loop gRPC ModelInfer load: h2load (nghttp2's HTTP/2 load generator, in C) on the client CPU, one
    connection per unit of concurrency with one call at a time on each, as wrk's connections for HTTP.

    h2load counts HTTP statuses, and gRPC carries a call's failure in its trailers: the server's own count of
    failed requests (``stats_url``, Triton's statistics extension, which both servers answer) must not move, but
    for the calls h2load leaves in flight when its time is up (at most one per connection), which a server may
    count as failed: edgerun's /metrics says they are ``client_gone``; Triton's count may rise by ``conc``.
    """
    framed = request.with_suffix(".grpc-frame")
    if not framed.exists():
        data = request.read_bytes()
        framed.write_bytes(b"\0" + len(data).to_bytes(4, "big") + data)
    log = request.with_suffix(f".h2load-c{conc}.log")
    failed_before, gone_before = _failed(stats_url), _gone(stats_url)
    cmd = ["taskset", "-c", CLIENT_CPU, "h2load", "-t1", f"-c{conc}", "-m1", f"-D{max(1, round(duration))}",
           f"--warm-up-time={max(1, round(warmup))}", "-d", str(framed), "-H", "content-type: application/grpc",
           "-H", "te: trailers", f"--log-file={log}",
           f"http://{target}/inference.GRPCInferenceService/ModelInfer"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    if rate is None or done is None:
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    if int(done.group(3)) or int(done.group(4)) or int(done.group(1)) != int(done.group(2)):
        raise RuntimeError(f"h2load saw failures against {target}:\n{out}")
    failed, gone = _failed(stats_url) - failed_before, _gone(stats_url)
    abandoned = conc if gone is None else gone - gone_before  # calls h2load left when its time was up
    if failed > min(abandoned, conc):
        raise RuntimeError(f"{target} failed {failed} gRPC call(s) (its statistics' failure count), "
                           f"{max(0, failed - abandoned)} of them not left by h2load at its end")
    lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.count("\t") >= 2)
    log.unlink()
    if not lat:
        raise RuntimeError(f"h2load logged no request against {target}:\n{out}")
    return {"rps": float(rate.group(1)), "p50_ms": lat[len(lat) // 2] / 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] / 1e3, "client_cpu": cpu / (1 + warmup / max(duration, 1e-9))}


def loopback_rtt(work: Path) -> dict | None:
    """A bare TCP round trip between the server CPU and the client CPU (benchmarks/tools/tcp_rtt.c: an echo in C,
    one small message at a time, each side waiting in epoll): the part of every server's added latency at c=1
    that this host sets. None without a C compiler."""
    exe = work / "tcp_rtt"
    if not exe.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or subprocess.run([cc, "-O2", "-o", str(exe), str(TCP_RTT)], capture_output=True).returncode:
            return None
    out = subprocess.run([str(exe), SERVER_CPU, CLIENT_CPU, "5000"], capture_output=True, text=True, check=True).stdout
    got = re.match(r"p50 (\S+) p10 (\S+) p90 (\S+)", out)
    if got is None:
        raise RuntimeError(f"cannot read tcp_rtt's output: {out!r}")
    return dict(zip(("p50_us", "p10_us", "p90_us"), map(float, got.groups())))


def _failed(stats_url: str) -> int:
    stats = httpx.get(stats_url, timeout=10).json()["model_stats"]
    return sum(int(m.get("inference_stats", {}).get("fail", {}).get("count", 0)) for m in stats)


def _gone(stats_url: str) -> int | None:
    """edgerun's count of requests whose client left before the answer (None: a server without that metric)."""
    text = httpx.get(stats_url.split("/v2/", 1)[0] + "/metrics", timeout=10).text
    if "edgerun_request_failures" not in text:
        return None
    gone = re.findall(r'^edgerun_request_failures_total\{[^}]*reason="client_gone"[^}]*\} (\S+)$', text, re.M)
    return sum(int(float(n)) for n in gone)


def in_process(pkg_dir: Path, x: np.ndarray, conc: int, duration: float, warmup: float) -> dict:
    """The floor: closed-loop threads calling Runtime.infer, all on CPU 0."""
    from edgerun.runtime import Runtime

    os.sched_setaffinity(0, {int(SERVER_CPU)})
    try:
        rt = Runtime(threads=1)
        rt.load(pkg_dir, backend="onnxruntime")
        name = rt.models()[0].name
        stop = threading.Event()
        lat: list[list[float]] = [[] for _ in range(conc)]
        measuring = threading.Event()

        def loop(i: int) -> None:
            mine = lat[i]
            feed = {"input": x}
            while not stop.is_set():
                t0 = time.perf_counter()
                rt.infer(name, feed)
                if measuring.is_set():
                    mine.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(conc)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        measuring.set()
        t0 = time.perf_counter()
        time.sleep(duration)
        measuring.clear()
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
        rt.close()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    allv = sorted(v for per in lat for v in per)
    return {"rps": len(allv) / wall, "p50_ms": allv[len(allv) // 2] * 1e3,
            "p99_ms": allv[int(len(allv) * 0.99)] * 1e3, "client_cpu": None}


# --- servers -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process and all it starts, pinned to the server CPU, in a process group of its own."""

    def __init__(self, cmd: list[str], port: int, workdir: Path, label: str, ready_path: str = "/v2/health/ready",
                 env: dict | None = None, grpc_target: str | None = None, start_timeout: float = 90):
        self.url, self.label, self.grpc_target = f"http://127.0.0.1:{port}", label, grpc_target
        self.log_path = workdir / f"{label}.log"
        self.log = open(self.log_path, "wb")
        env = env or {**os.environ, "EDGERUN_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{label} exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{label} not ready within {start_timeout:.0f} s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:  # whatever it started and left behind (Triton's server and backend stub)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and every process it started."""
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return total
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total


def settle(servers, window: float = 0.3, busy: float = 0.05, timeout: float = 30.0) -> float:
    """Wait until the servers, all on one CPU, are idle (together under ``busy`` of a core over ``window`` s).

    A server keeps working after its load generator stopped on what was queued (a slow contender with 32
    large JSON bodies can take seconds), and that work would be charged to the next contender on the CPU.
    Returns the seconds waited.
    """
    t0 = time.monotonic()
    before = sum(s.cpu_seconds() for s in servers)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = sum(s.cpu_seconds() for s in servers)
        if now - before < busy * window:
            break
        before = now
    return time.monotonic() - t0


def _edgerun_cmd() -> list[str]:
    return [sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", "serve"]


def native_built() -> bool:
    from edgerun.grpc.server import native_available

    return native_available("_native") is None


def edgerun_default_server(pkg_dir: Path, workdir: Path, label: str, grpc_frontend: str = "auto") -> Server:
    """edgerun with its default settings and one onnxruntime thread (EDGERUN_THREADS=1)."""
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "EDGERUN_LOG_LEVEL": "INFO", "EDGERUN_THREADS": "1",
           "EDGERUN_SERVER_GRPC_FRONTEND": grpc_frontend}
    return Server([*_edgerun_cmd(), "--model", str(pkg_dir), "--port", str(port), "--grpc-port", str(grpc_port),
                   "--state-dir", str(workdir / f"{label}-state")], port, workdir, label, env=env,
                  grpc_target=f"127.0.0.1:{grpc_port}")


def edgerun_unbatched_server(pkg_dir: Path, workdir: Path, label: str) -> Server:
    port = free_port()
    cfg = workdir / f"{label}.toml"
    cfg.write_text(textwrap.dedent(f"""
        threads = 1
        state_dir = "{workdir / f'{label}-state'}"
        [[models]]
        path = "{pkg_dir}"
        backend = "onnxruntime"
        [models.batching]
        enabled = false
    """))
    return Server([*_edgerun_cmd(), "--config", str(cfg), "--port", str(port), "--grpc-port", "0"], port, workdir,
                  label)


def fastapi_server(pkg_dir: Path, workdir: Path, label: str) -> Server:
    script = workdir / "fastapi_server.py"
    script.write_text(FASTAPI_SERVER)
    port = free_port()
    return Server([sys.executable, str(script), str(pkg_dir / "model.onnx"), str(port)], port, workdir, label)


def triton_server(pkg_dir: Path, model: str, shape: tuple, workdir: Path, label: str) -> Server:
    """tritonserver from PyTriton's wheel on a model repository holding one python-backend model."""
    venv = triton_venv()
    tree = next(venv.glob("lib/python*/site-packages/pytriton/tritonserver"))
    backends = workdir / f"{label}-backends" / "python"
    backends.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backends / f).symlink_to(tree / "backends" / "python" / f)
    # the stub that embeds this Python version (the wheel ships one per version)
    (backends / "triton_python_backend_stub").symlink_to(
        tree / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" /
        "triton_python_backend_stub")
    repo = workdir / f"{label}-repository"
    (repo / model / "1").mkdir(parents=True)
    (repo / model / "1" / "model.py").write_text(TRITON_MODEL)
    (repo / model / "config.pbtxt").write_text(TRITON_CONFIG.format(
        max_batch=TRITON_MAX_BATCH, delay_us=TRITON_QUEUE_DELAY_US, dims=", ".join(map(str, shape[1:])),
        onnx=pkg_dir / "model.onnx"))
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    return Server([str(tree / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
                   str(backends.parent), "--http-address", "127.0.0.1", "--http-port", str(http),
                   "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-address", "127.0.0.1",
                   "--metrics-port", str(metrics), "--exit-timeout-secs", "5"], http, workdir, label,
                  ready_path=f"/v2/models/{model}/ready", env=triton_env(venv),
                  grpc_target=f"127.0.0.1:{grpc_port}", start_timeout=180)


def expected(pkg_dir: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(pkg_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def check_answers(url: str, model: str, x: np.ndarray, pkg_dir: Path, binary: bool) -> None:
    """tritonclient.http's answer equals in-process onnxruntime's."""
    import tritonclient.http as th

    sent = x if binary else np.round(x, 4)
    c = th.InferenceServerClient(url.removeprefix("http://"))
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(sent, binary_data=binary)
    got = c.infer(model, [i], outputs=[th.InferRequestedOutput("probabilities", binary_data=binary)])
    np.testing.assert_allclose(got.as_numpy("probabilities"), expected(pkg_dir, sent), rtol=1e-4, atol=1e-5)
    c.close()


# --- gRPC and perf_analyzer slots (each takes the server's address) --------------------------------------------

def grpc_unanswered(target: str, model: str) -> str | None:
    """Why ``target`` cannot take gRPC ModelInfer for ``model``, or None when it can."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    c = tg.InferenceServerClient(target)
    try:
        if not c.is_server_live(client_timeout=3):
            return f"gRPC on {target}: server not live"
        if not c.is_model_ready(model, client_timeout=3):
            return f"gRPC on {target}: model {model} not ready"
    except InferenceServerException as exc:
        return f"no KServe v2 gRPC on {target} ({exc.message().splitlines()[0]})"
    finally:
        c.close()
    return None


def check_grpc_answers(target: str, model: str, x: np.ndarray, pkg_dir: Path) -> None:
    """tritonclient.grpc's answer equals in-process onnxruntime's."""
    import tritonclient.grpc as tg

    c = tg.InferenceServerClient(target)
    i = tg.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    got = c.infer(model, [i], outputs=[tg.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(got.as_numpy("probabilities"), expected(pkg_dir, x), rtol=1e-4, atol=1e-5)
    c.close()


def run_perf_analyzer(address: str, model: str, protocol: str, concurrency: int = 8) -> dict:
    """perf_analyzer against ``address`` (host:port of its HTTP or gRPC endpoint), pinned to the client CPU."""
    path, env = find_perf_analyzer()
    cmd = [path, "-m", model, "-u", address, "-i", protocol, "--concurrency-range", str(concurrency),
           "--measurement-interval", "3000"]
    try:
        done = subprocess.run(["taskset", "-c", CLIENT_CPU, *cmd], env=env, capture_output=True, text=True,
                              timeout=300)
        out, code = (done.stdout + done.stderr).strip(), done.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = f"timed out after 300 s\n{exc.stdout or ''}", None
    m = re.search(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec", out)
    return {"command": " ".join(["perf_analyzer", *cmd[1:]]), "returncode": code, "output": out,
            "throughput": float(m.group(2)) if m else None, "latency_us": int(m.group(3)) if m else None}


# --- profile -------------------------------------------------------------------------------------------------

def profile_server(pid: int, url: str, body: tuple, conc: int, seconds: int, lua: Path, out: Path) -> dict:
    """py-spy samples the thread holding the GIL while wrk loads the server: its hottest frames and files."""
    spy = subprocess.Popen(["taskset", "-c", CLIENT_CPU, "py-spy", "record", "--pid", str(pid), "--duration",
                            str(seconds), "--rate", "200", "--gil", "--format", "raw", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    load = wrk(url, body, conc, seconds + 2, lua)
    _, err = spy.communicate(timeout=60)
    if spy.returncode or not out.exists():
        raise RuntimeError(f"py-spy failed: {err[-1000:]}")
    own, incl, files, total = Counter(), Counter(), Counter(), 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += int(n)
        own[frames[-1]] += int(n)
        files[frames[-1].rpartition(" (")[2].rstrip(")")] += int(n)
        for f in set(frames):
            incl[f] += int(n)

    def top(c: Counter) -> list[list]:
        return [[f, round(v / total, 3)] for f, v in c.most_common(25)]

    return {"concurrency": conc, "rps_while_sampled": round(load["rps"], 1), "samples": total,
            "self_by_file": top(files), "self": top(own), "inclusive": top(incl)}


def _frame(f: str) -> str:
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", f)
    if not m:
        return f
    path = re.sub(r".*/(?:site-packages|lib/python3\.\d+)/", "", m.group(2))
    path = re.sub(r".*/(edgerun|plugins)/", r"\1/", path)
    return f"{m.group(1)} ({path})"


# --- main ------------------------------------------------------------------------------------------------

FLOOR, EDGERUN, UNBATCHED, FASTAPI, TRITON = ("in-process (floor)", "edgerun", "edgerun batching off",
                                              "FastAPI + onnxruntime", "Triton")
# edgerun's defaults, gRPC served by another of its servers than the default (loop) one
NATIVE, GRPCIO = "edgerun on gRPC C++ (native)", "edgerun on grpcio"
BATCHING = {FLOOR: "-", EDGERUN: "default", UNBATCHED: "off", FASTAPI: "-", NATIVE: "default", GRPCIO: "default",
            TRITON: f"dynamic <= {TRITON_MAX_BATCH}, {TRITON_QUEUE_DELAY_US} us"}
GRPC_ONLY = (NATIVE, GRPCIO)  # contenders measured over gRPC only


def median_of(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")}
    cpus = [r["client_cpu"] for r in runs if r["client_cpu"] is not None]
    med["client_cpu"] = max(cpus) if cpus else None
    med["runs"] = [round(r["rps"], 1) for r in runs]
    return med


def resummarize(path: Path) -> None:
    """Recompute the ratios, table and targets of a saved results file (after changing the summary)."""
    data = json.loads(path.read_text())
    summary = summarize(data["rows"], data.get("loopback_rtt"))
    data["targets"], data["table"] = summary["targets"], render(data["rows"])
    path.write_text(json.dumps(data, indent=2))
    print(data["table"], "", *summary["lines"], sep="\n")


def start_servers(model: str, pkg_dir: Path, shape: tuple, work: Path, with_triton: bool,
                  with_fastapi: bool) -> dict:
    servers: dict[str, Server] = {}
    try:
        servers[EDGERUN] = edgerun_default_server(pkg_dir, work, f"edgerun-{model}")
        if with_triton:
            servers[TRITON] = triton_server(pkg_dir, model, shape, work, f"triton-{model}")
        servers[UNBATCHED] = edgerun_unbatched_server(pkg_dir, work, f"edgerun-{model}-batching-off")
        if native_built():
            servers[NATIVE] = edgerun_default_server(pkg_dir, work, f"edgerun-{model}-native", "native")
        servers[GRPCIO] = edgerun_default_server(pkg_dir, work, f"edgerun-{model}-grpcio", "grpcio")
        if with_fastapi:
            servers[FASTAPI] = fastapi_server(pkg_dir, work, f"fastapi-{model}")
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each measured run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat of 2 s")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--no-triton", action="store_true", help="leave Triton (and perf_analyzer) out")
    ap.add_argument("--profile", action="store_true", help="py-spy the edgerun server at c=8/32 on the MLP, JSON")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--summarize", type=Path, help="only recompute the summary of a saved results file")
    args = ap.parse_args()
    if args.summarize:
        resummarize(args.summarize)
        return
    if args.quick:
        args.duration, args.repeats, args.warmup = 2.0, 1, 1.0
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    if args.profile and shutil.which("py-spy") is None:
        sys.exit("py-spy not found: pip install py-spy")
    try:
        import fastapi  # noqa: F401
        have_fastapi = True
    except ImportError:
        have_fastapi = False
        print("fastapi not installed: skipping the hand-rolled baseline (pip install fastapi)", file=sys.stderr)
    if not args.no_triton:
        triton_venv()

    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        print(f"the host is busy (load average {load_before[0]:.1f}): figures may be noisy", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="edgerun-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    lua = work / "post.lua"
    lua.write_text(LUA)
    pkgs = make_packages(work)
    rng = np.random.default_rng(0)
    rows, skipped, perf, profiles, edgerun_models = [], [], [], [], {}
    echoes: list[dict] = []  # the bare loopback round trip, measured beside the MLP's c=1 runs

    def report(label: str, runs: list[dict]) -> dict:
        if not runs:
            print(f"  {label}: every run failed", flush=True)
            return {"rps": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"), "client_cpu": None,
                    "runs": [], "error": "every run failed"}
        m = median_of(runs)
        print(f"  {label:<44} {m['rps']:>9.1f} req/s  p50 {m['p50_ms']:8.3f} ms  p99 {m['p99_ms']:8.3f} ms"
              + (f"  client cpu {m['client_cpu']:.0%}" if m["client_cpu"] is not None else ""), flush=True)
        return m

    def http_run(url: str, body: tuple, conc: int, duration: float, warmup: float) -> dict:
        wrk(url, body, conc, warmup, lua)
        return wrk(url, body, conc, duration, lua)

    for model in args.models.split(","):
        pkg_dir, shape = pkgs[model]
        x = rng.random(shape, dtype=np.float32)
        bodies = make_bodies(x, model, work)
        path = f"/v2/models/{model}/infer"
        print(f"{model}:", flush=True)
        servers = start_servers(model, pkg_dir, shape, work, not args.no_triton, have_fastapi)
        try:
            meta = httpx.get(f"{servers[EDGERUN].url}/v2/models/{model}").json()
            edgerun_models[model] = {"platform": meta["platform"], **meta.get("parameters", {})}
            if meta["platform"] != "onnxruntime_onnx":
                raise RuntimeError(f"edgerun's defaults no longer give onnxruntime: {meta}")
            # edgerun batches by default where stacking requests measured faster at load (a model whose runs cost
            # as much per row batched as alone is served unbatched): the row says which it chose
            default_batching = "on (default)" if meta.get("parameters", {}).get("batching") else "off (default)"
            for name, srv in servers.items():
                for enc in () if name in GRPC_ONLY else ("json",) if name == FASTAPI else ("json", "binary"):
                    check_answers(srv.url, model, x, pkg_dir, enc == "binary")
            frontend = re.search(r"gRPC on \S+ \((\w+) server\)", servers[EDGERUN].log_path.read_text())
            edgerun_models[model]["grpc_server"] = frontend.group(1) if frontend else "unknown"
            grpc_targets = {}
            for name in (EDGERUN, NATIVE, GRPCIO, TRITON):
                if name not in servers:
                    continue
                reason = grpc_unanswered(servers[name].grpc_target, model)
                if reason is not None:
                    skipped.append({"model": model, "server": name, "encoding": "grpc", "reason": reason})
                    print(f"  {name} gRPC rows skipped: {reason}", flush=True)
                    continue
                check_grpc_answers(servers[name].grpc_target, model, x, pkg_dir)
                grpc_targets[name] = servers[name].grpc_target

            # each cell measures every contender in turn, repeat by repeat, so a slow spell of this shared host
            # falls on all of them and the ratios stay side by side
            for conc in CONCURRENCY:
                contenders = {(FLOOR, "-"): lambda d, w, c=conc: in_process(pkg_dir, x, c, d, w)}
                for enc in ("json", "binary"):
                    for name, srv in servers.items():
                        if name not in GRPC_ONLY and (enc == "json" or name != FASTAPI):
                            contenders[name, enc] = (lambda d, w, c=conc, e=enc, u=srv.url + path:
                                                     http_run(u, bodies[e], c, d, w))
                for name, target in grpc_targets.items():
                    contenders[name, "grpc"] = (lambda d, w, c=conc, t=target, u=servers[name].url:
                                                grpc_load(t, bodies["grpc"][0], c, w, d, f"{u}/v2/models/{model}/stats"))
                runs: dict[tuple, list[dict]] = {k: [] for k in contenders}
                for _ in range(args.repeats):
                    for key, run_one in contenders.items():
                        waited = settle(servers.values())
                        if waited > 2:
                            print(f"  waited {waited:.1f} s for the servers to go idle before {key} c={conc}",
                                  flush=True)
                        try:
                            runs[key].append(run_one(args.duration, args.warmup))
                        except (RuntimeError, subprocess.CalledProcessError) as exc:
                            print(f"  {key} c={conc}: run failed: {exc}", flush=True)
                    if model == "mlp" and conc == 1:
                        echo = loopback_rtt(work)
                        if echo is not None:
                            echoes.append(echo)
                for (name, enc), got in runs.items():
                    m = report(f"{name} {enc} c={conc}", got)
                    batching = default_batching if name in (EDGERUN, NATIVE, GRPCIO) else BATCHING[name]
                    rows.append({"model": model, "server": name, "encoding": enc, "batching": batching,
                                 "concurrency": conc, **m})

            if model == "mlp" and not args.no_triton:
                for name, srv in servers.items():
                    if name in (EDGERUN, TRITON):
                        perf.append({"server": name, **run_perf_analyzer(srv.url.removeprefix("http://"), model,
                                                                         "http")})
                        if name in grpc_targets:
                            perf.append({"server": name, **run_perf_analyzer(grpc_targets[name], model, "grpc")})
                for p in perf:
                    print(f"\n  perf_analyzer against {p['server']} (exit {p['returncode']}): {p['command']}")
                    print(textwrap.indent(p["output"], "    "), flush=True)
            if model == "mlp" and args.profile:
                for conc in (8, 32):
                    prof = profile_server(servers[EDGERUN].proc.pid, servers[EDGERUN].url + path, bodies["json"],
                                          conc, 10, lua, work / f"py-spy-c{conc}.txt")
                    profiles.append(prof)
                    print(render_profile(prof), flush=True)
        finally:
            for srv in servers.values():
                srv.stop()

    loopback = {"p50_us": statistics.median(e["p50_us"] for e in echoes), "runs": echoes} if echoes else None
    if loopback is not None:
        print(f"  bare loopback TCP round trip (C, epoll), CPU {SERVER_CPU} to {CLIENT_CPU}: "
              f"{loopback['p50_us']:.0f} us at the median", flush=True)
    summary = summarize(rows, loopback)
    table = render(rows)
    print()
    print(table)
    print()
    for line in summary["lines"]:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "method": f"servers on CPU {SERVER_CPU}; wrk -t1 (HTTP) and h2load -t1 -m1 (gRPC) on CPU {CLIENT_CPU}; "
                  f"{args.warmup}s warm-up + {args.duration}s measured, median of {args.repeats}, each cell's "
                  "contenders in turn, each run started once every server is idle; onnxruntime 1 thread; batch-1 "
                  "FP32; edgerun default settings with EDGERUN_THREADS=1; Triton 2.51 (tritonserver of "
                  "nvidia-pytriton 0.7.0, python backend + onnxruntime, "
                  f"dynamic batching <= {TRITON_MAX_BATCH}, {TRITON_QUEUE_DELAY_US} us)",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "cpu": _cpu_model(), "load_average_before": [round(v, 2) for v in load_before],
                 "load_average_after": [round(v, 2) for v in os.getloadavg()]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edgerun_models": edgerun_models, "rows": rows, "skipped": skipped, "loopback_rtt": loopback,
        "targets": summary["targets"],
        "perf_analyzer": perf, "profile": profiles, "table": table}, indent=2))
    print(f"\nsaved {args.out}")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = re.search(r"flags\s*:\s*(.*)", text)
    simd = [f for f in ("avx2", "avx512f") if flags and f in flags.group(1).split()]
    return f"{name.group(1) if name else '?'} ({', '.join(simd) or 'no AVX2'})"


# --- summary -------------------------------------------------------------------------------------------------

def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def add_ratios(rows: list[dict]) -> None:
    """Each row's req/s over Triton's (same model, concurrency, encoding; JSON for the floor) and the floor's."""
    for r in rows:
        enc = "json" if r["encoding"] == "-" else r["encoding"]
        t = _find(rows, model=r["model"], server=TRITON, encoding=enc, concurrency=r["concurrency"])
        f = _find(rows, model=r["model"], server=FLOOR, concurrency=r["concurrency"])
        r["vs_triton"] = round(r["rps"] / t["rps"], 3) if t and t["rps"] == t["rps"] else None
        r["vs_floor"] = round(r["rps"] / f["rps"], 3) if f and f["rps"] == f["rps"] else None


def summarize(rows: list[dict], loopback: dict | None = None) -> dict:
    """The targets met and missed, and lines worth reading beside them; ``loopback``: loopback_rtt's median."""
    add_ratios(rows)
    lines, targets = [], {}

    def target(key: str, value: float | None, op: str, bound: float, text: str) -> None:
        if value is None or value != value:
            return
        met = value >= bound if op == ">=" else value <= bound
        targets[key] = {"value": round(value, 3), "target": f"{op} {bound}", "met": met}
        lines.append(f"{'met ' if met else 'MISS'} {text}: {value:.3g} (target {op} {bound})")

    for conc, bound in ((1, 2.5), (8, 1.5), (32, 1.5)):
        e = _find(rows, model="mlp", server=EDGERUN, encoding="json", concurrency=conc)
        target(f"mlp_json_c{conc}_vs_triton", e and e["vs_triton"], ">=", bound,
               f"mlp json c={conc}: edgerun / Triton")
    for conc in CONCURRENCY:
        e = _find(rows, model="mlp", server=EDGERUN, encoding="binary", concurrency=conc)
        if e and e["vs_triton"] is not None:
            lines.append(f"     mlp binary c={conc}: edgerun / Triton: {e['vs_triton']:.2f} (no target)")
    for enc in ("binary", "grpc"):
        for conc in CONCURRENCY:
            e = _find(rows, model="cnn", server=EDGERUN, encoding=enc, concurrency=conc)
            target(f"cnn_{enc}_c{conc}_vs_floor", e and e["vs_floor"], ">=", 0.9,
                   f"cnn {enc} c={conc}: edgerun / in-process floor")
    g, b = (_find(rows, model="mlp", server=EDGERUN, encoding=enc, concurrency=32) for enc in ("grpc", "binary"))
    if g and b:
        target("mlp_c32_grpc_vs_binary", g["rps"] / b["rps"], ">=", 1.0, "mlp c=32: edgerun gRPC / HTTP binary")
    for other, whose in ((NATIVE, "the native one"), (GRPCIO, "grpcio's")):
        for conc in CONCURRENCY:
            n, o = (_find(rows, model="mlp", server=s, encoding="grpc", concurrency=conc) for s in (EDGERUN, other))
            if n and o and n["rps"] == n["rps"] and o["rps"] == o["rps"]:
                lines.append(f"     mlp grpc c={conc}: edgerun's default gRPC server / {whose}: "
                             f"{n['rps'] / o['rps']:.2f} (no target)")
    floor1 = _find(rows, model="mlp", server=FLOOR, concurrency=1)
    for enc, bound in (("json", 300), ("binary", 300), ("grpc", 200)):
        s = _find(rows, model="mlp", server=EDGERUN, encoding=enc, concurrency=1)
        if floor1 and s:
            added = (s["p50_ms"] - floor1["p50_ms"]) * 1e3
            target(f"mlp_c1_added_us_p50_{enc}", added, "<=", bound,
                   f"mlp c=1 {enc}: edgerun's added latency over in-process at the median, us")
            if loopback is not None:
                lines.append(f"     mlp c=1 {enc}: that less a bare loopback TCP round trip between the two CPUs "
                             f"({loopback['p50_us']:.0f} us): {added - loopback['p50_us']:.0f} us (no target)")
    on, off, fa = (_find(rows, model="mlp", server=s, encoding="json", concurrency=32)
                   for s in (EDGERUN, UNBATCHED, FASTAPI))
    if on and off:
        target("mlp_c32_batching_speedup", on["rps"] / off["rps"], ">=", 2.0, "mlp c=32 json: batching on / off")
    if on and fa:
        target("mlp_c32_vs_fastapi", on["rps"] / fa["rps"], ">=", 1.5, "mlp c=32 json: edgerun / FastAPI")
    for r in rows:
        if r["client_cpu"] is not None and r["client_cpu"] >= CLIENT_BOUND:
            lines.append(f"note: the load generator used {r['client_cpu']:.0%} of its core for {r['server']} "
                         f"{r['encoding']} c={r['concurrency']} ({r['model']}): that figure may be the client's limit")
    return {"lines": lines, "targets": targets}


def render(rows: list[dict]) -> str:
    out = ["| model | c | server | encoding | batching | req/s (runs) | p50 ms | p99 ms | x Triton | x floor | "
           "client CPU |", "|---|--:|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        cpu = f"{r['client_cpu']:.0%}" if r["client_cpu"] is not None else "-"
        runs = "/".join(f"{v:,.0f}" for v in r.get("runs", []))
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        out.append(f"| {r['model']} | {r['concurrency']} | {r['server']} | {r['encoding']} | {r['batching']} | "
                   f"{r['rps']:,.0f} ({runs}) | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {ratio(r.get('vs_triton'))} | "
                   f"{ratio(r.get('vs_floor'))} | {cpu} |")
    return "\n".join(out)


def render_profile(prof: dict) -> str:
    lines = [f"\n  edgerun under py-spy --gil, MLP json c={prof['concurrency']} ({prof['rps_while_sampled']:,.0f} "
             f"req/s while sampled, {prof['samples']} samples): share of the samples holding the GIL"]
    for kind in ("self_by_file", "self", "inclusive"):
        lines.append(f"    {kind}:")
        lines += [f"      {share:6.1%}  {frame}" for frame, share in prof[kind][:15]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
