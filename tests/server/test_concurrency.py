"""Inference off the event loop, the per-model in-flight limit, the bounded queue's 503, batching knobs, env token."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import re
import threading
import time

import httpx
import numpy as np
import pytest

from edgerun.testing.serving import ServerProcess, make_slow_package

ENV_TOKEN = "token-from-the-environment"
AUTH = {"authorization": f"Bearer {ENV_TOKEN}"}


def _slow_body(rounds: int, rows: int = 1) -> dict:
    return {"inputs": [{"name": "x", "shape": [rows, 1], "datatype": "FP32", "data": [float(rounds)] * rows}]}


@pytest.fixture(scope="module")
def slow_package(tmp_path_factory):
    return make_slow_package(tmp_path_factory.mktemp("slow") / "slow")


@pytest.fixture(scope="module")
def slow_server(slow_package, tmp_path_factory):
    """The slow model with one run at a time and one waiting request; the token comes from EDGERUN_API_TOKEN."""
    cfg = tmp_path_factory.mktemp("slow-config") / "edgerun.toml"
    cfg.write_text(f'[[models]]\npath = "{slow_package.root}"\nmax_inflight = 1\nmax_queue = 1\n')
    proc = ServerProcess(["--config", str(cfg)], env={"EDGERUN_API_TOKEN": ENV_TOKEN}).wait_ready()
    proc.rounds = _calibrate(proc.url)
    yield proc
    assert proc.stop() == 0, proc.output()


def _calibrate(url: str, probe: int = 300):
    """Seconds -> loop rounds of the slow model on this host (hosts differ 5x), timed through the server."""
    with httpx.Client(base_url=url, timeout=30) as c:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert c.post("/v2/models/slow/infer", json=_slow_body(probe), headers=AUTH).status_code == 200
            times.append(time.perf_counter() - t0)
    per_second = probe / min(times)
    return lambda seconds: max(1, round(seconds * per_second))


def _gauge(client: httpx.Client, name: str, labels: str = "", default: float | None = None) -> float:
    """A sample of the slow model from /metrics; ``labels`` further narrows it (e.g. 'reason="client_gone"')."""
    text = client.get("/metrics", headers=AUTH).text
    m = re.search(rf'^{name}\{{.*model="slow".*{labels}.*\}} (\S+)$', text, re.M)
    if m is None and default is not None:
        return default
    assert m, f"{name} for slow not in /metrics"
    return float(m.group(1))


def _wait_for(client: httpx.Client, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _gauge(client, name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.005)


def test_a_long_inference_does_not_block_the_event_loop(slow_server):
    with httpx.Client(base_url=slow_server.url, timeout=30) as c, cf.ThreadPoolExecutor(1) as pool:
        assert c.post("/v2/models/slow/infer", json=_slow_body(0), headers=AUTH).status_code == 200
        long_run = pool.submit(c.post, "/v2/models/slow/infer", json=_slow_body(slow_server.rounds(1.0)),
                               headers=AUTH)
        _wait_for(c, "edgerun_model_inflight", 1)
        latencies = []
        while not long_run.done():
            t0 = time.perf_counter()
            assert c.get("/v2/health/live").status_code == 200
            assert c.get("/v2/models/slow", headers=AUTH).status_code == 200
            latencies.append(time.perf_counter() - t0)
        assert long_run.result().status_code == 200
    assert len(latencies) >= 5, f"only {len(latencies)} probes fitted in a ~1 s inference"
    assert max(latencies) < 0.3, f"metadata took {max(latencies):.2f}s while a model ran: the loop was blocked"


def test_inflight_limit_and_full_queue_503(slow_server):
    url = slow_server.url
    seen_inflight = []
    stop = threading.Event()

    def watch():
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                seen_inflight.append(_gauge(c, "edgerun_model_inflight"))

    def post(rounds):
        with httpx.Client(base_url=url, timeout=30) as c:
            t0 = time.perf_counter()
            r = c.post("/v2/models/slow/infer", json=_slow_body(rounds), headers=AUTH)
            return r, time.perf_counter() - t0

    with httpx.Client(base_url=url, timeout=30) as c, cf.ThreadPoolExecutor(3) as pool:
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            first = pool.submit(post, slow_server.rounds(0.6))
            _wait_for(c, "edgerun_model_inflight", 1)
            second = pool.submit(post, 1)  # waits: max_inflight = 1
            _wait_for(c, "edgerun_model_queued", 1)
            assert not first.done()
            busy, _ = post(1)  # max_queue = 1: no room
            assert busy.status_code == 503, busy.text
            assert "queue is full" in busy.json()["error"] and busy.headers["retry-after"] == "1"
            (r1, t1), (r2, t2) = first.result(), second.result()
        finally:
            stop.set()
            watcher.join()
        assert r1.status_code == r2.status_code == 200
        assert r2.json()["outputs"][0]["data"] == [1.0]
        assert max(seen_inflight) == 1, f"runs in flight went above max_inflight = 1: {max(seen_inflight)}"
        assert t2 > 0.5 * t1, "the queued request did not wait for the run in flight"
        assert c.post("/v2/models/slow/infer", json=_slow_body(0), headers=AUTH).status_code == 200
        assert _gauge(c, "edgerun_model_queued") == 0


def test_a_queued_request_whose_client_went_away_is_not_run(slow_server):
    """A client that gives up while its request waits costs the server nothing: the run is dropped."""
    url = slow_server.url
    with httpx.Client(base_url=url, timeout=30) as c, cf.ThreadPoolExecutor(1) as pool:
        assert c.post("/v2/models/slow/infer", json=_slow_body(0), headers=AUTH).status_code == 200
        runs_before = _gauge(c, "edgerun_batch_size_count")
        gone_before = _gauge(c, "edgerun_request_failures_total", 'reason="client_gone"', default=0.0)
        first = pool.submit(c.post, "/v2/models/slow/infer", json=_slow_body(slow_server.rounds(1.5)),
                             headers=AUTH)
        _wait_for(c, "edgerun_model_inflight", 1)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the first run, then the client leaves
            httpx.post(url + "/v2/models/slow/infer", json=_slow_body(slow_server.rounds(1.0)), headers=AUTH,
                       timeout=httpx.Timeout(30, read=0.2))
        assert first.result().status_code == 200
        t0 = time.perf_counter()
        assert c.post("/v2/models/slow/infer", json=_slow_body(0), headers=AUTH).status_code == 200
        waited = time.perf_counter() - t0
        assert waited < 0.5, f"the next request waited {waited:.2f}s: the abandoned ~1 s run was executed"
        assert _gauge(c, "edgerun_batch_size_count") == runs_before + 2  # the first run and the last, only
        assert _gauge(c, "edgerun_request_failures_total", 'reason="client_gone"', default=0.0) == gone_before + 1


def test_token_from_the_environment(slow_server):
    url = slow_server.url
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    for path in ("/metrics", "/v2", "/v2/models/slow/ready"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers=AUTH).status_code == 200, path
        assert httpx.get(url + path, headers={"authorization": f"bearer {ENV_TOKEN}"}).status_code == 200, path
    assert httpx.post(url + "/v2/repository/index").status_code == 401
    assert httpx.post(url + "/v2/repository/index", headers=AUTH).json()[0]["name"] == "slow"


def test_batcher_respects_max_batch_size_and_max_queue_delay(slow_package):
    """In process: with a run in flight, six 1-row requests (max batch 4) run as 4 at once, then 2 after the delay."""
    from concurrent.futures import ThreadPoolExecutor

    from edgerun.runtime import Runtime
    from edgerun.serving.batching import ModelScheduler, Policy

    runs = []

    def observe(model, rows, merge, compute, split, waits):
        runs.append((rows, min(waits), time.perf_counter()))

    async def scenario(model, executor, rounds):
        sched = ModelScheduler(model, Policy(True, 4, 0.05, 2, 100), executor, observe)
        slow = sched.submit({"x": np.full((1, 1), rounds, np.float32)})
        await asyncio.sleep(0.02)
        xs = [np.full((1, 1), i / 10, np.float32) for i in range(6)]
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(sched.submit({"x": x}) for x in xs))
        assert not slow.done(), "the slow run ended too soon for this test to mean anything"
        await slow
        return xs, outs, t0

    with Runtime(threads=1) as rt, ThreadPoolExecutor(4) as executor:
        # onnxruntime runs two requests at once; OpenVINO's single latency stream would serialize them
        model = rt.load(slow_package, backend="onnxruntime")
        t = time.perf_counter()
        model.run({"x": np.full((1, 1), 200, np.float32)})
        rounds = round(200 * 0.5 / (time.perf_counter() - t))  # a ~0.5 s run on this host
        xs, outs, t0 = asyncio.run(scenario(model, executor, rounds))
    for x, (out, _, _) in zip(xs, outs):
        np.testing.assert_array_equal(out["y"], x)  # split back to the request it came from
    assert [r[0] for r in runs] == [4, 2, 1]
    (_, wait4, _), (_, wait2, _), _ = runs
    assert wait4 < 0.04, "a full batch waited for the queue delay"
    assert 0.045 <= wait2 < 0.4, f"the partial batch waited {wait2:.3f}s, not max_queue_delay (0.05s)"


def test_batcher_runs_alone_a_request_whose_inputs_disagree_on_rows(tmp_path):
    """In process: two echo requests queued together; the second's inputs have 1 and 2 rows, so it is not stacked."""
    from concurrent.futures import ThreadPoolExecutor

    from edgerun.runtime import Runtime
    from edgerun.serving.batching import ModelScheduler, Policy
    from edgerun.tensors import dtype_of
    from edgerun.testing.serving import ALL_DATATYPES, make_echo_package

    def request(rows_after_first: int, value: int) -> dict[str, np.ndarray]:
        return {f"in_{dt}": np.full((1 if i == 0 else rows_after_first, 2), str(value) if dt == "BYTES" else value,
                                    dtype=dtype_of(dt)) for i, dt in enumerate(ALL_DATATYPES)}

    reqs = [request(1, 1), request(2, 0)]
    runs = []

    async def scenario(model, executor):
        sched = ModelScheduler(model, Policy(True, 8, 0.01, 2, 100), executor, lambda *a: runs.append(a[1]))
        return await asyncio.gather(*(sched.submit(r) for r in reqs))

    with Runtime(threads=1) as rt, ThreadPoolExecutor(2) as executor:
        model = rt.load(make_echo_package(tmp_path / "echo"))
        outs = asyncio.run(scenario(model, executor))
    for req, (out, _, _) in zip(reqs, outs):
        for name, arr in req.items():
            np.testing.assert_array_equal(out[name.replace("in_", "out_")], arr)
    assert sorted(runs) == [1, 1], "the mismatched request was stacked with another"


