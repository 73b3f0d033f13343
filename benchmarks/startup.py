"""Cold start to READY=1 and idle RSS of ``edgerun serve``, measured the way systemd sees the daemon.

    python benchmarks/startup.py [--runs 10]

Each run binds a NOTIFY_SOCKET (Unix datagram), starts ``edgerun serve`` as a fresh process and times
process start -> ``READY=1``. The model's own load time (from the runtime's "loaded ... in X s" log line)
is reported apart, so "ready within 1.5 s plus model load time" can be read off directly. Idle RSS is
VmRSS one second after READY=1: with no model (the core) and with one model on each backend.
Writes benchmarks/results/startup.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGERUN_TUNING_MODE", "off")  # tune.py measures tuning: here it would skew the figures

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"
TARGET_READY_OVERHEAD = 1.5
TARGET_IDLE_RSS_MB = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(args: list[str], workdir: Path, idle: float = 0.0) -> dict:
    """One cold start: seconds to READY=1, the model load seconds logged, and VmRSS after ``idle`` seconds."""
    name = f"@edgerun-bench-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": name, "EDGERUN_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    env.pop("WATCHDOG_USEC", None)
    log = workdir / "serve.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", str(free_port()),
                                 "--state-dir", str(workdir / "state"), *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                msg = sock.recv(4096).decode()
                if "READY=1" in msg.splitlines():
                    ready = time.monotonic() - t0
                    break
            time.sleep(idle)
            rss = _rss_mb(proc.pid) if idle else None
        finally:
            proc.terminate()
            code = proc.wait(30)
            sock.close()
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"edgerun serve exited with {code}:\n{text[-2000:]}")
    loads = [float(x) for x in re.findall(r"loaded \S+ v\d+: variant \S+ on \S+ in ([\d.]+)s", text)]
    return {"ready_s": ready, "load_s": sum(loads), "rss_mb": rss}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


IMPORT_COSTS = """
import os, sys
def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
steps = [("python interpreter", "pass"), ("numpy", "import numpy"), ("psutil", "import psutil"),
         ("asyncio (loads ssl, libcrypto)", "import asyncio"),
         ("edgerun core (runtime, plugins, packages)", "import edgerun.runtime, edgerun.daemon"),
         ("typer + rich (CLI; serve is parsed without typer's pydantic coercion)", "import edgerun.cli"),
         ("uvicorn + starlette + httptools", "import uvicorn, starlette.applications, httptools"),
         ("edgerun.server (incl. prometheus_client)", "import edgerun.server.app, edgerun.server.http"),
         ("uvloop", "import uvloop")]
last = 0.0
for name, code in steps:
    exec(code)
    now = rss()
    print(f"{name}\t{now - last:.1f}")
    last = now
"""


def import_costs() -> list[dict]:
    """RSS added by each layer the idle daemon imports, in import order (what the idle core RSS is made of).

    pydantic is not among them: ``edgerun serve`` parses its options without typer (edgerun/cli/direct.py).
    """
    out = subprocess.run([sys.executable, "-c", IMPORT_COSTS], capture_output=True, text=True, check=True,
                         env={**os.environ, "EDGERUN_LOG_LEVEL": "ERROR"}).stdout
    return [{"layer": name, "rss_mb": float(mb)} for name, mb in (ln.split("\t") for ln in out.splitlines())]


def model_config(workdir: Path, package: Path, backend: str | None) -> list[str]:
    cfg = workdir / f"{backend or 'auto'}.toml"
    extra = f'backend = "{backend}"\n' if backend else ""
    cfg.write_text(f'[[models]]\npath = "{package}"\n{extra}')
    return ["--config", str(cfg)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ns = ap.parse_args()
    digits, tflite = ROOT / "examples/digits", ROOT / "examples/tflite"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cold = [start_once(["--model", str(digits)], work) for _ in range(ns.runs)]
        ready = statistics.median(r["ready_s"] for r in cold)
        load = statistics.median(r["load_s"] for r in cold)
        rows.append({"measure": f"cold start to READY=1, examples/digits (median of {ns.runs})",
                     "value": round(ready, 3), "unit": "s", "model_load_s": round(load, 3),
                     "overhead_s": round(ready - load, 3),
                     "target": f"<= {TARGET_READY_OVERHEAD} s + model load",
                     "ok": ready - load <= TARGET_READY_OVERHEAD,
                     "runs_s": [round(r["ready_s"], 3) for r in cold]})
        empty = [start_once([], work) for _ in range(ns.runs)]
        rows.append({"measure": f"cold start to READY=1, no model (median of {ns.runs})",
                     "value": round(statistics.median(r["ready_s"] for r in empty), 3), "unit": "s",
                     "target": f"<= {TARGET_READY_OVERHEAD} s", "ok": None})
        idle = start_once([], work, idle=1.0)
        rows.append({"measure": "idle RSS, no model (core)", "value": round(idle["rss_mb"], 1), "unit": "MB",
                     "target": f"<= {TARGET_IDLE_RSS_MB} MB", "ok": idle["rss_mb"] <= TARGET_IDLE_RSS_MB})
        for backend, package in (("onnxruntime", digits), ("openvino", digits), ("litert", tflite)):
            try:
                r = start_once(model_config(work, package, backend), work, idle=1.0)
            except RuntimeError as exc:
                rows.append({"measure": f"idle RSS, {package.name} on {backend}", "value": None, "unit": "MB",
                             "error": str(exc).splitlines()[-1]})
                continue
            rows.append({"measure": f"idle RSS, {package.name} on {backend}", "value": round(r["rss_mb"], 1),
                         "unit": "MB", "model_load_s": round(r["load_s"], 3)})
    costs = import_costs()
    result = {"command": "python benchmarks/startup.py" + (f" --runs {ns.runs}" if ns.runs != 10 else ""),
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "note": "shared 2-core machine: other processes were running", "rows": rows,
              "idle_core_rss_by_layer": costs}
    out = ROOT / "benchmarks/results/startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'measure':58} {'value':>9}  {'target':24} ok")
    for r in rows:
        v = "error" if r["value"] is None else f"{r['value']} {r['unit']}"
        extra = f" (load {r['model_load_s']} s)" if "model_load_s" in r else ""
        ok = {True: "yes", False: "NO", None: ""}[r.get("ok")]
        print(f"{r['measure'] + extra:58} {v:>9}  {r.get('target', ''):24} {ok}")
    print("\nidle core RSS by layer (MB, in import order):")
    for c in costs:
        print(f"  {c['layer']:45} {c['rss_mb']:6.1f}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
