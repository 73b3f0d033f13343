"""Benchmark ``edgerun serve`` against the in-process runtime (the floor) and a hand-rolled FastAPI server.

    python benchmarks/serve.py                 # full run: table on stdout, results in benchmarks/results/serve.json
    python benchmarks/serve.py --quick         # 1 repeat of 2 s, for a smoke test

Method (as in shared/PEERS.md): the server and everything it starts pinned to CPU 0, the load generator
(``wrk``, one thread, keep-alive, closed loop) to CPU 1; onnxruntime with 1 intra-op and 1 inter-op thread;
batch-1 FP32 requests to ``POST /v2/models/{m}/infer``; warm-up, then a measured run; median of the repeats.
All servers of a model run at once (idle but one); each table cell's contenders are measured in turn, repeat
by repeat, so the ratios compare runs taken side by side on this shared host.
Every server's answer is first checked against in-process onnxruntime with tritonclient.http.
Needs ``wrk`` (Debian package) and, for the baseline, ``fastapi``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
SERVER_CPU, CLIENT_CPU = "0", "1"
CONCURRENCY = (1, 8, 32)

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

def make_bodies(x: np.ndarray, workdir: Path, name: str) -> dict:
    from edgerun.server.codec import encode_request

    out = {}
    json_body = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                          "data": np.round(x, 4).ravel().tolist()}]})
    p = workdir / f"{name}.json"
    p.write_bytes(json_body)
    out["json"] = (p, "application/json", "")
    body, hlen = encode_request({"input": x}, binary=True)
    p = workdir / f"{name}.bin"
    p.write_bytes(body)
    out["binary"] = (p, "application/octet-stream", str(hlen))
    return out


# --- load generation -------------------------------------------------------------------------------------

def _seconds(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, body: tuple, conc: int, duration: float, lua: Path) -> dict:
    path, ctype, hlen = body
    env = {**os.environ, "BENCH_BODY": str(path), "BENCH_CTYPE": ctype, "BENCH_HLEN": hlen}
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s",
           "-s", str(lua), url]
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
    def __init__(self, cmd: list[str], port: int, workdir: Path, label: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(workdir / f"{label}.log", "wb")
        env = {**os.environ, "EDGERUN_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{label} exited: {(workdir / f'{label}.log').read_text()}")
            try:
                httpx.get(self.url + "/v2/health/ready", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"{label} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def edgerun_server(pkg_dir: Path, batching: bool, workdir: Path, label: str) -> Server:
    port = free_port()
    cfg = workdir / f"{label}.toml"
    cfg.write_text(textwrap.dedent(f"""
        threads = 1
        state_dir = "{workdir / 'state'}"
        [[models]]
        path = "{pkg_dir}"
        backend = "onnxruntime"
        [models.batching]
        enabled = {str(batching).lower()}
    """))
    return Server([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", "serve",
                   "--config", str(cfg), "--port", str(port)], port, workdir, label)


def fastapi_server(pkg_dir: Path, workdir: Path, label: str) -> Server:
    script = workdir / "fastapi_server.py"
    script.write_text(FASTAPI_SERVER)
    port = free_port()
    return Server([sys.executable, str(script), str(pkg_dir / "model.onnx"), str(port)], port, workdir, label)


def check_answers(url: str, model: str, x: np.ndarray, pkg_dir: Path, binary: bool) -> None:
    """tritonclient.http's answer equals in-process onnxruntime's."""
    import onnxruntime as ort
    import tritonclient.http as th

    want = ort.InferenceSession(str(pkg_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.round(x, 4) if not binary else x})[0]
    c = th.InferenceServerClient(url.removeprefix("http://"))
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(np.round(x, 4) if not binary else x, binary_data=binary)
    got = c.infer(model, [i], outputs=[th.InferRequestedOutput("probabilities", binary_data=binary)])
    np.testing.assert_allclose(got.as_numpy("probabilities"), want, rtol=1e-4, atol=1e-5)
    c.close()


# --- main ------------------------------------------------------------------------------------------------

def median_of(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")}
    cpus = [r["client_cpu"] for r in runs if r["client_cpu"] is not None]
    med["client_cpu"] = max(cpus) if cpus else None
    med["runs"] = [round(r["rps"], 1) for r in runs]
    return med


def resummarize(path: Path) -> None:
    """Recompute the table and targets of a saved results file (after changing the summary)."""
    data = json.loads(path.read_text())
    summary = summarize(data["rows"])
    data["targets"], data["table"] = summary["targets"], render(data["rows"])
    path.write_text(json.dumps(data, indent=2))
    print(data["table"], "", *summary["lines"], sep="\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each measured run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat of 2 s")
    ap.add_argument("--models", default="mlp,cnn")
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
    try:
        import fastapi  # noqa: F401
        have_fastapi = True
    except ImportError:
        have_fastapi = False
        print("fastapi not installed: skipping the hand-rolled baseline (pip install fastapi)", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="edgerun-bench-"))
    lua = work / "post.lua"
    lua.write_text(LUA)
    pkgs = make_packages(work)
    rng = np.random.default_rng(0)
    rows = []

    def report(label: str, runs: list[dict]) -> dict:
        if not runs:
            print(f"  {label}: every run failed", flush=True)
            return {"rps": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"), "client_cpu": None,
                    "runs": [], "error": "every run failed"}
        m = median_of(runs)
        print(f"  {label:<46} {m['rps']:>9.1f} req/s  p50 {m['p50_ms']:7.3f} ms  p99 {m['p99_ms']:7.3f} ms"
              + (f"  client cpu {m['client_cpu']:.0%}" if m["client_cpu"] is not None else ""), flush=True)
        return m

    for model in args.models.split(","):
        pkg_dir, shape = pkgs[model]
        x = rng.random(shape, dtype=np.float32)
        bodies = make_bodies(x, work, model)
        url = f"/v2/models/{model}/infer"
        print(f"{model}:", flush=True)
        # every server runs for the whole model; each cell measures its contenders in turn, repeat by repeat,
        # so a slow spell of this shared host falls on all of them and the ratios stay side by side
        servers: dict[tuple[str, str], Server] = {}
        try:
            for batching in ("off", "on"):
                servers["edgerun", batching] = edgerun_server(pkg_dir, batching == "on", work,
                                                              f"edgerun-{model}-batching-{batching}")
            if have_fastapi:
                servers["FastAPI + onnxruntime", "off"] = fastapi_server(pkg_dir, work, f"fastapi-{model}")
            for (name, batching), srv in servers.items():
                for enc in ("json", "binary") if name == "edgerun" else ("json",):
                    check_answers(srv.url, model, x, pkg_dir, enc == "binary")
            results: dict[tuple, dict] = {}
            for enc in ("json", "binary"):
                for conc in CONCURRENCY:
                    contenders = {}
                    if enc == "json":
                        contenders["in-process (floor)", "-", "-"] = (
                            lambda d, c=conc: in_process(pkg_dir, x, c, d, 0.0))
                    for (name, batching), srv in servers.items():
                        if name == "edgerun" or enc == "json":
                            contenders[name, enc, batching] = (
                                lambda d, c=conc, e=enc, u=srv.url + url: wrk(u, bodies[e], c, d, lua))
                    runs: dict[tuple, list[dict]] = {k: [] for k in contenders}
                    for _ in range(args.repeats):
                        for key, run_one in contenders.items():
                            try:
                                run_one(args.warmup)
                                runs[key].append(run_one(args.duration))
                            except (RuntimeError, subprocess.CalledProcessError) as exc:
                                print(f"  {key} c={conc}: run failed: {exc}", flush=True)
                    for (name, e, batching), got in runs.items():
                        label = name if name != "edgerun" else f"edgerun {e} batching {batching}"
                        results[name, e, batching, conc] = report(f"{label} c={conc}", got)
        finally:
            for srv in servers.values():
                srv.stop()
        order = [("in-process (floor)", "-", "-"), ("edgerun", "json", "off"), ("edgerun", "binary", "off"),
                 ("edgerun", "json", "on"), ("edgerun", "binary", "on"), ("FastAPI + onnxruntime", "json", "off")]
        for name, enc, batching in order:
            for conc in CONCURRENCY:
                m = results.get((name, enc, batching, conc))
                if m is not None:
                    rows.append({"model": model, "server": name, "encoding": enc, "batching": batching,
                                 "concurrency": conc, **m})

    summary = summarize(rows)
    table = render(rows)
    print()
    print(table)
    print()
    for line in summary["lines"]:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "method": f"server on CPU {SERVER_CPU}, wrk -t1 on CPU {CLIENT_CPU}; {args.warmup}s warm-up + "
                  f"{args.duration}s measured, median of {args.repeats}; onnxruntime 1 thread; batch-1 FP32",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows, "targets": summary["targets"], "table": table}, indent=2))
    print(f"\nsaved {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def _find(rows, **kw):
    for r in rows:
        if all(r[k] == v for k, v in kw.items()):
            return r
    return None


def summarize(rows: list[dict]) -> dict:
    lines, targets = [], {}
    floor1 = _find(rows, model="mlp", server="in-process (floor)", concurrency=1)
    for enc in ("json", "binary"):
        s = _find(rows, model="mlp", server="edgerun", encoding=enc, batching="on", concurrency=1)
        if floor1 and s:
            added = 1e6 / s["rps"] - 1e6 / floor1["rps"]
            added_p50 = (s["p50_ms"] - floor1["p50_ms"]) * 1e3
            targets[f"mlp_c1_added_us_{enc}"] = round(added, 1)
            targets[f"mlp_c1_added_us_p50_{enc}"] = round(added_p50, 1)
            lines.append(f"mlp c=1 {enc}: server adds {added:.0f} us/request on average, {added_p50:.0f} us at the "
                         "median, over in-process (target <= 300)")
    on = _find(rows, model="mlp", server="edgerun", encoding="json", batching="on", concurrency=32)
    off = _find(rows, model="mlp", server="edgerun", encoding="json", batching="off", concurrency=32)
    fa = _find(rows, model="mlp", server="FastAPI + onnxruntime", concurrency=32)
    if on and off:
        targets["mlp_c32_batching_speedup"] = round(on["rps"] / off["rps"], 2)
        lines.append(f"mlp c=32 json: batching on/off = {on['rps'] / off['rps']:.2f}x (target >= 2)")
    if on and fa:
        targets["mlp_c32_vs_fastapi"] = round(on["rps"] / fa["rps"], 2)
        lines.append(f"mlp c=32 json batching on vs hand-rolled FastAPI = {on['rps'] / fa['rps']:.2f}x (target >= 1.5)")
    if on:
        lines.append(f"mlp c=32 json batching on: {on['rps']:.0f} req/s (Triton in PEERS.md: 5,277)")
    cf = _find(rows, model="cnn", server="in-process (floor)", concurrency=32)
    cb = max((r for r in rows if r["model"] == "cnn" and r["server"] == "edgerun" and r["encoding"] == "binary"
              and r["concurrency"] == 32), key=lambda r: r["rps"], default=None)
    if cf and cb:
        targets["cnn_c32_binary_vs_floor"] = round(cb["rps"] / cf["rps"], 3)
        lines.append(f"cnn c=32 binary: {cb['rps'] / cf['rps']:.0%} of the in-process floor (target >= 80%)")
    return {"lines": lines, "targets": targets}


def render(rows: list[dict]) -> str:
    head = "| model | server | encoding | batching | concurrency | req/s | p50 ms | p99 ms | client CPU |"
    out = [head, "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = f"{r['client_cpu']:.0%}" if r["client_cpu"] is not None else "-"
        out.append(f"| {r['model']} | {r['server']} | {r['encoding']} | {r['batching']} | {r['concurrency']} | "
                   f"{r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {cpu} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
