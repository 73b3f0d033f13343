"""The hub against a fleet of 1,000 simulated devices: staged rollouts, the failure gate, `hub status`, `hub tuning`.

    python benchmarks/fleet.py                        # 1,000 devices, results in benchmarks/results/fleet.json
    python benchmarks/fleet.py --devices 200 --out /tmp/fleet.json
    python benchmarks/fleet.py --tuning-only          # only v1 everywhere and `hub tuning` (fleet-tuning.json)

Everything is local and real: a Mosquitto on a free port (its $SYS counters give the broker's message
counts), 1,000 contract-speaking devices of `edgerun.testing.fleet` in their own process (each with its own
MQTT session, status and events), a SQLite registry, and the hub's own rollout code in this process (so
this process's CPU time and memory are the hub's). The fleet first gets v1 everywhere. Then:

1. a staged rollout of v2 (canary 10, steps of 25%, bake 2 s, abort above 10% of the finished devices) that
   must reach every device;
2. rollouts of v3, v4, ... (5 of them) to a fleet where 20% of the updates to each new version fail, spread
   evenly (the simulated fleet's `--fail-mode spread`: the 5th, 10th, 15th... update to end fails, so the
   canary of 10 holds exactly two failures whichever devices it is made of). Each must abort at the first
   gate (two of the 10 finished devices is more than 10%), before stage 2 is published, and roll the
   canary back to v2;
3. `edgerun hub status` (the real command, in its own process) over the 1,000 devices: the default view
   (a summary and the devices that need a look) and `--all` (every device), each synced from the broker and
   from the registry only (`--offline`), median of 5 (target ≤ 2 s);
4. the dashboard's first paint with the 1,000 devices, when `benchmarks/dashboard.py` can run (target ≤ 1 s);
5. `edgerun hub tuning digits` (the real command, in its own process): the simulated devices tune each version
   they activate and report the figures in their status (contract 1.4; 8 candidates each on x86, 4 on ARM), so
   the command aggregates 1,000 devices' figures per profile and CPU model: the tables and `--json`, synced from
   the broker and from the registry only (`--offline`), median of 5 (target ≤ 2 s). With `--tuning-only`, the
   fleet gets v1 and only this is measured, with `hub status` over the same fleet beside it.

Per rollout: time per stage, the hub's CPU and its memory (resident set before, peak during, after), and the
broker's messages. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from edgerun.contract import Topics  # noqa: E402
from edgerun.hub.keys import generate  # noqa: E402
from edgerun.hub.publish import build_manifest, encode  # noqa: E402
from edgerun.hub.registry import Registry  # noqa: E402
from edgerun.hub.rollout import Plan, RolloutRunner, start_rollout  # noqa: E402
from edgerun.hub.watch import FleetWatch  # noqa: E402
from edgerun.manifest import load_private_key, sign  # noqa: E402
from edgerun.mqtt import Broker, Connection  # noqa: E402
from edgerun.package import ModelPackage  # noqa: E402
from edgerun.testing.mosquitto import Mosquitto  # noqa: E402

CLI = "import sys; from edgerun.cli import main; sys.argv[0] = 'edgerun'; sys.exit(main())"
FLEET = "bench"
FAIL_RATE = 0.2


class BrokerCounters:
    """Mosquitto's $SYS publish counters (updated every second with ``sys_interval 1``)."""

    def __init__(self, port: int):
        self.values: dict[str, int] = {}
        self._conn = Connection(Broker(port=port), persistent=False, on_message=self._on_message).__enter__()
        self._conn.subscribe(["$SYS/broker/publish/messages/received", "$SYS/broker/publish/messages/sent"])

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            self.values[topic.rsplit("/", 1)[-1]] = int(payload)
        except ValueError:
            pass

    def read(self) -> dict[str, int]:
        time.sleep(1.2)  # the next $SYS update
        return dict(self.values)

    def close(self) -> None:
        self._conn.stop()


class Hub:
    """The hub side: the registry, a signing key, a watcher, and this process's CPU and memory."""

    def __init__(self, work: Path, broker: Mosquitto, package: ModelPackage):
        generate(work / "keys", "bench")
        self.keydir = work / "keys"
        self.key = load_private_key(self.keydir / "bench.key")
        self.db = f"sqlite:///{work / 'hub.db'}"
        self.registry = Registry(self.db)
        self.broker = broker
        self.package = package
        self.topics = Topics(FLEET)
        self.peak_rss = 0
        self.window_peak = 0  # the peak since the last ``window()``
        self._me = psutil.Process()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            rss = self._me.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            self.window_peak = max(self.window_peak, rss)
            time.sleep(0.05)

    def window(self) -> int:
        """The resident set now; the peak starts again from it."""
        rss = self._me.memory_info().rss
        self.window_peak = rss
        return rss

    def manifest(self, version: int) -> dict:
        m = build_manifest(self.package)
        m["version"] = m["package"]["version"] = version
        return sign(m, self.key, "bench")

    def publish(self, version: int) -> None:
        signed = self.manifest(version)
        self.registry.record_release(FLEET, signed, source="publish")
        with Connection(Broker(port=self.broker.port), persistent=False) as c:
            c.wait([c.publish(self.topics.release(self.package.name), encode(signed), retain=True)])

    def watch(self) -> FleetWatch:
        return FleetWatch(Broker(port=self.broker.port), self.topics, self.registry, name="bench")


