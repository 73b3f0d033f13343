"""The plugin system: entry-point discovery of a third-party plugin, every hook, broken and misspelt plugins."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pluggy
import pytest

from edgerun import hookspecs
from edgerun.device import detect
from edgerun.hookspecs import hookimpl
from edgerun.plugins import make_plugin_manager
from edgerun.profiles import Profile
from edgerun.runtime import Runtime
from edgerun.tomlfile import read_toml

ROOT = Path(__file__).resolve().parents[2]
FAKE_DIST = ROOT / "tests" / "plugins" / "edgerun_fakebackend"
FAKE_BACKEND = "onnx-reference"
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
               if hasattr(fn, "edgerun_spec"))


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Install a plugin distribution the way pip leaves it: modules plus a ``*.dist-info`` with entry_points.txt."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("EDGERUN_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("EDGERUN_DISABLE_PLUGINS", raising=False)
    modules: list[str] = []
    from edgerun.plugins import backend_classes

    def install_dist(dist: str, entry_points: dict[str, str], files: dict[str, str | Path] | None = None) -> None:
        for rel, content in (files or {}).items():
            if isinstance(content, Path):
                shutil.copytree(content, site / rel)
            else:
                (site / rel).write_text(content)
            modules.append(Path(rel).stem)
        info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(
            "[edgerun]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items()))
        backend_classes.cache_clear()  # the backend classes profiles resolve aliases with, now with this plugin's

    yield install_dist
    backend_classes.cache_clear()
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            del sys.modules[name]


@pytest.fixture
def fake_plugin(install: Callable[..., None]):
    """tests/plugins/edgerun_fakebackend, installed with the entry points its pyproject.toml declares."""
    eps = read_toml(FAKE_DIST / "pyproject.toml")["project"]["entry-points"]["edgerun"]
    install("edgerun-fakebackend", eps, {"edgerun_fakebackend": FAKE_DIST / "edgerun_fakebackend"})
    import edgerun_fakebackend

    edgerun_fakebackend.EVENTS.clear()
    return edgerun_fakebackend


@pytest.fixture
def broken_plugin(install: Callable[..., None]) -> None:
    """A plugin whose import raises, as a plugin with a missing dependency does."""
    install("edgerun-broken", {"broken": "edgerun_broken"},
            {"edgerun_broken.py": 'raise ImportError("No module named \'hailo_platform\'")\n'})


@pytest.fixture
def misspelt_plugin(install: Callable[..., None]) -> None:
    """A plugin implementing ``register_backend`` (no such hook: it is ``register_backends``)."""
    install("edgerun-misspelt", {"misspelt": "edgerun_misspelt"},
            {"edgerun_misspelt.py": "from edgerun import hookimpl\n\n\n@hookimpl\n"
                                    "def register_backend(register):\n    pass\n"})


def test_third_party_plugin_is_discovered_through_its_entry_point(fake_plugin, cpu_profile, cli) -> None:
    pm, failures = make_plugin_manager()
    assert failures == []
    assert pm.get_plugin("fakebackend") is fake_plugin
    rt = Runtime(profile=cpu_profile)
    assert {FAKE_BACKEND, "onnxruntime"} <= set(rt.backends)
    rc, out, _ = cli("backends")
    assert rc == 0
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"│ {FAKE_BACKEND} "))
    assert "│ yes " in lines[i] and lines[i + 1].startswith("│ onnx ")  # the formats it loads, under its name


def test_plugins_can_be_disabled(fake_plugin, monkeypatch: pytest.MonkeyPatch, cpu_profile) -> None:
    monkeypatch.setenv("EDGERUN_DISABLE_PLUGINS", "1")
    assert FAKE_BACKEND not in Runtime(profile=cpu_profile).backends


def test_hook_register_backends(fake_plugin, measured_digits, digits_input) -> None:
    """A third-party backend runs a real package when the profile prefers it, and agrees with onnxruntime."""
    prefers_it = Profile(name="ref-first", prefer=(FAKE_BACKEND, "onnxruntime"))
    with Runtime(profile=prefers_it) as rt:
        model = rt.load(measured_digits.root)
        assert (model.backend, model.variant.id) == (FAKE_BACKEND, "onnx-fp32")
        got = rt.infer("digits", {"input": digits_input})["probabilities"]
    with Runtime(profile=Profile(name="ort-first", prefer=("onnxruntime",))) as ort_rt:
        assert ort_rt.load(measured_digits.root).backend == "onnxruntime"
        want = ort_rt.infer("digits", {"input": digits_input})["probabilities"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def _hub_package(tmp_path: Path, model: Path, val: Path, **kw):
    from edgerun.hub.packager import PackageRequest, package_model
    from edgerun.hub.tools import hub_plugins

    hub_plugins.cache_clear()  # the hub's plugin manager, with the plugin just installed
    asked = {"precisions": ("fp32",), "formats": ("onnx",), "backends": ("onnxruntime",), "repeats": 10, **kw}
    try:
        return package_model(PackageRequest(model=model, name="lin", version=1, validation=val, out=tmp_path / "pkg",
                                            **asked))
    finally:
        hub_plugins.cache_clear()


def test_hook_register_model_sources(fake_plugin, tmp_path: Path) -> None:
    """A third-party source turns its own model file into the ONNX model the package is made from."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    np.savez(tmp_path / "clf.linear.npz", W=w, b=b)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, labels=np.argmax(x @ w + b, axis=1))
    report = _hub_package(tmp_path, tmp_path / "clf.linear.npz", tmp_path / "val.npz")
    assert report.variants[0].status == "kept" and report.variants[0].score("accuracy") == 1.0
    with Runtime(profile=Profile(name="ort", prefer=("onnxruntime",))) as rt:
        rt.load(tmp_path / "pkg")
        np.testing.assert_allclose(rt.infer("lin", {"x": x})["scores"], x @ w + b, rtol=1e-5, atol=1e-5)


