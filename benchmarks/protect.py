"""Encrypted models, measured: load time and peak RSS against the clear model on each backend, publish→active.

    python benchmarks/protect.py                   # ~100 MB model on every backend; a 20 MB release over MQTT
    python benchmarks/protect.py --mb 20 --runs 3 --update-runs 1

Load: one fresh process per load (the backend library imported and a Runtime made first), `Runtime.prepare(...,
verify=False, warmup=False)` on the clear package and on the same package encrypted (age, one recipient), in turns;
the peak is VmHWM reset just before the load, minus the RSS then. Medians over --runs loads each. "Decrypting alone"
times the encrypted variant's files decrypted into memory with no backend (a fresh process too): the least an encrypted
load can add, since a clear load that maps its file reads few of its bytes while loading.

Update: benchmarks/update.py's harness (a real Mosquitto, `edgerun serve --config` as the device, on onnxruntime by
profile), one 20 MB release at a time, in turns: clear; encrypted by `publish --encrypt-for` (the encryption on the
hub counts); encrypted beforehand (`hub package --encrypt-for`). Every release has new weights, so the broker and the
device see new files each time (re-publishing chunks the broker already holds takes less than half the time).
publish→active is from the start of publishing to the device's `active` event.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGERUN_TUNING_MODE", "off")  # tune.py measures tuning: here it would skew the figures

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS = {"onnxruntime": "onnx", "openvino": "openvino", "litert": "tflite"}
TARGET_TIME, TARGET_PUBLISH = 1.15, 1.2

CHILD = """
import json, sys, time
import numpy as np
from edgerun.package import ModelPackage
from edgerun.runtime import Runtime
backend, package, key = sys.argv[1], sys.argv[2], sys.argv[3]
rt = Runtime(profile="generic-x86_64", threads=1, device_key=key)
assert rt.backends[backend].check().available
pkg = ModelPackage.load(package)
rt.device_key.identities()  # read once when a device starts, not at each load
rt.explain(pkg)  # the device's facts and profile, detected once per process

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # reset the peak: the imports do not count
    f.write("5")
rss0 = status("VmRSS:")
if sys.argv[4:] == ["decrypt"]:  # the floor: the variant's files decrypted into memory, no backend
    from edgerun.crypto import decrypt_to_memory
    files = [pkg.root / f.path for f in pkg.variants[0].files if f.encryption is not None]
    t0 = time.perf_counter()
    for path in files:
        decrypt_to_memory(path, rt.device_key.identities())
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "ready": seconds, "peak": status("VmHWM:") - rss0,
                      "after": status("VmRSS:") - rss0}))
    sys.exit(0)
t0 = time.perf_counter()
m = rt.prepare(pkg, backend=backend, verify=False, warmup=False)
seconds = time.perf_counter() - t0
m.run({"input": np.zeros((1, 64), np.float32)})  # a mapped clear model is read here, not at load
ready = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "ready": ready, "peak": status("VmHWM:") - rss0,
                  "after": status("VmRSS:") - rss0}))
