"""Facts about the host: architecture, CPU flags, board model, memory and accelerators."""

from __future__ import annotations

import functools
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgerun.plugins import call_each

# What ``platform.machine()`` reports on other systems, mapped to the Linux names profiles use.
ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}
# which int8 kernels a CPU runs: x86 without VNNI multiplies u8 by s8 with VPMADDUBSW, whose 16-bit pair sums
# saturate; VNNI (and AMX) sum into 32 bits; ARM64 has no such limit
CPU_CLASSES = ("x86-vnni", "x86", "arm64")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass
class DeviceFacts:
    """What edgerun knows about the machine it runs on."""

    arch: str
    cpu_model: str = ""
    cpu_flags: frozenset[str] = frozenset()
    cpu_count: int = 1
    device_tree_model: str = ""
    memory_total: int = 0
    memory_available: int = 0
    accelerators: frozenset[str] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_class(self) -> str:
        """The kind of int8 kernels this CPU runs: ``x86-vnni``, ``x86``, ``arm64``, or its architecture."""
        if self.arch == "x86_64":
            return "x86-vnni" if self.cpu_flags & VNNI_FLAGS else "x86"
        return "arm64" if self.arch == "aarch64" else self.arch

    def to_dict(self) -> dict[str, Any]:
        """The facts as plain JSON-able values (for status reports and ``edgerun device``)."""
        return {
            "arch": self.arch, "cpu_model": self.cpu_model, "cpu_count": self.cpu_count,
            "cpu_flags": sorted(self.cpu_flags), "device_tree_model": self.device_tree_model,
            "memory_total": self.memory_total, "memory_available": self.memory_available,
            "accelerators": sorted(self.accelerators), **self.extra,
        }


def normalize_arch(arch: str) -> str:
    """The Linux name of an architecture: ``arm64`` is ``aarch64``, ``amd64`` is ``x86_64``."""
    arch = arch.strip().lower()
    return ARCH_ALIASES.get(arch, arch)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def usable_cpus(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may use: its CPU affinity (``taskset``, cpusets), capped by a cgroup v2 CPU quota on
    its cgroup or one above it (``cpu.max``: ``docker run --cpus``, systemd's ``CPUQuota=``), rounded up."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    base = Path(root)
    for line in _read(self_cgroup).splitlines():
        if line.startswith("0::"):
            cgroup = base / line[3:].strip().lstrip("/")
            break
    else:
        return n  # cgroup v1, or no cgroups: the affinity alone
    while True:
        quota, _, period = _read(str(cgroup / "cpu.max")).strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
        if cgroup == base or base not in cgroup.parents:
            return n
        cgroup = cgroup.parent


def _cpuinfo() -> tuple[str, frozenset[str], str]:
    """CPU model, flags (x86 ``flags``, Arm ``Features``) and board (a Pi's ``Model``) from /proc/cpuinfo."""
    model, flags, board = "", set(), ""
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model" and not value.strip().isdigit():  # x86 has a numeric "model"
            board = value.strip()
    return model, frozenset(flags), board


@functools.cache
def cpu_model() -> str:
    """This host's CPU model as /proc/cpuinfo names it (read once)."""
    return _cpuinfo()[0]


def _accelerators() -> frozenset[str]:
    """Accelerators visible through device nodes and sysfs, without importing any backend library."""
    found = set()
    nvidia = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu", "/proc/driver/nvidia")
    if any(Path(p).exists() for p in nvidia):
        found.add("cuda")
    if Path("/etc/nv_tegra_release").exists():
        found.add("jetson")
    for card in Path("/sys/class/drm").glob("card[0-9]*/device/vendor"):
        if _read(str(card)).strip() == "0x8086":
            found.add("intel_gpu")
    if Path("/dev/accel").is_dir() and any(Path("/dev/accel").iterdir()):
        for dev in Path("/sys/class/accel").glob("accel*/device/vendor"):
            if _read(str(dev)).strip() == "0x8086":
                found.add("intel_npu")
    if Path("/dev/apex_0").exists():
        found.add("edgetpu")
    return frozenset(found)


def detect(pm: Any = None) -> DeviceFacts:
    """Read the host's facts; plugins may add to them through ``describe_device``."""
    model, flags, board = _cpuinfo()
    mem = psutil.virtual_memory()
    facts = DeviceFacts(
        arch=normalize_arch(platform.machine()),
        cpu_model=model,
        cpu_flags=flags,
        cpu_count=usable_cpus(),
        device_tree_model=_read("/proc/device-tree/model").rstrip("\x00").strip() or board,
        memory_total=mem.total,
        memory_available=mem.available,
        accelerators=_accelerators(),
    )
    if pm is not None:
        contributions, _ = call_each(pm, "describe_device", facts=facts)  # a failing plugin is logged and skipped
        for contribution in contributions:
            if not contribution:
                continue
            contribution = dict(contribution)
            facts.accelerators = facts.accelerators | frozenset(contribution.pop("accelerators", ()))
            facts.cpu_flags = facts.cpu_flags | frozenset(contribution.pop("cpu_flags", ()))
            facts.extra.update(contribution)
    return facts


def refresh_memory(facts: DeviceFacts) -> DeviceFacts:
    """Update the available-memory reading (it changes as models load)."""
    facts.memory_available = psutil.virtual_memory().available
    return facts