def test_hook_register_variant_makers(fake_plugin, measured_digits, tmp_path: Path) -> None:
    """A third-party maker's variant is planned, measured and judged like the built-in ones."""
    from edgerun.testing.models import digits_data

    _, _, x_val, y_val = digits_data()
    np.savez(tmp_path / "val.npz", input=x_val[:100], labels=y_val[:100])
    report = _hub_package(tmp_path, measured_digits.root / measured_digits.variant("onnx-fp32").files[0].path,
                          tmp_path / "val.npz")
    copy = next(v for v in report.variants if v.id == "onnx-fp32-copy")
    assert copy.note == "copied by the fake plugin" and copy.results["onnxruntime"].latency_ms > 0
    assert copy.status in ("kept", "dropped") and copy.reason  # judged: kept as measured, or dropped with why


def test_a_plugin_brings_a_format_and_a_precision_end_to_end(fake_plugin, tmp_path: Path, cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake plugin's backend loads a format of its own (suffix .linear, profile alias 'lin', its own memory
    estimate) with a precision of its own (bf16), and its hub maker makes it: the packager plans, measures and
    keeps it, and a device explains, loads and serves it through the plugin."""
    import os

    import httpx

    from edgerun.package import ModelPackage, precision_rank
    from edgerun.profiles import load_profiles
    from edgerun.testing.mosquitto import free_port
    from edgerun.testing.processes import terminate

    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    np.savez(tmp_path / "clf.linear.npz", W=w, b=b)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, labels=np.argmax(x @ w + b, axis=1))
    from edgerun.hub.tools import hub_plugins

    hub_plugins.cache_clear()
    rc, out, _ = cli("hub", "package", "--help")  # the command lists what the installed makers make
    hub_plugins.cache_clear()
    said = " ".join(out.replace("│", " ").split())
    assert rc == 0 and "Comma list of onnx, openvino, tflite, linear" in said and "fp32, fp16, bf16, int8, int4" in said
    # the measuring processes load the plugin too, as they would once it is pip-installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path / "site-packages"),
                                                                 os.environ.get("PYTHONPATH")) if p))
    report = _hub_package(tmp_path, tmp_path / "clf.linear.npz", tmp_path / "val.npz", precisions=("fp32", "bf16"),
                          formats=("onnx", "linear"), backends=("onnxruntime", fake_plugin.LINEAR))
    made = next(v for v in report.variants if v.id == "linear-bf16")
    assert made.status == "kept", made.reason  # the only variant on its backend: nothing better ran there
    assert made.results[fake_plugin.LINEAR].error is None and made.results[fake_plugin.LINEAR].accuracy >= 0.95
    pkg = ModelPackage.load(tmp_path / "pkg")
    variant = pkg.variant("linear-bf16")
    assert (variant.format, variant.precision, variant.main_file.path) == ("linear", "bf16", "linear-bf16.linear")
    assert set(variant.measured) == {fake_plugin.LINEAR}
    # the plugin's precision ranks by its bits: below fp32, level with fp16, above int8
    assert precision_rank("fp32") < precision_rank("bf16") == precision_rank("fp16") < precision_rank("int8")
    # a profile names the plugin's backend by its alias
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "lin-first.toml").write_text('name = "lin-first"\n\n[backends]\nprefer = ["lin", "ort"]\n')
    profile = load_profiles([tmp_path / "profiles"])["lin-first"]
    assert profile.prefer == (fake_plugin.LINEAR, "onnxruntime")
    with Runtime(profile=profile) as rt:
        explained = {(c.variant.id, c.backend): c for c in rt.explain(tmp_path / "pkg", memory_budget="1GiB").candidates}
        assert explained[("linear-bf16", fake_plugin.LINEAR)].kept
        assert explained[("linear-bf16", fake_plugin.LINEAR)].memory_measured
        model = rt.load(tmp_path / "pkg", variant="linear-bf16", backend=fake_plugin.LINEAR)
        np.testing.assert_allclose(rt.infer("lin", {"x": x[:5]})["scores"], x[:5] @ w + b, rtol=1e-2, atol=1e-2)
        assert model.backend == fake_plugin.LINEAR
    # a bare .linear file: its suffix names the format, and its memory need is the plugin's estimate
    bare = fake_plugin.write_linear(tmp_path / "clf.linear", w, b, "x", "scores")
    with Runtime(profile=profile) as rt:
        c = rt.explain(bare, memory_budget="1GiB").chosen
        assert (c.variant.format, c.backend, c.memory_measured) == ("linear", fake_plugin.LINEAR, False)
        assert c.memory_bytes == (2 << 20) + bare.stat().st_size
    # served over HTTP through the plugin
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())",
                             "serve", "--model", str(bare), "--port", str(port), "--state-dir", str(tmp_path / "st")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(f"{url}/v2/models/clf/infer", json={"inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x[:2].ravel().tolist()}]}, timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "scores" and out["shape"] == [2, 3]
        np.testing.assert_allclose(np.reshape(out["data"], (2, 3)), x[:2] @ w + b, rtol=1e-5, atol=1e-5)
        assert httpx.get(f"{url}/v2/models/clf", timeout=5).json()["platform"].startswith(fake_plugin.LINEAR)
    finally:
        terminate(proc)


def test_hook_describe_device(fake_plugin, cli) -> None:
    """Facts a plugin contributes are merged into the host's facts and shown by ``edgerun device``."""
    pm, _ = make_plugin_manager()
    facts = detect(pm)
    assert "fake_npu" in facts.accelerators
    assert facts.extra["fake_plugin"] == "present"
    rc, out, _ = cli("device")
    assert rc == 0 and "fake_npu" in out and "fake_plugin" in out