"""


def make_models(work: Path, mb: float, key_file: Path) -> dict[str, tuple[Path, Path, int]]:
    """Per backend: (clear package, encrypted package, model bytes) of a random MLP 64-h-h-h-10 of ``mb`` MB."""
    from edgerun.devicekey import create_key_file
    from edgerun.hub.encrypt import encrypt_package
    from edgerun.package import ModelPackage, Variant, file_entry, save_package
    from edgerun.tensors import TensorSpec
    from edgerun.testing.models import mlp_onnx, random_mlp_weights
    from edgerun.testing.tflite import mlp_tflite

    identity = create_key_file(key_file)
    h = max(16, int(math.sqrt(mb * 1e6 / 8)))
    weights = random_mlp_weights([64, h, h, h, 10])
    out = {}
    for backend, fmt in FORMATS.items():
        root = work / backend / "clear"
        root.mkdir(parents=True)
        if fmt == "onnx":
            files = [mlp_onnx(weights, root / "model.onnx").name]
        elif fmt == "tflite":
            files = [mlp_tflite(weights, root / "model.tflite").name]
        else:
            import openvino as ov

            src = mlp_onnx(weights, work / "source.onnx")
            ov.save_model(ov.convert_model(str(src)), str(root / "model.xml"), compress_to_fp16=False)
            src.unlink()
            files = ["model.xml", "model.bin"]
        pkg = ModelPackage("bench", 1, [TensorSpec("input", "FP32", (-1, 64))], [TensorSpec("probabilities", "FP32",
                                                                                           (-1, 10))],
                           [Variant(f"{fmt}-fp32", fmt, "fp32", tuple(file_entry(root, f) for f in files))])
        save_package(pkg, root)
        clear = ModelPackage.load(root)
        encrypted = encrypt_package(clear, [identity.recipient], work / backend / "encrypted")
        out[backend] = (root, encrypted.root, clear.variants[0].size)
    return out


def measure(backend: str, package: Path, key: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, backend, str(package), str(key), *extra], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"{backend} on {package} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_loads(args, work: Path) -> list[dict]:
    from edgerun.runtime import Runtime

    key = work / "device.key"
    models = make_models(work / "models", args.mb, key)
    with Runtime(load_plugins=True) as rt:
        available = {b.name for b, a in rt.backend_status() if a.available}
    rows = []
    for backend, (clear, encrypted, size) in models.items():
        if backend not in available:
            print(f"{backend}: not available here, skipped", flush=True)
            continue
        runs: dict[str, list[dict]] = {"clear": [], "encrypted": [], "decrypt": []}
        for _ in range(args.runs):
            for mode, pkg in (("clear", clear), ("encrypted", encrypted)):
                runs[mode].append(measure(backend, pkg, key))
            runs["decrypt"].append(measure(backend, encrypted, key, "decrypt"))
        med = {mode: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "ready", "peak", "after")}
               for mode, rs in runs.items()}
        row = {"backend": backend, "format": FORMATS[backend], "model_bytes": size,
               "clear_load_s": round(med["clear"]["seconds"], 3), "encrypted_load_s": round(med["encrypted"]["seconds"], 3),
               "time_ratio": round(med["encrypted"]["seconds"] / med["clear"]["seconds"], 3),
               "decrypt_alone_s": round(med["decrypt"]["seconds"], 3),
               "clear_ready_s": round(med["clear"]["ready"], 3), "encrypted_ready_s": round(med["encrypted"]["ready"], 3),
               "ready_ratio": round(med["encrypted"]["ready"] / med["clear"]["ready"], 3),
               "clear_peak_mb": round(med["clear"]["peak"] / 1e6, 1),
               "encrypted_peak_mb": round(med["encrypted"]["peak"] / 1e6, 1),
               "peak_over_clear_mb": round((med["encrypted"]["peak"] - med["clear"]["peak"]) / 1e6, 1),
               "clear_after_mb": round(med["clear"]["after"] / 1e6, 1),
               "encrypted_after_mb": round(med["encrypted"]["after"] / 1e6, 1), "runs": runs}
        row["time_ok"] = row["time_ratio"] <= TARGET_TIME
        row["ready_ok"] = row["ready_ratio"] <= TARGET_TIME
        row["peak_ok"] = med["encrypted"]["peak"] <= med["clear"]["peak"] + size
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    return rows


def run_updates(args, work: Path) -> list[dict]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_bench", ROOT / "benchmarks" / "update.py")
    update = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update)
    Events, make_package = update.Events, update.make_package
    quiet, start_device, wait_http = update.quiet, update.start_device, update.wait_http

    from edgerun.contract import Topics
    from edgerun.crypto import read_identities
    from edgerun.hub.encrypt import encrypt_package, encrypted_copy
    from edgerun.hub.keys import generate
    from edgerun.hub.publish import publish_release
    from edgerun.manifest import load_private_key
    from edgerun.mqtt import Broker, Connection
    from edgerun.testing.mosquitto import Mosquitto

    generate(work / "keys", "bench")
    key = load_private_key(work / "keys" / "bench.key")
    fleet = "protect"
    os.environ["EDGERUN_PROFILE"] = "generic-x86_64"  # onnxruntime for the clear and the encrypted onnx variant
    rows = []
    with Mosquitto(work / "broker") as broker:
        events = Events(broker.port, fleet)
        proc, port = start_device(work / "device", broker, fleet, work / "keys", "dev")
        try:
            wait_http(port, proc)
            key_file = work / "device" / "state" / "device.key"
            deadline = time.monotonic() + 30
            while not key_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            recipient = read_identities(key_file.read_text(), str(key_file))[0].recipient
            base = make_package(work / "pkg", args.update_mb, 1, seed=5)
            version = 1
            with Connection(Broker(port=broker.port), persistent=False) as hub:
                publish_release(hub, Topics(fleet), base, key, "bench")
                events.final(1)
                for _ in range(args.update_runs):
                    for mode in ("clear", "encrypt-on-publish", "encrypted-before"):
                        version += 1
                        # new weights for every release, clear or not: a broker that already holds a file's chunks
                        # (the same sha256) takes them again in less than half the time of new ones
                        pkg = make_package(work / f"pkg-{version}", args.update_mb, version, seed=version)
                        quiet(args.quiet_load)
                        tmp = None
                        if mode == "encrypted-before":
                            pkg = encrypt_package(pkg, [recipient], work / f"pre-{version}")
                        t0 = time.time()
                        if mode == "encrypt-on-publish":
                            pkg, tmp = encrypted_copy(pkg, [recipient])
                        publish_release(hub, Topics(fleet), pkg, key, "bench")
                        final = events.final(version)
                        if tmp is not None:
                            shutil.rmtree(tmp, ignore_errors=True)
                        at = {e["state"]: e["ts"] for e in events.events if e["version"] == version}
                        row = {"mode": mode, "version": version, "state": final["state"],
                               "publish_to_active_s": round(final["ts"] - t0, 3),
                               "verify_s": round(at.get("staged", t0) - at.get("verifying", t0), 3),
                               "warm_swap_s": round(final["ts"] - at.get("warming", t0), 3),
                               "phases_s": {state: round(ts - t0, 3) for state, ts in at.items()},
                               "loadavg_1m": round(os.getloadavg()[0], 1)}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=100, help="model size for the load measurements (MB)")
    ap.add_argument("--runs", type=int, default=5, help="loads per backend and mode (medians)")
    ap.add_argument("--update-mb", type=float, default=20, help="release size for publish→active (MB)")
    ap.add_argument("--update-runs", type=int, default=3, help="releases per mode (medians)")
    ap.add_argument("--quiet-load", type=float, default=float(os.cpu_count() or 1),
                    help="before each release wait (up to 3 min) for the 1-minute load average to drop below this")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/protect.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="edgerun-bench-protect-"))
    try:
        loads = run_loads(args, work / "loads")
        updates = run_updates(args, work / "updates") if args.update_runs else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = []
    for mode in dict.fromkeys(r["mode"] for r in updates):
        group = [r for r in updates if r["mode"] == mode]
        summary.append({"mode": mode, "runs": len(group),
                        "publish_to_active_s": round(statistics.median(r["publish_to_active_s"] for r in group), 3),
                        "verify_s": round(statistics.median(r["verify_s"] for r in group), 3),
                        "warm_swap_s": round(statistics.median(r["warm_swap_s"] for r in group), 3),
                        "all_active": all(r["state"] == "active" for r in group)})
    clear = next((s for s in summary if s["mode"] == "clear"), None)
    for s in summary:
        s["ratio"] = round(s["publish_to_active_s"] / clear["publish_to_active_s"], 3) if clear else None
        s["ok"] = s["ratio"] is not None and s["ratio"] <= TARGET_PUBLISH
    result = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                          "loadavg_before": [round(x, 1) for x in load_before],
                          "loadavg_after": [round(x, 1) for x in os.getloadavg()]},
              "date": time.strftime("%Y-%m-%d"), "targets": {"load_time_ratio": TARGET_TIME,
                                                             "peak": "encrypted <= clear + model size",
                                                             "publish_to_active_ratio": TARGET_PUBLISH},
              "loads": loads, "updates": {"size_mb": args.update_mb, "summary": summary, "runs": updates}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nload of a {args.mb:g} MB model, medians of {args.runs} fresh processes each")
    print("| backend | format | load s, clear / encrypted | ratio (≤ 1.15) | decrypting alone s | load + 1st inference "
          "s, clear / encrypted | ratio | peak MB, clear / encrypted | over clear MB (≤ model) | RSS after MB, clear / "
          "encrypted |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in loads:
        print(f"| {r['backend']} | {r['format']} | {r['clear_load_s']} / {r['encrypted_load_s']} | {r['time_ratio']}"
              f"{'' if r['time_ok'] else ' ✗'} | {r['decrypt_alone_s']} | {r['clear_ready_s']} / "
              f"{r['encrypted_ready_s']} | {r['ready_ratio']}{'' if r['ready_ok'] else ' ✗'} | "
              f"{r['clear_peak_mb']} / {r['encrypted_peak_mb']} | "
              f"{r['peak_over_clear_mb']} of {r['model_bytes'] / 1e6:.0f}{'' if r['peak_ok'] else ' ✗'} | "
              f"{r['clear_after_mb']} / {r['encrypted_after_mb']} |")
    if summary:
        print(f"\npublish→active of a {args.update_mb:g} MB release over MQTT, medians of {args.update_runs}")
        print("| release | publish→active s | ratio to clear (≤ 1.2) | verifying s | warm+swap s |")
        print("|---|---:|---:|---:|---:|")
        for s in summary:
            print(f"| {s['mode']} | {s['publish_to_active_s']} | {s['ratio']}{'' if s['ok'] else ' ✗'} | "
                  f"{s['verify_s']} | {s['warm_swap_s']} |")


if __name__ == "__main__":
    main()