@pytest.mark.parametrize("per_row", [False, True], ids=["a-batch-costs-its-slowest-row", "a-batch-costs-its-rows"])
def test_batching_is_on_by_default_only_where_it_saves_compute(tmp_path, per_row):
    """At load a model runs its warm-up sample alone and as a batch of 4: where the batch costs about what its rows
    cost alone, dynamic batching is off by default (it would only add copies and waits), unless configured on."""
    from edgerun.config import BatchingConfig, ModelConfig
    from edgerun.runtime import Runtime
    from edgerun.serving.batching import policy_for
    from edgerun.serving.modelconfig import model_config

    with Runtime(threads=1) as rt:
        probe = rt.load(make_slow_package(tmp_path / "probe", size=64), backend="onnxruntime")
        t = time.perf_counter()
        probe.run({"x": np.full((1, 1), 100, np.float32)})
        rounds = max(1, round(100 * 0.005 / (time.perf_counter() - t)))  # a ~5 ms run on this host
        model = rt.load(make_slow_package(tmp_path / "slow", size=64, per_row=per_row, sample_rounds=rounds),
                        backend="onnxruntime")
        policy = policy_for(model, None)
        forced = policy_for(model, ModelConfig(path=tmp_path / "slow", batching=BatchingConfig(enabled=True)))
        cfg = model_config(model, policy, False)
    if per_row:
        assert model.batch_cost > 0.8 and not model.batching_pays
        assert not policy.batching and "dynamic_batching" not in cfg
    else:
        assert model.batch_cost < 0.5 and model.batching_pays
        assert policy.batching and "dynamic_batching" in cfg
    assert forced.batching, "batching.enabled = true must turn batching on whatever was measured"


def test_short_runs_stay_on_the_event_loop_longer_when_the_server_has_one_cpu(tmp_path):
    """With one CPU a worker thread cannot run beside the event loop, so unless configured runs predicted shorter
    than 1 ms go on the loop (200 µs with more CPUs); a configured inline_below_us holds whatever the CPUs."""
    from edgerun.config import ModelConfig, parse_config
    from edgerun.runtime import Runtime
    from edgerun.serving.batching import policy_for

    with Runtime(threads=1) as rt:
        model = rt.load(make_slow_package(tmp_path / "slow"), backend="onnxruntime")
        assert policy_for(model, None, cpus=1).inline_below == pytest.approx(0.001)
        assert policy_for(model, None, cpus=4).inline_below == pytest.approx(0.0002)
        for configured in (0, 50, 5000):
            cfg = ModelConfig(path=tmp_path / "slow", inline_below_us=configured)
            assert policy_for(model, cfg, cpus=1).inline_below == pytest.approx(configured / 1e6)
    default, zero = (parse_config({"models": [{"path": str(tmp_path), **extra}]}).models[0]
                     for extra in ({}, {"inline_below_us": 0}))
    assert default.inline_below_us is None and zero.inline_below_us == 0