class PreferInt8:
    """A plugin that always takes the int8 variant when it was kept."""

    @hookimpl
    def choose_variant(self, package, profile, candidates):
        """Take int8."""
        return next((c for c in candidates if c.kept and c.variant.precision == "int8"), None)


class NoOpinion:
    """A plugin that looks at the choice and leaves it to the built-in rule."""

    calls = 0

    @hookimpl
    def choose_variant(self, package, profile, candidates):
        """Abstain."""
        NoOpinion.calls += 1
        return None


def test_hook_choose_variant(runtime: Runtime, measured_digits, digits_input) -> None:
    """A plugin's choose_variant overrides the built-in memory-fit rule; None leaves it to the rule."""
    assert runtime.explain(measured_digits).chosen.variant.id == "onnx-fp32"
    runtime.pm.register(NoOpinion(), name="no-opinion")
    try:
        assert runtime.explain(measured_digits).chosen.variant.id == "onnx-fp32"
        assert NoOpinion.calls >= 1
    finally:
        runtime.pm.unregister(name="no-opinion")
    runtime.pm.register(PreferInt8(), name="prefer-int8")
    try:
        model = runtime.load(measured_digits.root)
        assert model.variant.id == "onnx-int8"
        assert runtime.infer("digits", {"input": digits_input})["probabilities"].shape == (2, 10)
    finally:
        runtime.pm.unregister(name="prefer-int8")
    assert runtime.load(measured_digits.root).variant.id == "onnx-fp32"


