"""Device profiles: the shipped ones load, the host is matched to the most specific, bad files are explained."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerun.device import DeviceFacts, detect
from edgerun.errors import ConfigError
from edgerun.profiles import BUNDLED_DIR, choose_profile, load_profile, load_profiles

GiB = 1 << 30
SHIPPED = ("generic-x86_64", "x86_64-avx512-vnni", "generic-aarch64", "raspberry-pi-4", "raspberry-pi-5",
           "jetson-orin-nano", "intel-nuc-igpu-npu")
KNOWN_BACKENDS = {"onnxruntime", "openvino", "litert"}

PLAIN_X86 = DeviceFacts(arch="x86_64", cpu_model="AMD Ryzen 5 5600G with Radeon Graphics",
                        cpu_flags=frozenset({"sse4_2", "avx", "avx2", "fma"}), memory_total=16 * GiB)
XEON_VNNI = DeviceFacts(arch="x86_64", cpu_model="Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
                        cpu_flags=frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}), memory_total=64 * GiB)
AMD_ZEN4 = DeviceFacts(arch="x86_64", cpu_model="AMD EPYC 9354 32-Core Processor",
                       cpu_flags=frozenset({"avx2", "avx512f", "avx512_vnni"}), memory_total=64 * GiB)
TIGER_LAKE_NUC = DeviceFacts(arch="x86_64", cpu_model="11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz",
                             cpu_flags=frozenset({"avx2", "avx512f", "avx512_vnni"}),
                             accelerators=frozenset({"intel_gpu"}), memory_total=16 * GiB)
PI4 = DeviceFacts(arch="aarch64", cpu_model="", cpu_flags=frozenset({"fp", "asimd", "crc32"}),
                  device_tree_model="Raspberry Pi 4 Model B Rev 1.4", memory_total=4 * GiB)
CM4 = DeviceFacts(arch="aarch64", device_tree_model="Raspberry Pi Compute Module 4 Rev 1.0", memory_total=2 * GiB)
PI5 = DeviceFacts(arch="aarch64", device_tree_model="Raspberry Pi 5 Model B Rev 1.0", memory_total=8 * GiB)
JETSON = DeviceFacts(arch="aarch64", device_tree_model="NVIDIA Jetson Orin Nano Developer Kit",
                     accelerators=frozenset({"cuda", "jetson"}), memory_total=8 * GiB)
ROCK5 = DeviceFacts(arch="aarch64", device_tree_model="Radxa ROCK 5B", memory_total=8 * GiB)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_profile_loads(name: str) -> None:
    p = load_profile(BUNDLED_DIR / f"{name}.toml")
    assert p.name == name, "the file name and the profile name must agree (--profile NAME finds it by name)"
    assert p.description and p.match.get("arch"), p
    assert p.prefer and set(p.prefer) <= KNOWN_BACKENDS
    assert set(p.backend_options) <= KNOWN_BACKENDS
    assert 1 << 20 <= p.budget_bytes(2 * GiB) <= 2 * GiB


def test_every_file_in_device_profiles_is_a_valid_profile() -> None:
    assert sorted(load_profiles([BUNDLED_DIR])) == sorted(p.stem for p in BUNDLED_DIR.glob("*.toml"))
    assert set(SHIPPED) <= set(load_profiles([BUNDLED_DIR]))


def test_shipped_profiles_carry_device_specific_settings(bundled_profiles) -> None:
    assert bundled_profiles["raspberry-pi-4"].prefer[:2] == ("litert", "onnxruntime")
    assert bundled_profiles["x86_64-avx512-vnni"].prefer[0] == "openvino"
    assert bundled_profiles["jetson-orin-nano"].options_for("onnxruntime")["providers"] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert bundled_profiles["intel-nuc-igpu-npu"].options_for("openvino")["device"] in ("AUTO", "GPU")
    pi4 = bundled_profiles["raspberry-pi-4"]
    assert pi4.budget_bytes(4 * GiB) < bundled_profiles["generic-x86_64"].budget_bytes(4 * GiB)
    assert pi4.threads == 4


@pytest.mark.parametrize("facts, expected", [
    (PLAIN_X86, "generic-x86_64"),
    (XEON_VNNI, "x86_64-avx512-vnni"),
    (AMD_ZEN4, "generic-x86_64"),            # VNNI but not Intel: the OpenVINO-first profile is not for it
    (TIGER_LAKE_NUC, "intel-nuc-igpu-npu"),  # VNNI and an iGPU: the iGPU profile says more
    (PI4, "raspberry-pi-4"),
    (CM4, "raspberry-pi-4"),
    (PI5, "raspberry-pi-5"),
    (JETSON, "jetson-orin-nano"),
    (ROCK5, "generic-aarch64"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_detection_picks_the_most_specific_matching_profile(bundled_profiles, facts, expected) -> None:
    choice = choose_profile(facts, profiles=bundled_profiles)
    assert choice.profile.name == expected, choice.why
    matched = {p.name for p, ok, _ in choice.considered if ok}
    assert expected in matched


def test_why_explains_the_match_and_names_the_less_specific_ones(bundled_profiles) -> None:
    why = choose_profile(PI4, profiles=bundled_profiles).why
    assert "'Raspberry Pi 4 Model B Rev 1.4' contains 'Raspberry Pi 4'" in why
    assert "generic-aarch64" in why  # also matched, less specific


def test_jetson_without_cuda_is_not_the_jetson_profile(bundled_profiles) -> None:
    no_gpu = DeviceFacts(arch="aarch64", device_tree_model="NVIDIA Jetson Orin Nano Developer Kit")
    choice = choose_profile(no_gpu, profiles=bundled_profiles)
    assert choice.profile.name == "generic-aarch64"
    jetson = next(r for p, ok, r in choice.considered if p.name == "jetson-orin-nano")
    assert "accelerators missing: cuda" in jetson


def test_arm64_is_aarch64(bundled_profiles) -> None:
    mac_style = DeviceFacts(arch="arm64", device_tree_model="Raspberry Pi 5 Model B Rev 1.0")
    assert choose_profile(mac_style, profiles=bundled_profiles).profile.name == "raspberry-pi-5"


def test_arch_aliases_are_listed_once_in_the_reasons(bundled_profiles) -> None:
    """generic-aarch64 lists "aarch64" and "arm64"; an x86 host is told about "aarch64" once."""
    assert bundled_profiles["generic-aarch64"].match["arch"] == ["aarch64"]
    reasons = dict((p.name, r) for p, _, r in choose_profile(PLAIN_X86, profiles=bundled_profiles).considered)
    assert reasons["generic-aarch64"] == ["arch x86_64 not in ['aarch64']"]


def test_an_unknown_host_gets_builtin_defaults_and_says_so(bundled_profiles) -> None:
    choice = choose_profile(DeviceFacts(arch="riscv64"), profiles=bundled_profiles)
    assert choice.profile.name == "generic"
    assert "no profile matched" in choice.why


def test_override_by_name_ignores_detection(bundled_profiles) -> None:
    choice = choose_profile(PLAIN_X86, override="raspberry-pi-4", profiles=bundled_profiles)
    assert choice.profile.name == "raspberry-pi-4"
    assert "raspberry-pi-4" in choice.why


def test_override_by_file(tmp_path: Path, bundled_profiles) -> None:
    path = tmp_path / "my-board.toml"
    path.write_text('name = "my-board"\ndescription = "lab board"\n[resources]\nmemory_budget = "256MiB"\n'
                    'threads = 2\n[backends]\nprefer = ["tflite", "onnxruntime"]\n')
    choice = choose_profile(PI4, override=str(path), profiles=bundled_profiles)
    assert choice.profile.name == "my-board"
    assert choice.profile.budget_bytes(8 * GiB) == 256 << 20
    assert choice.profile.prefer == ("litert", "onnxruntime")  # "tflite" is the LiteRT backend's old name
    assert str(path) in choice.why


def test_unknown_profile_name_lists_the_known_ones(bundled_profiles) -> None:
    with pytest.raises(ConfigError) as err:
        choose_profile(PI4, override="raspbery-pi-4", profiles=bundled_profiles)
    msg = str(err.value)
    assert "unknown profile 'raspbery-pi-4'" in msg and "raspberry-pi-4" in msg and "generic-x86_64" in msg


def test_missing_profile_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml.*file not found"):
        choose_profile(PI4, override=str(tmp_path / "nope.toml"))


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n' + body)
    return path


@pytest.mark.parametrize("body, key, expected", [
    ('[resources]\nthreads = "four"\n', "resources.threads", "expected an integer, got str 'four'"),
    ('[resources]\nthreads = 0\n', "resources.threads", "expected a positive integer"),
    ('[resources]\nmemory_budget = "lots"\n', "resources.memory_budget", "expected a percentage"),
    ('[resources]\nmemory_budget = "150%"\n', "resources.memory_budget", "expected a percentage"),
    ('[resources]\nthreds = 4\n', "resources.threds", "unknown key; expected one of: memory_budget, threads"),
    ('[match]\nboard = "Pi"\n', "match.board", "unknown key; expected one of: arch"),
    ('colour = "red"\n', "colour", "unknown key; expected one of: name"),
    ('[match]\narch = [64]\n', "match.arch[0]", "expected a string"),
    ('[match]\nmin_memory = "2 gigs"\n', "match.min_memory", "expected a size such as '2GiB'"),
    ('[backends]\nprefer = "onnxruntime"\n', "backends.prefer", "expected an array"),
    ('[backends.onnxruntime]\nprovider = ["CPUExecutionProvider"]\n', "backends.onnxruntime.provider",
     "unknown key; expected one of: device, providers"),
    ('[backends.openvino]\ndevice = 1\n', "backends.openvino.device", "expected a string"),
])
def test_bad_profile_names_file_key_and_expectation(tmp_path: Path, body: str, key: str, expected: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    msg = str(err.value)
    assert str(path) in msg and f"key '{key}'" in msg and expected in msg, msg
    assert err.value.file == str(path) and err.value.key == key


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[resources\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*invalid TOML.*line 2"):
        load_profile(path)


def test_third_party_backend_options_pass_through(tmp_path: Path) -> None:
    path = _write(tmp_path, '[backends]\nprefer = ["hailo"]\n[backends.hailo]\nbatch = 8\n')
    p = load_profile(path)
    assert p.prefer == ("hailo",) and p.options_for("hailo") == {"batch": 8}


def test_two_profiles_with_one_name_in_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('name = "board"\n')
    (tmp_path / "b.toml").write_text('name = "board"\n')
    with pytest.raises(ConfigError, match=r"b\.toml.*key 'name'.*'board' is also used by .*a\.toml"):
        load_profiles([tmp_path])


def test_a_later_directory_overrides_a_shipped_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pi.toml").write_text('name = "raspberry-pi-4"\n[match]\narch = ["aarch64"]\n'
                                      'device_tree_model = "Raspberry Pi 4"\n[resources]\nmemory_budget = "100MiB"\n')
    monkeypatch.setenv("EDGERUN_PROFILE_PATH", str(tmp_path))
    profiles = load_profiles()
    assert profiles["raspberry-pi-4"].source == str(tmp_path / "pi.toml")
    assert choose_profile(PI4, profiles=profiles).profile.budget_bytes(GiB) == 100 << 20


PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd08

Revision\t: c03114
Serial\t\t: 10000000abcdef01
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni
"""


