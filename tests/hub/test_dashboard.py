"""``edgerun hub dashboard`` against 1,000 simulated devices on a real Mosquitto, seen through a real Chromium."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest

from dashboard_helpers import CHROMIUM, CHROMIUM_ARGS, MODEL, XSS, Fleet, StreamRecorder, wait_for
from edgerun.contract import Event, ModelInfo, State, Status, UpdateInfo
from edgerun.hub.registry import Batch, Registry
from edgerun.testing.mosquitto import find_mosquitto, free_port

if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from edgerun.hub.dashboard.feed import FLUSH_SECONDS  # noqa: E402  (needs sse-starlette, the hub extra)

TOKEN = "dashboard-test-token"
DEVICES = 1000
KNOWN = DEVICES + 1  # the fleet and the device only the registry knows (its name is markup)
ROWS = "#rows tr.dev"
ACTION = {"X-Edgerun-Dashboard": "1"}


# --- fixtures ---------------------------------------------------------------------------------------

def seed_untrusted(registry: Registry, fleet: str) -> None:
    """A device the registry knows whose name, profile, tag and error are markup (no watcher ever saw it)."""
    now = time.time()
    u = UpdateInfo(MODEL, 1, "failed", None, XSS, XSS, now)
    status = Status(device=XSS, fleet=fleet, session=1, profile=XSS, tags={"note": XSS}, update=u, updates={MODEL: u})
    registry.apply(fleet, Batch(states={XSS: (State(False, 1, now), now)}, statuses={XSS: (status, now)}))


@dataclass
class World:
    """The fleet, the dashboard (open and with a token) and what its stream sent during a release."""

    fleet: Fleet
    url: str
    token_url: str
    servers: list[Any] = field(default_factory=list)
    burst: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory, measured) -> Iterator[World]:
    from edgerun.hub.dashboard.app import make_app
    from edgerun.hub.dashboard.server import ServerThread

    measured = measured.setdefault("dashboard", {})
    name = f"d{uuid.uuid4().hex[:8]}"
    fleet = Fleet(tmp_path_factory.mktemp("dashboard"), name, DEVICES)
    servers: list[ServerThread] = []
    try:
        t0 = time.monotonic()
        fleet.start(before_watch=lambda r: seed_untrusted(r, name))
        measured["fleet_online_s"] = round(time.monotonic() - t0, 2)
        measured["release_v1_s"] = round(fleet.release(1), 2)
        servers.append(ServerThread(make_app(fleet.registry, fleet.watch, name)).start())
        servers.append(ServerThread(make_app(fleet.registry, fleet.watch, name, TOKEN)).start())
        recorder = StreamRecorder(servers[0].url).start()
        t1 = time.monotonic()
        measured["release_v2_s"] = round(fleet.release(2), 2)
        time.sleep(1.0)  # the last flushes
        span = time.monotonic() - t1
        recorder.stop()
        devices = recorder.of("device", t1)
        burst = {"seconds": round(span, 2), "device_messages": len(devices), "device_rows": sum(n for *_, n in devices),
                 "event_messages": len(recorder.of("event", t1)), "mqtt_messages": fleet.watch.messages}
        measured["burst"] = burst
        yield World(fleet, servers[0].url, servers[1].url, servers, burst)
    finally:
        for s in servers:
            s.stop()
        fleet.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A fresh tab (its own storage); dialogs are dismissed and recorded in ``page.dialogs``."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, locale="en-US")
    pg = ctx.new_page()
    pg.dialogs = []
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))

    def on_dialog(d: Any) -> None:
        pg.dialogs.append(d.message)
        d.dismiss()

    pg.on("dialog", on_dialog)
    pg.on_dialog = on_dialog  # a test that answers a dialog itself removes this one
    yield pg
    ctx.close()
    assert not pg.errors, f"the page threw: {pg.errors}"


# --- helpers ----------------------------------------------------------------------------------------

def open_page(page, url: str) -> dict:
    """Navigate and wait for the table; the page's own timing marks (ms from navigation start)."""
    page.goto(url)
    page.wait_for_selector("html[data-ready='1']", timeout=15000)
    return page.evaluate("""() => Object.fromEntries([
        ...performance.getEntriesByType('mark').map(m => [m.name, Math.round(m.startTime)]),
        ...performance.getEntriesByType('paint').map(m => [m.name, Math.round(m.startTime)])])""")


def row_ids(page) -> list[str]:
    return page.eval_on_selector_all(ROWS, "trs => trs.map(t => t.dataset.id)")