def test_hook_on_model_activated(fake_plugin, cpu_profile, measured_digits) -> None:
    """A plugin hears when a model version starts serving, with the variant and backend."""
    with Runtime(profile=cpu_profile) as rt:
        rt.load(measured_digits.root)
    assert ("activated", {"model": "digits", "version": 1, "variant": "onnx-fp32",
                          "backend": "onnxruntime"}) in fake_plugin.EVENTS


def test_hook_on_update_event(fake_plugin, cpu_profile, tmp_path: Path) -> None:
    """A plugin hears every update transition the device agent reports (here with no broker connected)."""
    from edgerun.agent.agent import Agent
    from edgerun.config import Config, MqttConfig
    from edgerun.store import JournalEntry

    with Runtime(profile=cpu_profile) as rt:
        agent = Agent(rt, Config(state_dir=tmp_path / "state", mqtt=MqttConfig(enabled=True, device_id="dev-1")))
        agent.report(JournalEntry("digits", 2, "failed", "sha256 mismatch"))
    assert ("update", {"model": "digits", "version": 2, "state": "failed",
                       "detail": "sha256 mismatch"}) in fake_plugin.EVENTS


def test_broken_plugin_is_reported_by_name_and_the_others_still_load(fake_plugin, broken_plugin, cpu_profile,
                                                                     cli, caplog) -> None:
    rt = Runtime(profile=cpu_profile)
    assert [f.name for f in rt.plugin_failures] == ["broken"]
    assert "hailo_platform" in rt.plugin_failures[0].error
    assert {FAKE_BACKEND, "onnxruntime"} <= set(rt.backends)
    assert "plugin 'broken' failed to load" in caplog.text
    rc, out, _ = cli("backends")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("broken"))
    assert "broken" in row and "plugin failed to load: ImportError" in row
    assert FAKE_BACKEND in out