def mb(n: int) -> float:
    return round(n / 2**20, 1)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_serving(watch: FleetWatch, model: str, version: int, n: int, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        on = sum(1 for s in watch.statuses.values() if (m := s.model(model)) and m.version == version)
        if on >= n:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"only some devices serve v{version} after {timeout}s")


def run_rollout(hub: Hub, watch: FleetWatch, version: int, plan: Plan) -> dict:
    """One rollout, measured: per-stage times, hub CPU and memory, broker messages, outcome."""
    hub.registry.record_release(FLEET, hub.manifest(version), source="upload")
    counters = BrokerCounters(hub.broker.port)
    before = counters.read()
    rss0 = hub.window()
    cpu0, t0 = cpu_seconds(), time.monotonic()
    started = start_rollout(hub.registry, watch, hub.key, "bench", hub.package.name, version, selector=[],
                            plan=plan, runner="bench:1")
    first_abort: list[float] = []

    def seen(p) -> None:
        if p.rollout.state == "aborting" and not first_abort:
            first_abort.append(time.monotonic() - t0)

    final = RolloutRunner(hub.registry, watch, started.rollout.id, runner="bench:1", on_progress=seen).run()
    took = time.monotonic() - t0
    cpu = cpu_seconds() - cpu0
    peak = hub.window_peak
    after = counters.read()
    counters.close()
    devices = hub.registry.rollout_devices(final.id)
    stages = []
    for s in sorted({d.stage for d in devices}):
        in_stage = [d for d in devices if d.stage == s and d.published_at]
        if not in_stage:
            stages.append({"stage": s + 1, "devices": sum(1 for d in devices if d.stage == s), "published": False})
            continue
        done = [d.finished_at for d in in_stage if d.finished_at]
        stages.append({"stage": s + 1, "devices": len(in_stage), "published": True,
                       "seconds": round(max(done) - min(d.published_at for d in in_stage), 2) if done else None})
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.state] = counts.get(d.state, 0) + 1
    return {"version": version, "state": final.state, "reason": final.reason, "seconds": round(took, 2),
            "abort_after_seconds": round(first_abort[0], 2) if first_abort else None, "stages": stages,
            "devices": counts, "hub_cpu_seconds": round(cpu, 2), "hub_cpu_cores": round(cpu / took, 3),
            "hub_rss_mb": {"before": mb(rss0), "peak": mb(peak), "after": mb(hub.window())},
            "broker_publishes_in": after.get("received", 0) - before.get("received", 0),
            "broker_publishes_out": after.get("sent", 0) - before.get("sent", 0)}


def hub_status_seconds(hub: Hub, repeats: int = 5) -> dict:
    """Wall time of `edgerun hub status` in its own process, as a user runs it: each view, median of ``repeats``."""
    # as installed: Python may cache the compiled modules (this machine's environment forbids it by default)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "EDGERUN_HUB_DB": hub.db,
           "COLUMNS": "200"}
    args = ["hub", "status", "--fleet", FLEET, "--host", "127.0.0.1", "--port", str(hub.broker.port)]
    out = {}
    for label, extra in (("default, synced from the broker", []), ("--all, synced from the broker", ["--all"]),
                         ("default, registry only (--offline)", ["--offline"]),
                         ("--all, registry only (--offline)", ["--offline", "--all"])):
        times = []
        subprocess.run([sys.executable, "-c", CLI, *args, *extra], env=env, capture_output=True, timeout=60)  # warm-up
        for _ in range(repeats):
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-c", CLI, *args, *extra], env=env, capture_output=True, text=True,
                               timeout=60)
            times.append(time.monotonic() - t0)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            rows = sum(1 for line in r.stdout.splitlines() if "sim-" in line)
        out[label] = {"median_seconds": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times],
                      "device_rows": rows}
    return out