# --- tests ------------------------------------------------------------------------------------------


def test_snapshot_health_and_guards(world):
    with httpx.Client(base_url=world.url, timeout=10) as c:
        assert c.get("/healthz").json() == {"ok": True}  # for a load balancer: nothing about the fleet
        health = c.get("/api/health").json()
        assert health["ok"] and health["devices"] == KNOWN and health["broker_connected"]
        res = c.get("/api/fleet")
        assert res.headers["content-type"] == "application/json"
        assert "script-src 'self'" in res.headers["content-security-policy"]
        snap = res.json()
        assert len(snap["devices"]) == KNOWN and snap["fleet"] == world.fleet.name
        row = next(d for d in snap["devices"] if d["id"] == "sim-0000")
        assert row["online"] is True and row["profile"] and row["tags"]["site"]
        assert set(row["models"][0]) == {"name", "version", "variant", "backend", "memory", "tuned"}
        assert row["models"][0]["tuned"] is None  # these simulated devices do not tune
        assert row["update"]["model"] == MODEL and row["rss"] > 0 and row["available"] > 0 and row["seen"] > 0
        assert len(snap["events"]) == 200 and snap["events"][-1]["seq"] > snap["events"][0]["seq"]
        assert [(r["model"], r["version"]) for r in snap["releases"]] == [(MODEL, 2)]

        assert c.get("/api/rollouts/999999").status_code == 404
        assert c.post("/api/rollouts/1/abort").status_code == 403  # no header: a cross-site form
        assert c.post("/api/rollouts/1/abort", headers={**ACTION, "Origin": "http://evil.example"}).status_code == 403
        assert c.post("/api/rollouts/999999/abort", headers=ACTION).status_code == 404
        assert c.post("/api/rollouts/999999/explode", headers=ACTION).status_code == 404
        assert c.get("/api/fleet", headers={"Host": "evil.example"}).status_code == 421  # DNS rebinding


def test_a_burst_of_status_messages_is_a_few_stream_messages_a_second(world):
    b = world.burst  # v2 to all 1,000 devices: six events and six statuses each
    print(f"release to {DEVICES} devices: {b}")
    assert b["device_rows"] >= DEVICES
    assert b["device_messages"] <= b["seconds"] / FLUSH_SECONDS + 2
    assert b["event_messages"] <= b["seconds"] / FLUSH_SECONDS + 2


def test_the_page_shows_the_fleet(world, page, screenshots, measured):
    expected = world.fleet.truth()
    assert expected["known"] == DEVICES
    marks = open_page(page, world.url)
    measured.setdefault("dashboard", {})["first_load_ms"] = marks
    print(f"first load, ms from navigation start: {marks}")
    shot = screenshots / "dashboard-fleet.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    text = lambda sel: page.text_content(sel).replace(",", "")  # noqa: E731
    assert int(text("#n-known")) == KNOWN
    assert int(text("#n-online")) == expected["online"]
    assert int(text("#n-offline")) == expected["offline"] + 1
    assert int(text("#n-updating")) == expected["updating"]
    assert int(text("#n-failed")) == expected["failed"] + 1
    chips = lambda sel: dict(page.eval_on_selector_all(  # noqa: E731
        sel, "cs => cs.map(c => [c.children[0].textContent, Number(c.children[1].textContent.replace(/,/g, ''))])"))
    assert chips("#profiles .chip") == {**expected["profiles"], XSS: 1}
    assert chips("#versions .chip") == expected["versions"]
    assert page.text_content("#shown") == f"{KNOWN:,} devices"
    assert 10 <= page.locator(ROWS).count() <= 100
    assert page.locator("#events li").count() == 200
    assert "live" in page.text_content("#live")


def test_search_filters_sort_and_scroll(world, page):
    open_page(page, world.url)
    page.fill("#search", "sim-0123")
    expect(page.locator(ROWS)).to_have_count(1)
    assert row_ids(page) == ["sim-0123"]
    page.fill("#search", "")
    page.click(".qf[data-filter=failed]")
    failed = world.fleet.truth()["failed"] + 1
    expect(page.locator("#shown")).to_have_text(f"{failed:,} of {KNOWN:,} devices")
    assert all("failed" in c for c in page.eval_on_selector_all(ROWS, "trs => trs.map(t => t.className)"))
    page.click(".qf[data-filter=all]")
    page.click("th[data-key=id] button")  # already sorted by id: now descending
    expect(page.locator(ROWS).first).to_have_attribute("data-id", "sim-0999")
    top = row_ids(page)
    page.eval_on_selector("#table-wrap", "w => { w.scrollTop = w.scrollHeight / 2; }")
    expect(page.locator(ROWS).first).not_to_have_attribute("data-id", top[0])
    assert page.locator(ROWS).count() <= 100
    assert not set(row_ids(page)) & set(top[:5])


