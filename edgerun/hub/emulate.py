"""Checking int8 variants on the int8 kernels of CPUs the hub is not: x86 without VNNI, emulated by QEMU.

Backends pick their int8 kernels from the CPU they run on, so a hub with VNNI never runs the AVX2 kernels that an
older gateway runs. ``qemu-x86_64 -cpu Haswell`` (user-mode emulation; the Debian package ``qemu-user``) presents
an AVX2 CPU without AVX-512 or VNNI to the same Python and backends, which then run those very kernels. One child
(``python -m edgerun.hub.emulate JOB.json``) loads each (variant, backend) pair of the staged package with the
Runtime, as a device would, and answers the validation rows. A class this hub cannot emulate (x86 with VNNI: QEMU
has no AVX-512; arm64: it would take an aarch64 Python) is recorded as not checked, with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgerun.hub.accuracy import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Emulator:
    """How one CPU class is emulated: a qemu-user binary, the CPU model it presents, and what that CPU lacks."""

    binary: str
    cpu: str
    lacks: str

    @property
    def how(self) -> str:
        return f"{self.binary} -cpu {self.cpu}"


EMULATORS = {"x86": Emulator("qemu-x86_64", "Haswell", "AVX2 without AVX-512 or VNNI")}
DEFAULT_SAMPLES = 100
TIMEOUT = 600.0


def cannot_emulate(cpu_class: str) -> str | None:
    """Why ``cpu_class`` cannot be emulated on this hub, or None when it can."""
    if cpu_class == "x86-vnni":
        return "QEMU emulates no AVX-512 or VNNI"
    if cpu_class == "arm64":
        return ("it would take an aarch64 Python with the backends, under qemu-aarch64, and this hub has none: "
                "an arm64 device relies on its own validation check")
    em = EMULATORS.get(cpu_class)
    if em is None:
        return f"no emulator for {cpu_class}"
    if platform.machine() != "x86_64":
        return f"{em.binary} runs this hub's own Python only on an x86_64 hub"
    if shutil.which(em.binary) is None:
        return f"{em.binary} is not installed (Debian: apt-get install qemu-user)"
    return None


def top1_on(cpu_class: str, package: Path, pairs: list[tuple[str, str]], rows: list[dict[str, np.ndarray]],
            timeout: float = TIMEOUT) -> tuple[dict[tuple[str, str], np.ndarray | str], dict[str, str]]:
    """Each pair's top-1 on ``rows`` under the emulated CPU (or why it could not run there), and the backends'
    versions; raises RuntimeError when the emulated process itself fails."""
    em = EMULATORS[cpu_class]
    with tempfile.TemporaryDirectory(prefix="edgerun-emulate-") as tmp:
        data = Path(tmp) / "rows.npz"
        np.savez(data, **{f"{i}/{k}": v for i, r in enumerate(rows) for k, v in r.items()})
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"package": str(Path(package).resolve()), "pairs": pairs, "rows": str(data),
                                   "n": len(rows)}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGERUN_LOG_LEVEL": "ERROR", "TF_CPP_MIN_LOG_LEVEL": "2"}
        try:
            proc = subprocess.run([shutil.which(em.binary), "-cpu", em.cpu, sys.executable, "-m",
                                   "edgerun.hub.emulate", str(job)], capture_output=True, text=True,
                                  timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support" not in ln][-1:]
        raise RuntimeError(tail[0] if tail else f"exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    got: dict[tuple[str, str], np.ndarray | str] = {}
    for r in result["results"]:
        got[(r["variant"], r["backend"])] = r["error"] if "error" in r else np.asarray(r["top1"], np.int64)
    return got, result["versions"]


def check_targets(package: Path, variants: list[tuple[str, dict[str, Any], list[str]]], scorer: Scorer,
                  host: str) -> dict[str, list[str]]:
    """Check int8 variants on their target CPU classes other than ``host`` (this hub's).

    ``variants`` holds (id, info, backends it is kept for). Each check is recorded in ``info["validated"]``: the
    score on an emulated class, or why a class was not checked. A class on which a variant loses more than the bound
    on any of its backends is taken off ``info["int8"]["targets"]``. Returns notes by variant id."""
    notes: dict[str, list[str]] = {vid: [] for vid, _, _ in variants}
    classes = sorted({c for _, info, _ in variants for c in info["int8"]["targets"] if c != host})
    rows = list(scorer.rows(DEFAULT_SAMPLES))
    base = scorer.score_top1(scorer.reference[:len(rows)])
    for cls in classes:
        mine = [(vid, info, backends) for vid, info, backends in variants if cls in info["int8"]["targets"]]
        why = cannot_emulate(cls)
        got: dict[tuple[str, str], np.ndarray | str] = {}
        versions: dict[str, str] = {}
        if why is None:
            try:
                got, versions = top1_on(cls, package, [(vid, b) for vid, _, bs in mine for b in bs], rows)
            except RuntimeError as exc:
                why = f"the emulated run failed: {exc}"
                log.warning("emulated %s check failed: %s", cls, exc)
        for vid, info, backends in mine:
            if why is not None:
                info.setdefault("validated", []).append({"cpu": cls, "how": f"not checked: {why}"})
                notes[vid].append(f"not checked on {cls}: {why}")
                continue
            for b in backends:
                top = got.get((vid, b), "not run")
                record = {"cpu": cls, "how": f"emulated: {EMULATORS[cls].how} ({EMULATORS[cls].lacks})",
                          "backend": f"{b} {versions.get(b, '')}".strip()}
                if isinstance(top, str):
                    info.setdefault("validated", []).append({**record, "how": f"not checked: {top}"})
                    notes[vid].append(f"not checked on {cls} with {b}: {top}")
                    continue
                value = scorer.score_top1(top)
                info.setdefault("validated", []).append({**record, "metric": scorer.metric, "score": round(value, 4),
                                                         "samples": len(top), "fp32_score": round(base, 4)})
                if base - value > scorer.max_drop + 1e-9:
                    if cls in info["int8"]["targets"]:
                        info["int8"]["targets"].remove(cls)
                    notes[vid].append(f"not for {cls}: {100 * value:.1f}% there with {b} (emulated) vs fp32's "
                                      f"{100 * base:.1f}%")
                else:
                    notes[vid].append(f"checked on {cls} with {b} (emulated): {100 * value:.1f}%")
    return notes


def _child(job: dict[str, Any]) -> dict[str, Any]:
    from edgerun.runtime import Runtime

    with np.load(job["rows"], allow_pickle=False) as z:
        rows: list[dict[str, np.ndarray]] = [{} for _ in range(job["n"])]
        for key in z.files:
            i, name = key.split("/", 1)
            rows[int(i)][name] = z[key]
    rt = Runtime(threads=1)
    results: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    for vid, backend in job["pairs"]:
        try:
            model = rt.prepare(job["package"], variant=vid, backend=backend, verify=False, warmup=False,
                               memory_budget=1 << 40)
            first = model.outputs[0].name
            top = [int(np.argmax(model.run_unchecked(r)[first])) for r in rows]
            model.retire()
        except Exception as exc:  # one pair that cannot run here is reported, the others still run
            results.append({"variant": vid, "backend": backend, "error": f"{type(exc).__name__}: {exc}"})
            continue
        versions[backend] = rt.backends[backend].check().version or ""
        results.append({"variant": vid, "backend": backend, "top1": top})
    return {"results": results, "versions": versions}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text()))))
