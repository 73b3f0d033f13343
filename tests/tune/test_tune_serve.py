"""`edgerun serve` tunes a model beside serving it, swaps to the pick, and loads the pick from its cache at restart."""

from __future__ import annotations

import json
import time

import httpx

from edgerun.testing.serving import ServerProcess


def _infer(client: httpx.Client, x) -> httpx.Response:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return client.post("/v2/models/digits/infer", json=body)


def test_serve_tunes_beside_serving_swaps_to_the_pick_and_a_restart_uses_the_cache(checked_digits, tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f"""
[tuning]
budget = 4
defer_load = 0

[[models]]
path = "{checked_digits.root}"
""")
    env = {"EDGERUN_TUNING_MODE": "every"}
    cache = state / "tuning" / "digits.v1.json"
    x = checked_digits.validation.inputs["input"][:1]
    server = ServerProcess(["--config", str(cfg), "--state-dir", str(state)], env=env).wait_ready()
    try:
        statuses = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            deadline = time.monotonic() + 180
            while "now serves the tuned pick" not in server.output() and "tuned digits v1" not in server.output():
                assert time.monotonic() < deadline, server.output()
                statuses.append(_infer(client, x).status_code)
            for _ in range(50):  # through the swap, if there is one
                statuses.append(_infer(client, x).status_code)
            assert statuses and set(statuses) == {200}, "no request fails while tuning runs and swaps"
            chosen = json.loads(cache.read_text())["info"]["chosen"]
            deadline = time.monotonic() + 60
            while client.get("/v2/models/digits/config").json()["backend"] != chosen["backend"]:
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.2)
    finally:
        assert server.stop() == 0, server.output()
    tuned_at = cache.stat().st_mtime_ns

    again = ServerProcess(["--config", str(cfg), "--state-dir", str(state)], env=env).wait_ready()
    try:
        with httpx.Client(base_url=again.url, timeout=30) as client:
            assert client.get("/v2/models/digits/config").json()["backend"] == chosen["backend"]
            assert _infer(client, x).status_code == 200
        time.sleep(1)
        assert "tuning digits v1" not in again.output(), "the cache answered: nothing measured again"
        assert cache.stat().st_mtime_ns == tuned_at
    finally:
        assert again.stop() == 0, again.output()