def hub_tuning_seconds(hub: Hub, model: str, repeats: int = 5) -> dict:
    """Wall time of `edgerun hub tuning MODEL` in its own process, as a user runs it: each view, median of ``repeats``."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "EDGERUN_HUB_DB": hub.db,
           "COLUMNS": "200"}
    args = ["hub", "tuning", model, "--fleet", FLEET, "--host", "127.0.0.1", "--port", str(hub.broker.port)]
    out = {}
    for label, extra in (("tables, synced from the broker", []), ("--json, synced from the broker", ["--json"]),
                         ("tables, registry only (--offline)", ["--offline"]),
                         ("--json, registry only (--offline)", ["--offline", "--json"])):
        times = []
        subprocess.run([sys.executable, "-c", CLI, *args, *extra], env=env, capture_output=True, timeout=60)  # warm-up
        for _ in range(repeats):
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-c", CLI, *args, *extra], env=env, capture_output=True, text=True,
                               timeout=60)
            times.append(time.monotonic() - t0)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
        out[label] = {"median_seconds": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times]}
        if extra == ["--offline", "--json"]:
            figs = json.loads(r.stdout)
            out["devices"] = sum(g["devices"] for g in figs["profiles"])
            out["groups"] = [f"{g['profile']} / {g['cpu_model']}: {g['devices']}" for g in figs["groups"]]
        elif extra == ["--offline"]:
            out["tables"] = r.stdout
    return out


def dashboard_paint(hub: Hub) -> dict | None:
    """First paint of `hub dashboard` over this fleet, from benchmarks/dashboard.py when it can run here."""
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import dashboard  # type: ignore[import-not-found]
    except ImportError:
        return None
    measure = getattr(dashboard, "measure_first_paint", None)
    if measure is None:
        return None
    return measure(broker_port=hub.broker.port, fleet=FLEET, db=hub.db, loads=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--failing-runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/fleet.json (fleet-tuning.json with "
                                                "--tuning-only)")
    ap.add_argument("--tuning-only", action="store_true", help="only v1 everywhere and `hub tuning` (no rollouts)")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "benchmarks/results" / ("fleet-tuning.json" if args.tuning_only else "fleet.json"))
    n = args.devices
    package = ModelPackage.load(ROOT / "examples" / "digits")
    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "devices": n,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform(), "processor": platform.processor(),
                                 "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Mosquitto(work / "broker", extra_config="sys_interval 1\nmax_connections -1\n") as broker:
            hub = Hub(work, broker, package)
            t0 = time.monotonic()
            fleet = subprocess.Popen([sys.executable, "-m", "edgerun.testing.fleet", "--port", str(broker.port),
                                      "--fleet", FLEET, "--trusted-keys", str(hub.keydir), "--devices", str(n),
                                      "--fail-rate", str(FAIL_RATE), "--fail-mode", "spread", "--fail-from", "3",
                                      "--seed", "1", "--tune"],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                ready = json.loads(fleet.stdout.readline())
                results["fleet_connect_seconds"] = round(time.monotonic() - t0, 2)
                print(f"{n} simulated devices online in {ready['seconds']:.1f}s", flush=True)
                with hub.watch() as watch:
                    hub.publish(1)
                    results["baseline_seconds"] = round(wait_serving(watch, package.name, 1, n), 2)
                    print(f"v1 everywhere in {results['baseline_seconds']:.1f}s", flush=True)
                    if args.tuning_only:
                        watch.flush()
                        results["hub_tuning"] = hub_tuning_seconds(hub, package.name)
                        results["hub_status"] = hub_status_seconds(hub)  # beside it: the same sync, the same fleet
                        return tuning_report(results, args.out)
                    plan = Plan.parse(canary=10, step="25%", bake="2s", max_failures="10%", timeout="60s")
                    results["plan"] = plan.describe()
                    results["rollout"] = run_rollout(hub, watch, 2, plan)
                    print(f"rollout of v2: {results['rollout']['state']} in {results['rollout']['seconds']}s",
                          flush=True)
                    results["failing_rollouts"] = []
                    for version in range(3, 3 + args.failing_runs):
                        x = run_rollout(hub, watch, version, plan)
                        x["devices_on_v2_after"] = sum(1 for s in watch.statuses.values()
                                                       if (m := s.model(package.name)) and m.version == 2)
                        x["aborted_at_stage"] = max((st["stage"] for st in x["stages"] if st["published"]), default=0)
                        results["failing_rollouts"].append(x)
                        print(f"rollout of v{version} with {FAIL_RATE:.0%} failing: {x['state']} at stage "
                              f"{x['aborted_at_stage']}", flush=True)
                results["hub_status"] = hub_status_seconds(hub)
                results["hub_tuning"] = hub_tuning_seconds(hub, package.name)
                results["dashboard"] = dashboard_paint(hub)
                results["hub_peak_rss_mb"] = mb(hub.peak_rss)
            finally:
                fleet.terminate()
                fleet.wait(30)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # the machine is shared
    results["targets"] = targets(results)
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(results["targets"].values()) else 1


def tuning_report(results: dict, out: str) -> int:
    """Print and write the results of --tuning-only."""
    t = results["hub_tuning"]
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = {"hub tuning <= 2 s (every view)": all(s["median_seconds"] <= 2.0 for s in t.values()
                                                                if isinstance(s, dict))}
    print(t.get("tables", ""))
    print(f"{t['devices']} devices' figures in {len(t['groups'])} groups: {'; '.join(t['groups'])}")
    for label, s in t.items():
        if isinstance(s, dict):
            print(f"hub tuning, {label}: median {s['median_seconds']}s over {len(s['runs'])} runs (target ≤ 2 s)")
    for label, s in results["hub_status"].items():
        print(f"hub status, {label}: median {s['median_seconds']}s over {len(s['runs'])} runs (same fleet)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(results["targets"].values()) else 1


def targets(r: dict) -> dict[str, bool]:
    failing = r["failing_rollouts"]
    d = r.get("dashboard") or {}
    return {
        "every device updated": r["rollout"]["state"] == "succeeded"
        and r["rollout"]["devices"] == {"active": r["devices"]},
        "every failing rollout aborted at the first gate": bool(failing) and all(
            x["state"] == "aborted" and x["aborted_at_stage"] == 1 for x in failing),
        "every device back on v2": all(x["devices_on_v2_after"] == r["devices"] for x in failing),
        "hub status <= 2 s (every view)": all(s["median_seconds"] <= 2.0 for s in r["hub_status"].values()),
        "hub tuning <= 2 s (every view)": all(s["median_seconds"] <= 2.0 for s in r["hub_tuning"].values()
                                              if isinstance(s, dict)),
        "dashboard table on screen <= 1 s": bool(d) and d.get("table_ready_ms", 1e9) <= 1000,
    }


def report(r: dict) -> None:
    print(f"\n{r['devices']} simulated devices, one local Mosquitto; plan: {r['plan']}")
    runs = [("rollout of v2 (no failures)", r["rollout"])]
    runs += [(f"rollout of v{x['version']} ({FAIL_RATE:.0%} of devices fail it)", x) for x in r["failing_rollouts"]]
    for title, x in runs:
        print(f"\n{title}: {x['state']} after {x['seconds']}s" + (f" — {x['reason']}" if x["reason"] else ""))
        print("  " + "  ".join(f"stage {s['stage']}: {s['devices']} in {s['seconds']}s" if s["published"]
                               else f"stage {s['stage']}: not published" for s in x["stages"]))
        m = x["hub_rss_mb"]
        print(f"  devices: {x['devices']}; hub CPU {x['hub_cpu_seconds']}s ({x['hub_cpu_cores']} of a core); hub RSS "
              f"{m['before']} MB before, {m['peak']} MB peak, {m['after']} MB after; broker publishes in "
              f"{x['broker_publishes_in']}, out {x['broker_publishes_out']}")
        if x.get("abort_after_seconds") is not None:
            print(f"  abort decided {x['abort_after_seconds']}s after the start, at stage {x['aborted_at_stage']}; "
                  f"devices on v2 afterwards: {x['devices_on_v2_after']} of {r['devices']}")
    failing = r["failing_rollouts"]
    first = sum(1 for x in failing if x["aborted_at_stage"] == 1)
    touched = max(sum(x["devices"].values()) - x["devices"].get("pending", 0) for x in failing)
    print(f"\nfailing rollouts: {sum(1 for x in failing if x['state'] == 'aborted')} of {len(failing)} aborted, "
          f"{first} at the first gate; at most {touched} devices touched; every device back on v2: "
          f"{all(x['devices_on_v2_after'] == r['devices'] for x in failing)}")
    print(f"hub peak RSS {r['hub_peak_rss_mb']} MB")
    for label, s in r["hub_status"].items():
        print(f"hub status, {label}: median {s['median_seconds']}s over {len(s['runs'])} runs (target ≤ 2 s)")
    for label, s in r["hub_tuning"].items():
        if isinstance(s, dict):
            print(f"hub tuning, {label}: median {s['median_seconds']}s over {len(s['runs'])} runs (target ≤ 2 s)")
    d = r.get("dashboard")
    if d:
        print(f"dashboard first paint: median {d.get('first_paint_ms')} ms, table ready {d.get('table_ready_ms')} ms "
              f"(target ≤ 1000 ms)")
    else:
        print("dashboard: not measured (benchmarks/dashboard.py unavailable)")
    for name, ok in r["targets"].items():
        print(f"{'met   ' if ok else 'MISSED'} {name}")


if __name__ == "__main__":
    sys.exit(main())
