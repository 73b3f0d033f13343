"""Model updates over MQTT, measured: publish → active time, inference latency during the swap, a 50-device fleet.

    python benchmarks/update.py                      # 1, 20, 100 MB; MQTT chunks and HTTP URL; 50-device fleet
    python benchmarks/update.py --sizes 1,20 --fleet 10 --out /tmp/update.json

Everything is local and real: a Mosquitto on a free port, `edgerun serve --config` as the device (HTTP load
through its KServe v2 endpoint), `edgerun.hub.publish` as the hub, a Range-capable static server for URLs.
For each size the device first gets a base version of that size (not measured), then one update per
transfer mode, so "before" and "during" latencies are of the same model. Times come from the device's own
event timestamps (same host clock). The fleet run starts N lightweight device processes (Runtime + Agent,
no HTTP server) and times one 1 MB release until every device reports `active`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGERUN_TUNING_MODE", "off")  # tune.py measures tuning: here it would skew the figures

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgerun.contract import Topics  # noqa: E402
from edgerun.hub.keys import generate  # noqa: E402
from edgerun.hub.publish import publish_release  # noqa: E402
from edgerun.manifest import load_private_key  # noqa: E402
from edgerun.mqtt import Broker, Connection  # noqa: E402
from edgerun.package import ModelPackage, Sample, Variant, file_entry, save_package  # noqa: E402
from edgerun.tensors import TensorSpec  # noqa: E402
from edgerun.testing.blobs import BlobServer  # noqa: E402
from edgerun.testing.mosquitto import Mosquitto, free_port  # noqa: E402

FLOAT = 4


def make_package(root: Path, size_mb: float, version: int, seed: int = 0) -> ModelPackage:
    """A 64→h→10 ONNX MLP whose file is about ``size_mb`` MB, with a warm-up sample."""
    import onnxruntime as ort

    from edgerun.testing.models import mlp_onnx, random_mlp_weights

    hidden = max(8, int(size_mb * 1e6 / (FLOAT * 75)))
    root.mkdir(parents=True, exist_ok=True)
    path = mlp_onnx(random_mlp_weights([64, hidden, 10], seed=seed), root / "model.onnx")
    x = np.random.default_rng(seed).random((1, 64), dtype=np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    pkg = ModelPackage(name="bench", version=version, inputs=[TensorSpec("input", "FP32", (-1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
                       variants=[Variant("onnx-fp32", "onnx", "fp32", (file_entry(root, "model.onnx"),),
                                         accuracy=0.9, atol=1e-3)],
                       samples=[Sample({"input": x}, {"probabilities": y})])
    save_package(pkg, root)
    return ModelPackage.load(root)


def as_version(pkg: ModelPackage, version: int) -> ModelPackage:
    save_package(replace(pkg, version=version, raw={}), pkg.root)
    return ModelPackage.load(pkg.root)


class Events:
    """The fleet's events and states as the hub sees them."""

    def __init__(self, port: int, fleet: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.events: list[dict] = []
        self.online: dict[str, bool] = {}
        self.cond = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}")
        self.c.on_connect = lambda c, *a: c.subscribe([(f"edgerun/v1/{fleet}/devices/+/events", 1),
                                                        (f"edgerun/v1/{fleet}/devices/+/state", 1)])
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, c, u, msg) -> None:
        data = json.loads(msg.payload) if msg.payload else {}
        with self.cond:
            if msg.topic.endswith("/events"):
                data["device"] = msg.topic.split("/")[-2]
                data["received"] = time.time()
                self.events.append(data)
            else:
                self.online[msg.topic.split("/")[-2]] = bool(data.get("online"))
            self.cond.notify_all()

    def wait(self, pred, timeout: float):
        end = time.monotonic() + timeout
        with self.cond:
            while not (got := pred()):
                if time.monotonic() > end:
                    raise TimeoutError(f"timed out; last events {self.events[-5:]}")
                self.cond.wait(0.2)
            return got

    def final(self, version: int, device: str | None = None, timeout: float = 600) -> dict:
        return self.wait(lambda: next((e for e in self.events if e["version"] == version and
                                       e["state"] in ("active", "failed", "rejected") and
                                       (device is None or e["device"] == device)), None), timeout)


def _load_loop(port: int, model: str, stop, conn) -> None:
    import httpx

    samples = []
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        while not stop.is_set():
            t0 = time.time()
            try:
                ok = client.post(f"/v2/models/{model}/infer", json=body).status_code == 200
            except Exception:
                ok = False
            samples.append((t0, time.time() - t0, ok))
    conn.send(samples)