def test_broken_plugin_raises_under_strict_plugins(broken_plugin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERUN_STRICT_PLUGINS", "1")
    with pytest.raises(ImportError, match="hailo_platform"):
        make_plugin_manager()


def test_check_pending_catches_a_misspelt_hook(runtime: Runtime) -> None:
    class Misspelt:
        @hookimpl
        def choose_varient(self, package, profile, candidates):
            """Misspelt on purpose."""

    runtime.pm.register(Misspelt(), name="misspelt")
    try:
        with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'choose_varient'"):
            runtime.pm.check_pending()
    finally:
        runtime.pm.unregister(name="misspelt")
    runtime.pm.check_pending()


def test_installed_plugin_with_a_misspelt_hook_is_skipped_and_named(fake_plugin, misspelt_plugin,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pm, failures = make_plugin_manager()
    assert [f.name for f in failures] == ["misspelt"]
    assert "register_backend" in failures[0].error
    assert pm.get_plugin("misspelt") is None and pm.get_plugin("fakebackend") is not None
    monkeypatch.setenv("EDGERUN_STRICT_PLUGINS", "1")
    with pytest.raises(pluggy.PluginValidationError, match="register_backend"):
        make_plugin_manager()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_documented_and_tested(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    doc = inspect.getdoc(spec) or ""
    assert doc and "\n" not in doc.strip(), f"{hook} needs a one-line docstring"
    assert f"`{hook}(" in (ROOT / "docs" / "plugins.md").read_text(), f"{hook} is missing from docs/plugins.md"
    test = globals().get(f"test_hook_{hook}")
    assert callable(test), f"no test_hook_{hook} in {__file__}"
    assert re.search(rf"\b{hook}\b", (FAKE_DIST / "edgerun_fakebackend" / "__init__.py").read_text()) \
        or hook == "choose_variant", f"the fake third-party plugin should implement {hook}"


def test_the_hook_list_is_not_empty() -> None:
    assert {"register_backends", "describe_device", "choose_variant", "on_model_activated",
            "on_update_event"} <= set(HOOKS)


class _RaisingBackend:
    """A backend plugin whose availability check itself crashes."""

    @hookimpl
    def register_backends(self, register):
        from edgerun.backend import Backend

        class Exploding(Backend):
            name = "exploding"
            formats = ("onnx",)
            install_hint = "pip install edgerun-exploding"

            def availability(self):
                raise RuntimeError("driver probe crashed")

            def load(self, path, options):  # pragma: no cover - never chosen
                raise AssertionError("an unavailable backend must not be loaded")

        register(Exploding)


def test_backend_whose_availability_check_raises_is_listed_unavailable(runtime: Runtime, measured_digits,
                                                                      digits_input) -> None:
    """A crashing availability check marks that backend unavailable; the others keep serving."""
    runtime.pm.register(_RaisingBackend(), name="exploding")
    try:
        status = {b.name: a for b, a in runtime.backend_status()}
        assert not status["exploding"].available
        assert "driver probe crashed" in status["exploding"].reason
        dropped = [c for c in runtime.explain(measured_digits).candidates if c.backend == "exploding"]
        assert dropped and all(not c.kept and "driver probe crashed" in c.reason for c in dropped)
        runtime.load(measured_digits.root)
        assert runtime.infer("digits", {"input": digits_input})["probabilities"].shape == (2, 10)
    finally:
        runtime.pm.unregister(name="exploding")


class _FailingHooks:
    """A plugin that loads but whose collecting hooks raise when called."""

    @hookimpl
    def register_backends(self, register):
        """Fail the way a plugin importing a missing SDK inside its hook does."""
        raise ImportError("No module named 'hailo_platform'")

    @hookimpl
    def describe_device(self, facts):
        """Fail while probing the device."""
        raise OSError("/dev/hailo0: permission denied")


def test_a_plugin_whose_hooks_raise_is_reported_and_the_others_still_work(runtime: Runtime, measured_digits,
                                                                          digits_input, caplog,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    runtime.pm.register(_FailingHooks(), name="hailo")
    try:
        assert {"onnxruntime", "openvino", "litert"} <= set(runtime.backends)
        assert [(f.name, f.error) for f in runtime.plugin_failures] == [
            ("hailo", "register_backends: ImportError: No module named 'hailo_platform'")]
        assert "plugin 'hailo' failed in register_backends" in caplog.text
        facts = detect(runtime.pm)
        assert facts.arch and "plugin 'hailo' failed in describe_device" in caplog.text
        runtime.load(measured_digits.root)
        assert runtime.infer("digits", {"input": digits_input})["probabilities"].shape == (2, 10)
        monkeypatch.setenv("EDGERUN_STRICT_PLUGINS", "1")
        with pytest.raises(OSError, match="permission denied"):
            detect(runtime.pm)
    finally:
        runtime.pm.unregister(name="hailo")


class _FailingListener:
    """A notification plugin that raises."""

    @hookimpl
    def on_model_activated(self, model, version, variant, backend):
        """Fail on every activation."""
        raise RuntimeError("dashboard unreachable")


def test_a_failing_notification_does_not_undo_the_activation(runtime: Runtime, measured_digits, digits_input,
                                                            caplog) -> None:
    runtime.pm.register(_FailingListener(), name="dashboard")
    try:
        model = runtime.load(measured_digits.root)
        assert runtime.model("digits") is model
        assert runtime.infer("digits", {"input": digits_input})["probabilities"].shape == (2, 10)
        assert "plugin 'dashboard' failed in on_model_activated" in caplog.text
    finally:
        runtime.pm.unregister(name="dashboard")