def test_a_device_going_offline_and_an_event_show_live(world, page):
    open_page(page, world.url)
    page.evaluate("window.sameDocument = true")
    page.click(".qf[data-filter=offline]")
    before = int(page.text_content("#n-offline").replace(",", ""))
    assert "sim-0042" not in row_ids(page)
    world.fleet.set_offline("sim-0042")
    try:
        expect(page.locator(f'{ROWS}[data-id="sim-0042"]')).to_be_visible(timeout=10000)
        expect(page.locator("#n-offline")).to_have_text(f"{before + 1:,}")
    finally:
        world.fleet.set_online("sim-0042")
    expect(page.locator(f'{ROWS}[data-id="sim-0042"]')).to_have_count(0, timeout=10000)

    world.fleet.event("sim-0100", Event(MODEL, 3, "failed", "sha256 mismatch in chunk 7"))
    newest = page.locator("#events li").first
    expect(newest).to_contain_text("sim-0100", timeout=10000)
    expect(newest).to_contain_text("sha256 mismatch in chunk 7")
    expect(newest).to_have_class(re.compile(r"\bev-failed\b"))
    assert page.locator("#events li").count() == 200
    assert page.evaluate("window.sameDocument") is True  # no reload


def test_text_from_devices_is_never_markup(world, page):
    now = time.time()
    u = UpdateInfo(MODEL, 3, "failed", None, "warm-up failed", XSS, now)
    world.fleet.publish(world.fleet.topics.status("sim-0007"), Status(
        device="sim-0007", fleet=world.fleet.name, session=1, profile="raspberry-pi-4", tags={"site": XSS},
        models=(ModelInfo(MODEL, 2, XSS, "onnxruntime"),), update=u, updates={MODEL: u}).to_payload(), retain=True)
    world.fleet.event("sim-0007", Event(MODEL, 3, "failed", XSS))
    open_page(page, world.url)
    page.fill("#search", "onerror")
    expect(page.locator(ROWS)).to_have_count(2, timeout=10000)  # the registry's device and sim-0007
    assert page.text_content(f'{ROWS}[data-id="{XSS}"] td.id') == XSS
    assert XSS in page.text_content(f'{ROWS}[data-id="sim-0007"] td.upd')
    expect(page.locator("#events li").first).to_contain_text(XSS)
    assert XSS in [c.text_content() for c in page.locator("#profiles .chip span").all()]
    assert page.evaluate("document.querySelectorAll('img, script:not([src])').length") == 0
    assert not page.dialogs