@pytest.mark.parametrize("machine, files, expected", [
    ("aarch64", {"/proc/cpuinfo": PI4_CPUINFO, "/proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00"},
     ("aarch64", "Raspberry Pi 4 Model B Rev 1.4", "asimd", "raspberry-pi-4")),
    ("arm64", {"/proc/cpuinfo": PI4_CPUINFO}, ("aarch64", "Raspberry Pi 4 Model B Rev 1.4", "asimd", "raspberry-pi-4")),
    ("AMD64", {"/proc/cpuinfo": XEON_CPUINFO},
     ("x86_64", "", "avx512_vnni", "x86_64-avx512-vnni")),
], ids=["pi4-device-tree", "pi4-cpuinfo-only", "xeon"])
def test_detect_reads_proc_files(monkeypatch: pytest.MonkeyPatch, bundled_profiles, machine, files, expected) -> None:
    """Arch, CPU flags and the board come from /proc as a real Pi 4 or Xeon presents them; the profile follows."""
    import edgerun.device as device

    monkeypatch.setattr(device.platform, "machine", lambda: machine)
    monkeypatch.setattr(device, "_read", lambda path: files.get(path, ""))
    monkeypatch.setattr(device, "_accelerators", lambda: frozenset())
    facts = detect()
    arch, board, flag, profile = expected
    assert (facts.arch, facts.device_tree_model) == (arch, board) and flag in facts.cpu_flags
    assert facts.memory_total > 0 and facts.memory_available > 0
    assert choose_profile(facts, profiles=bundled_profiles).profile.name == profile