class Load:
    """Closed-loop HTTP inference from its own process (so the hub's work here does not slow the client)."""

    def __init__(self, port: int, model: str):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_load_loop, args=(port, model, self._stop, send), daemon=True)
        self._proc.start()
        self.samples: list[tuple[float, float, bool]] = []

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.samples if start <= s[0] < end]

    def stop(self) -> None:
        self._stop.set()
        self.samples = self._recv.recv()
        self._proc.join()


def quiet(threshold: float, patience: float = 180) -> None:
    """Wait (up to ``patience`` s) until the 1-minute load average is below ``threshold``: a shared machine."""
    end = time.monotonic() + patience
    while os.getloadavg()[0] > threshold and time.monotonic() < end:
        time.sleep(2)


def p(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def start_device(work: Path, broker: Mosquitto, fleet: str, keydir: Path, name: str, *, http: bool = True):
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = work / "edgerun.toml"
    cfg.write_text(f'state_dir = "{work / "state"}"\nthreads = 1\nlog_level = "WARNING"\n'
                   f'[server]\nport = {port}\n'
                   f'[mqtt]\nenabled = true\nport = {broker.port}\nfleet = "{fleet}"\ndevice_id = "{name}"\n'
                   f'trusted_keys = "{keydir}"\nkeepalive = 10\n')
    log = open(work / "device.log", "w")
    if http:
        cmd = [sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
               "serve", "--config", str(cfg)]
    else:
        cmd = [sys.executable, __file__, "--sim-device", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, port


def wait_http(port: int, proc, timeout: float = 60) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("device exited")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError("device HTTP not up")


def sim_device(config: str) -> None:
    """A device without the HTTP server: Runtime + Agent, until SIGTERM."""
    from edgerun.agent import Agent
    from edgerun.config import load_config
    from edgerun.runtime import Runtime

    cfg = load_config(config)
    rt = Runtime(profile=cfg.profile, threads=1)
    agent = Agent(rt, cfg)
    agent.restore()
    agent.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    done.wait()
    agent.stop()


def run_updates(args, work: Path, broker: Mosquitto, keydir: Path, key) -> list[dict]:
    fleet = "bench"
    events = Events(broker.port, fleet)
    proc, port = start_device(work / "device", broker, fleet, keydir, "dev")
    wait_http(port, proc)
    rows = []
    version = 0
    opts = Broker(port=broker.port)
    try:
        with BlobServer(work / "blobs") as blobs, Connection(opts, persistent=False) as hub:
            for size in args.sizes:
                base = make_package(work / f"pkg-{size}", size, version + 1, seed=int(size))
                version += 1
                publish_release(hub, Topics(fleet), base, key, "bench")
                events.final(version)
                for mode in [m for _ in range(args.repeat) for m in args.modes]:
                    version += 1
                    pkg = as_version(base, version)
                    quiet(args.quiet_load)
                    load = Load(port, "bench")
                    time.sleep(args.before + 1.0)  # 1 s for the load process to start
                    t0 = time.time()
                    if mode == "mqtt":
                        publish_release(hub, Topics(fleet), pkg, key, "bench")
                    else:
                        publish_release(hub, Topics(fleet), pkg, key, "bench", mqtt=False, url_base=blobs.url,
                                        blob_dir=blobs.root)
                    t_published = time.time()
                    final = events.final(version)
                    time.sleep(1.0)
                    load.stop()
                    mine = [e for e in events.events if e["version"] == version and e["device"] == "dev"]
                    at = {e["state"]: e["ts"] for e in mine}
                    before = load.window(t0 - args.before, t0)
                    during = load.window(t0, final["ts"] + 1.0)
                    swap = load.window(at.get("warming", t0), final["ts"] + 1.0)
                    row = {"size_mb": size, "bytes": pkg.variants[0].size, "mode": mode, "state": final["state"],
                           "publish_s": round(t_published - t0, 3),
                           "publish_to_active_s": round(final["ts"] - t0, 3),
                           "download_s": round(at.get("verifying", t0) - at.get("downloading", t0), 3),
                           "verify_stage_s": round(at.get("warming", t0) - at.get("verifying", t0), 3),
                           "warm_swap_s": round(final["ts"] - at.get("warming", t0), 3),
                           "p50_before_ms": p([s[1] for s in before], 50),
                           "p99_before_ms": p([s[1] for s in before], 99),
                           "p99_update_ms": p([s[1] for s in during], 99),
                           "p99_swap_ms": p([s[1] for s in swap], 99),
                           "requests": len(before) + len(during), "loadavg_1m": round(os.getloadavg()[0], 1),
                           "failed": sum(1 for s in before + during if not s[2])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        events.c.loop_stop()
    return rows


def run_fleet(args, work: Path, broker: Mosquitto, keydir: Path, key) -> dict:
    fleet = "benchfleet"
    events = Events(broker.port, fleet)
    procs = []
    quiet(args.quiet_load)
    try:
        t_start = time.time()
        for i in range(args.fleet):
            procs.append(start_device(work / f"sim{i:02d}", broker, fleet, keydir, f"sim{i:02d}", http=False)[0])
        events.wait(lambda: sum(events.online.values()) >= args.fleet, timeout=600)
        t_online = time.time()
        time.sleep(2.0)  # let the start-up CPU burst settle
        pkg = make_package(work / "fleet-pkg", 1.0, 1, seed=7)
        with Connection(Broker(port=broker.port), persistent=False) as hub:
            t0 = time.time()
            publish_release(hub, Topics(fleet), pkg, key, "bench")
        done = events.wait(lambda: (lambda fin: fin if len(fin) >= args.fleet else None)(
            {e["device"]: e for e in events.events if e["version"] == 1 and e["state"] in
             ("active", "failed", "rejected")}), timeout=900)
        times = sorted(e["ts"] - t0 for e in done.values())
        return {"devices": args.fleet, "size_mb": 1.0, "startup_all_online_s": round(t_online - t_start, 1),
                "active": sum(1 for e in done.values() if e["state"] == "active"),
                "first_active_s": round(times[0], 2), "median_active_s": round(times[len(times) // 2], 2),
                "all_active_s": round(times[-1], 2)}
    finally:
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(20)
            except subprocess.TimeoutExpired:
                pr.kill()
        events.c.loop_stop()


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (size, mode): the median of each measure, failures and requests summed."""
    out = []
    for key in dict.fromkeys((r["size_mb"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["size_mb"], r["mode"]) == key]
        med = {k: round(float(np.median([r[k] for r in group if r[k] is not None])), 3)
               for k in ("publish_to_active_s", "download_s", "warm_swap_s", "p99_before_ms", "p99_update_ms",
                         "p99_swap_ms")}
        ratio = float(np.median([r["p99_swap_ms"] / r["p99_before_ms"] for r in group]))
        out.append({"size_mb": key[0], "mode": key[1], "runs": len(group), **med,
                    "swap_over_before": round(ratio, 2), "failed": sum(r["failed"] for r in group),
                    "requests": sum(r["requests"] for r in group),
                    "all_active": all(r["state"] == "active" for r in group)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,20,100", help="model sizes in MB")
    ap.add_argument("--modes", default="mqtt,http")
    ap.add_argument("--fleet", type=int, default=50, help="simulated devices (0 to skip)")
    ap.add_argument("--before", type=float, default=5.0, help="seconds of load measured before publishing")
    ap.add_argument("--quiet-load", type=float, default=float(os.cpu_count() or 1),
                    help="before each update wait (up to 3 min) for the 1-minute load average to drop below this")
    ap.add_argument("--repeat", type=int, default=3, help="updates per size and mode (the table shows medians)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/update.json"))
    ap.add_argument("--sim-device", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sim_device:
        sim_device(args.sim_device)
        return
    args.sizes = [float(s) for s in args.sizes.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="edgerun-bench-update-"))
    try:
        generate(work / "keys", "bench")
        key = load_private_key(work / "keys" / "bench.key")
        with Mosquitto(work / "broker") as broker:
            rows = run_updates(args, work, broker, work / "keys", key) if args.sizes else []
            fleet = run_fleet(args, work, broker, work / "keys", key) if args.fleet else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = summarize(rows)
    result = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                          "loadavg_before": [round(x, 1) for x in load_before],
                          "loadavg_after": [round(x, 1) for x in os.getloadavg()]},
              "date": time.strftime("%Y-%m-%d"), "summary": table, "updates": rows, "fleet": fleet}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nmedians of {args.repeat} update(s) per row")
    print("| size | mode | publish→active s | download s | warm+swap s | p99 before ms | p99 during update ms | "
          "p99 swap ms | swap/before | failed/requests |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['size_mb']:g} MB | {r['mode']} | {r['publish_to_active_s']} | {r['download_s']} | "
              f"{r['warm_swap_s']} | {r['p99_before_ms']} | {r['p99_update_ms']} | {r['p99_swap_ms']} | "
              f"{r['swap_over_before']} | {r['failed']}/{r['requests']} |")
    if fleet:
        print(f"\nfleet: {fleet}")


if __name__ == "__main__":
    main()