def test_a_token_guards_the_api_and_the_page_asks_for_it(world, page):
    with httpx.Client(base_url=world.token_url, timeout=10) as c:
        res = c.get("/api/fleet")
        assert res.status_code == 401 and res.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/api/fleet", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/stream").status_code == 401
        assert c.post("/api/rollouts/1/abort", headers=ACTION).status_code == 401
        assert c.get("/api/fleet", headers={"Authorization": f"Bearer {TOKEN}"}).json()["fleet"] == world.fleet.name
        assert c.get("/api/fleet", headers={"Host": "dashboard.example"}).status_code == 401  # any Host, token first

    page.goto(world.token_url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-token", "wrong")
    page.press("#login-token", "Enter")
    expect(page.locator("#login-error")).to_be_visible()
    page.fill("#login-token", TOKEN)
    page.press("#login-token", "Enter")
    page.wait_for_selector("html[data-ready='1']", timeout=15000)
    expect(page.locator("#live")).to_contain_text("live")
    assert int(page.text_content("#n-known").replace(",", "")) == KNOWN

    other = page.context.new_page()  # a new tab: sessionStorage is per tab
    open_page(other, world.token_url + f"?token={TOKEN}#f=online")
    assert "token" not in other.url and other.url.endswith("#f=online")
    assert other.evaluate("sessionStorage.getItem('edgerun-hub-token')") == TOKEN
    expect(other.locator(".qf[data-filter=online]")).to_have_attribute("aria-pressed", "true")


def test_a_rollout_shows_its_stages_and_abort_asks_first(world, page):
    reg, fleet = world.fleet.registry, world.fleet.name
    names = [f"sim-{i:04d}" for i in range(900, 906)]
    r = reg.create_rollout(fleet, MODEL, 3, "ab" * 32, selector=["devices=sim-090*"],
                           plan={"canary": 1, "step": "5", "bake": 60.0, "max_failures": "50%", "timeout": 600.0},
                           fleet_wide=False, targets=[(n, 0 if i == 0 else 1, 2, "") for i, n in enumerate(names)],
                           runner="test-runner")
    try:
        reg.set_rollout_devices(r.id, [(names[0], {"state": "active"}), (names[1], {"state": "active"}),
                                       (names[2], {"state": "failed"}), (names[3], {"state": "updating"})])
        reg.update_rollout(r.id, stage=1)
        open_page(page, world.url)
        card = page.locator(f'.rollout[data-id="{r.id}"]')
        expect(card).to_be_visible(timeout=5000)
        expect(card.locator(".stage")).to_have_count(2)
        expect(card.locator(".stage.current")).to_have_attribute("data-stage", "1")
        segments = dict(card.locator(".stage[data-stage='1'] .seg").evaluate_all(
            "ss => ss.map(s => [s.className.replace('seg seg-', ''), Number(s.dataset.count)])"))
        assert segments == {"active": 1, "failed": 1, "updating": 1, "pending": 2}
        assert card.locator(".stage[data-stage='0'] .seg-active").count() == 1

        card.locator("button[data-action=abort]").click()  # the page's handler dismisses the confirmation
        assert page.dialogs and page.dialogs[-1].startswith(f"Abort rollout #{r.id}")
        time.sleep(0.3)
        assert reg.rollout(r.id).request is None

        page.remove_listener("dialog", page.on_dialog)
        page.once("dialog", lambda d: d.accept())
        card.locator("button[data-action=abort]").click()
        wait_for(lambda: reg.rollout(r.id).request == "abort", 5, "the abort request in the registry")
        expect(card).to_contain_text("abort requested", timeout=5000)
        expect(card.locator("button[data-action=abort]")).to_be_disabled()

        card.locator(".btn-link").click()  # details: GET /api/rollouts/{id}
        dialog = page.locator("#rollout-dialog")
        expect(dialog.locator(".mini tr")).to_have_count(1 + len(names))
        expect(dialog.locator(".log")).to_contain_text("abort asked by hand")
    finally:
        reg.update_rollout(r.id, state="aborted", request=None, finished_at=time.time())


def test_the_page_reconnects_when_the_hub_restarts(world, page):
    from edgerun.hub.dashboard.app import make_app
    from edgerun.hub.dashboard.server import ServerThread

    f = world.fleet
    port = free_port()
    server = ServerThread(make_app(f.registry, f.watch, f.name), port=port).start()
    try:
        open_page(page, server.url)
        live = page.locator("#live")
        expect(live).to_have_class(re.compile(r"\blive-on\b"))
        server.stop()
        expect(live).to_have_class(re.compile(r"\blive-down\b"), timeout=10000)
        server = ServerThread(make_app(f.registry, f.watch, f.name), port=port).start()
        expect(live).to_have_class(re.compile(r"\blive-on\b"), timeout=15000)
        f.event("sim-0321", Event(MODEL, 4, "rejected", "downgrade refused after the restart"))
        expect(page.locator("#events li").first).to_contain_text("sim-0321", timeout=10000)
        assert int(page.text_content("#n-known").replace(",", "")) == KNOWN
    finally:
        server.stop()


def test_cli_refuses_an_open_address_without_a_token_and_stops_on_sigterm(world, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "EDGERUN_HUB_TOKEN"}, "EDGERUN_LOG_LEVEL": "INFO"}
    cli = [sys.executable, "-c", "import sys; from edgerun.cli import main; sys.exit(main())", "hub", "dashboard"]
    refused = subprocess.run([*cli, "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 78 and "without a token" in refused.stderr

    fleet = f"c{uuid.uuid4().hex[:8]}"  # its own fleet: the dashboard's MQTT client id is per fleet
    topics = type(world.fleet.topics)(fleet)
    for i in range(3):
        world.fleet.publish(topics.state(f"dev-{i}"), State(True, 1).to_payload(), retain=True)
        world.fleet.publish(topics.status(f"dev-{i}"), Status(f"dev-{i}", fleet, 1, "generic-x86_64").to_payload(),
                            retain=True)
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    token_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen([*cli, "--fleet", fleet, "--broker-port", str(world.fleet.broker.port),
                             "--db", f"sqlite:///{tmp_path / 'cli.db'}", "--port", str(port), "--token-file",
                             str(token_file)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_for(healthy, 30, "the dashboard to answer")
        assert proc.poll() is None
        assert httpx.get(url + "/api/fleet").status_code == 401
        snap = httpx.get(url + "/api/fleet", headers={"Authorization": "Bearer cli-token"}).json()
        assert sorted(d["id"] for d in snap["devices"]) == ["dev-0", "dev-1", "dev-2"]
        with httpx.stream("GET", url + "/api/stream", headers={"Authorization": "Bearer cli-token"}) as stream:
            assert next(stream.iter_lines()).startswith("event: hello")
            proc.send_signal(signal.SIGTERM)  # with a stream open
            assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = proc.stderr.read()
    assert f"dashboard of fleet '{fleet}' on {url}/" in logged and "cli-token" not in logged
    assert "dashboard stopped" in logged


def _titles(card) -> dict[str, str]:
    """Each stage bar's counts as the page shows them (its title), by stage."""
    return dict(card.locator(".stage").evaluate_all("ss => ss.map(s => [s.dataset.stage, s.title])"))


def test_pause_and_resume_reach_a_running_rollout_whose_stages_move_on_the_open_page(world, page, screenshots):
    from edgerun.hub.publish import build_manifest
    from edgerun.hub.rollout import Plan, RolloutRunner, start_rollout
    from edgerun.manifest import sign
    from edgerun.testing.models import tiny_package

    f = world.fleet
    signed = sign(build_manifest(tiny_package(f.workdir / "pkg-5", 5, MODEL)), f.key, "hub-test")
    f.registry.record_release(f.name, signed, source="upload")
    plan = Plan.parse(canary=5, step="50%", bake="3s", max_failures="50%", timeout="60s")
    rid = start_rollout(f.registry, f.watch, f.key, "hub-test", MODEL, 5, selector=["devices=sim-05*"], plan=plan,
                        runner="dashboard-test:1").rollout.id
    runner = RolloutRunner(f.registry, f.watch, rid, runner="dashboard-test:1", tick=0.1)
    thread = threading.Thread(target=runner.run, daemon=True)
    open_page(page, world.url)
    page.evaluate("window.sameDocument = true")
    card = page.locator(f'.rollout[data-id="{rid}"]')
    expect(card).to_be_visible(timeout=10000)
    assert _titles(card) == {"0": "canary: 5 pending", "1": "stage 2: 50 pending", "2": "stage 3: 45 pending"}
    thread.start()
    try:
        card.locator("button[data-action=pause]").click()  # no confirmation for a pause
        wait_for(lambda: f.registry.rollout(rid).state == "paused", 10, "the runner to pause the rollout")
        expect(card.locator(".badge")).to_have_text("paused", timeout=5000)
        expect(card.locator("button[data-action=resume]")).to_be_enabled()
        expect(card.locator("button[data-action=pause]")).to_be_disabled()
        # the canary, updating when the pause came, finishes; its bar fills on the page as it does
        expect(card.locator(".stage[data-stage='0']")).to_have_attribute(
            "title", re.compile(r"^canary: (\d+ active|\d+ active, \d+ failed|\d+ failed)$"), timeout=15000)
        time.sleep(plan.bake + 1.5)  # longer than the bake: a running rollout would have started stage 2
        assert f.registry.rollout(rid).stage == 0
        assert _titles(card)["1"] == "stage 2: 50 pending"
        page.screenshot(path=str(screenshots / "dashboard-rollout-paused.png"))

        card.locator("button[data-action=resume]").click()
        wait_for(lambda: f.registry.rollout(rid).state == "running", 10, "the runner to resume the rollout")
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and f.registry.rollout(rid).in_progress:
            titles = _titles(card) if card.count() else {}
            if titles.get("1") and (not seen or seen[-1] != titles["1"]):
                seen.append(titles["1"])
            time.sleep(0.1)
        thread.join(30)
        assert f.registry.rollout(rid).state == "succeeded"
        assert seen[0] == "stage 2: 50 pending" and len(seen) >= 2, seen  # the counts moved on the open page
        assert "pending" not in seen[-1], seen
        expect(card).to_have_count(0, timeout=10000)  # over: from the rollouts in progress to the past ones
        expect(page.locator("#past-list")).to_contain_text(f"#{rid} {MODEL} v5")
        assert page.evaluate("window.sameDocument") is True  # all of it live, no reload
    finally:
        runner.stop()
        thread.join(30)
        if f.registry.rollout(rid).in_progress:
            f.registry.update_rollout(rid, state="aborted", request=None, finished_at=time.time())