def test_this_host_gets_a_profile(bundled_profiles) -> None:
    facts = detect()
    assert facts.arch and facts.memory_total > 0 and facts.cpu_count >= 1
    choice = choose_profile(facts, profiles=bundled_profiles)
    if facts.arch in ("x86_64", "aarch64"):
        assert choice.profile.name in bundled_profiles, choice.why


def test_device_command_names_the_profile_and_why(cli) -> None:
    rc, out, _ = cli("device")
    assert rc == 0
    expected = choose_profile(detect()).profile.name
    assert f"profile: {expected}" in out
    assert "why: most specific matching profile" in out or "why: no profile matched" in out
    assert "Profiles considered" in out and "generic-x86_64" in out and "raspberry-pi-4" in out


def test_device_command_with_profile_override(cli) -> None:
    rc, out, _ = cli("device", "--profile", "raspberry-pi-4")
    assert rc == 0
    assert "profile: raspberry-pi-4" in out and "why: requested by name (raspberry-pi-4)" in out
    assert "backend preference: litert, onnxruntime" in out


def test_device_command_unknown_profile_exits_with_config_error(cli) -> None:
    rc, _, err = cli("device", "--profile", "toaster")
    assert rc == 78
    assert "unknown profile 'toaster'" in err


def test_usable_cpus_are_capped_by_a_cgroup_cpu_quota(tmp_path):
    """`docker run --cpus 1.5` or systemd's CPUQuota= on this cgroup or one above it caps the CPUs edgerun plans
    for (rounded up), never above the CPU affinity; no quota ("max"), or no cgroup v2, leaves the affinity."""
    import os

    from edgerun.device import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    root = tmp_path / "cgroup"
    leaf = root / "system.slice" / "edgerun.service"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/system.slice/edgerun.service\n")
    assert usable_cpus(str(root), str(self_cgroup)) == affinity
    (root / "system.slice" / "cpu.max").write_text("50000 100000\n")  # half a CPU on the slice above
    assert usable_cpus(str(root), str(self_cgroup)) == 1
    (root / "system.slice" / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(str(root), str(self_cgroup)) == min(affinity, 2)
    self_cgroup.write_text("12:cpu,cpuacct:/docker/abc\n")  # cgroup v1 only
    assert usable_cpus(str(root), str(self_cgroup)) == affinity
