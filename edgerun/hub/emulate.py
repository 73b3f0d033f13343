"""Checking an int8 model on the int8 kernels of a CPU the hub is not: x86 without VNNI, emulated by QEMU.

onnxruntime picks its int8 kernels from the CPU it runs on, so a hub with VNNI never runs the AVX2 kernels
that an older gateway runs. ``qemu-x86_64 -cpu Haswell`` (user-mode emulation; the Debian package
``qemu-user``) presents an AVX2 CPU without AVX-512 or VNNI to the same Python and onnxruntime, which then
run those very kernels. The parent calls ``score``; the child is ``python -m edgerun.hub.emulate JOB.json``.
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgerun.hub.accuracy import Scorer

log = logging.getLogger(__name__)

EMULATORS = {"x86": ("qemu-x86_64", "Haswell", "AVX2 without AVX-512 or VNNI")}
DEFAULT_SAMPLES = 100


def can_emulate(cpu_class: str) -> str | None:
    """How ``cpu_class`` is emulated here (e.g. "qemu-x86_64 -cpu Haswell"), or None."""
    if cpu_class not in EMULATORS or platform.machine() != "x86_64":
        return None
    binary, cpu, _ = EMULATORS[cpu_class]
    return f"{binary} -cpu {cpu}" if shutil.which(binary) else None


def score(model: Path, cpu_class: str, rows: list[dict[str, np.ndarray]], truth: np.ndarray,
          timeout: float = 600.0) -> tuple[float, int] | None:
    """Top-1 score of the ONNX ``model`` on ``rows`` under the emulated CPU, and the number scored; None when
    it cannot be emulated here or the emulated run fails (logged)."""
    how = can_emulate(cpu_class)
    if how is None or not rows:
        return None
    binary, cpu, _ = EMULATORS[cpu_class]
    with tempfile.TemporaryDirectory(prefix="edgerun-emulate-") as tmp:
        data = Path(tmp) / "rows.npz"
        np.savez(data, __truth__=truth[:len(rows)], **{f"{i}/{k}": v for i, r in enumerate(rows) for k, v in r.items()})
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(Path(model).resolve()), "rows": str(data), "n": len(rows)}))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run([shutil.which(binary), "-cpu", cpu, sys.executable, "-m", "edgerun.hub.emulate",
                                   str(job)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            log.warning("emulated %s check of %s timed out after %.0fs", cpu_class, model.name, timeout)
            return None
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support" not in ln][-1:]
        log.warning("emulated %s check of %s failed: %s", cpu_class, model.name, tail[0] if tail else proc.returncode)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(result["score"]), int(result["n"])


def check_targets(path: Path, info: dict, scorer: "Scorer", vid: str) -> list[str]:
    """Score an int8 ONNX variant on the target CPUs this hub emulates, recording each check in ``info``
    (``validated``) and taking a class whose kernels lose accuracy off ``info["int8"]["targets"]``; the notes."""
    import onnxruntime as ort

    from edgerun.device import detect

    host = detect().cpu_class
    int8 = info.get("int8") or {}
    targets = list(int8.get("targets") or [])
    notes = []
    for cls in list(targets):
        if cls == host or can_emulate(cls) is None:
            continue
        rows = list(scorer.rows(DEFAULT_SAMPLES))
        base = scorer.score_top1(scorer.reference[:len(rows)])
        got = score(path, cls, rows, scorer.truth)
        if got is None:
            continue
        value, n = got
        info.setdefault("validated", []).append({
            "cpu": cls, "how": f"emulated: {can_emulate(cls)} ({EMULATORS[cls][2]})",
            "backend": f"onnxruntime {ort.__version__}", "metric": scorer.metric, "score": round(value, 4),
            "samples": n, "fp32_score": round(base, 4)})
        if base - value > scorer.max_drop + 1e-9:
            targets.remove(cls)
            notes.append(f"not for {cls}: {100 * value:.1f}% there (emulated) vs fp32's {100 * base:.1f}%")
        else:
            notes.append(f"checked on {cls} (emulated): {100 * value:.1f}%")
    int8["targets"] = targets
    return notes


def _child(job: dict) -> dict:
    import onnxruntime as ort

    with np.load(job["rows"], allow_pickle=False) as z:
        truth = z["__truth__"]
        rows: list[dict[str, np.ndarray]] = [{} for _ in range(job["n"])]
        for key in z.files:
            if key != "__truth__":
                i, name = key.split("/", 1)
                rows[int(i)][name] = z[key]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(job["model"], opts, providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    top = np.array([int(np.argmax(session.run([first], r)[0])) for r in rows])
    return {"score": float(np.mean(top == truth)), "n": len(rows)}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text()))))
