"""The KServe v2 API as tritonclient.http and plain HTTP see it: metadata, readiness, infer, versions, batching."""

from __future__ import annotations

import concurrent.futures as cf
import re

import numpy as np
import orjson
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from edgerun.testing.serving import ALL_DATATYPES, echo_request, reference


def test_health_and_server_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "edgerun"
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_repository" in meta["extensions"]


def test_model_metadata_and_ready(triton):
    meta = triton.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["platform"].endswith("_onnx")
    assert triton.get_model_metadata("digits", "1")["parameters"]["variant"] == "onnx-fp32"
    assert triton.is_model_ready("digits")
    assert triton.is_model_ready("digits", "2")
    assert not triton.is_model_ready("digits", "3")
    assert not triton.is_model_ready("nosuchmodel")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_onnxruntime(triton, packages, binary):
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    inp = th.InferInput("input", [5, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = th.InferRequestedOutput("probabilities", binary_data=binary)
    r = triton.infer("digits", [inp], model_version="1", outputs=[out], request_id="req-7")
    got = r.as_numpy("probabilities")
    np.testing.assert_allclose(got, reference(packages["digits"], x), rtol=1e-5, atol=1e-6)
    resp = r.get_response()
    assert resp["model_name"] == "digits" and resp["model_version"] == "1" and resp["id"] == "req-7"
    # no outputs listed: tritonclient asks for binary outputs of all of them
    got_all = triton.infer("digits", [inp], model_version="1").as_numpy("probabilities")
    np.testing.assert_allclose(got_all, got, rtol=1e-6)


def _echo_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for dt in ALL_DATATYPES:
        if dt == "BOOL":
            a = rng.random((2, 3)) > 0.5
        elif dt == "BYTES":
            a = np.array([["a", "héllo", ""], ["x" * 300, "\u2603", "tail"]], dtype=object)
        elif dt.startswith("FP"):
            a = (rng.standard_normal((2, 3)) * 100).astype({"FP16": np.float16, "FP32": np.float32,
                                                             "FP64": np.float64}[dt])
        else:
            info = np.iinfo(th.triton_to_np_dtype(dt))
            a = rng.integers(info.min, info.max, (2, 3), dtype=th.triton_to_np_dtype(dt), endpoint=True)
        arrays[dt] = a
    return arrays


@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips(triton, binary):
    arrays = _echo_inputs(np.random.default_rng(1))
    inputs, outputs = [], []
    for dt, a in arrays.items():
        i = th.InferInput(f"in_{dt}", list(a.shape), dt)
        i.set_data_from_numpy(a, binary_data=binary)
        inputs.append(i)
        outputs.append(th.InferRequestedOutput(f"out_{dt}", binary_data=binary))
    r = triton.infer("echo", inputs, outputs=outputs)
    for dt, a in arrays.items():
        got = r.as_numpy(f"out_{dt}")
        assert got.shape == a.shape, dt
        if dt == "BYTES":
            assert [x.decode() if isinstance(x, bytes) else x for x in got.ravel()] == list(a.ravel())
        elif dt.startswith("FP") and not binary:
            np.testing.assert_allclose(got.astype(np.float64), a.astype(np.float64), rtol=1e-6)
        else:
            assert got.dtype == a.dtype, dt
            np.testing.assert_array_equal(got, a)


def test_fp16_binary_is_bit_exact(triton):
    a = np.array([[65504.0, -0.0, 1e-7, np.inf, -np.inf, 3.140625]], dtype=np.float16)
    arrays = _echo_inputs(np.random.default_rng(2))
    inputs = []
    for dt, arr in arrays.items():
        arr = a if dt == "FP16" else arr[:1, :6] if dt != "BYTES" else np.array([["a"] * 6], dtype=object)
        if dt not in ("FP16", "BYTES"):
            arr = np.resize(arr, (1, 6))
        i = th.InferInput(f"in_{dt}", [1, 6], dt)
        i.set_data_from_numpy(arr, binary_data=True)
        inputs.append(i)
    got = triton.infer("echo", inputs).as_numpy("out_FP16")
    assert got.dtype == np.float16
    assert got.tobytes() == a.tobytes()


def test_each_version_is_scheduled_with_its_own_config_entry(http):
    """Two [[models]] entries hold digits v1 (max_batch_size 16) and v2 (defaults); neither takes the other's."""
    v1 = http.get("/v2/models/digits/versions/1").json()["parameters"]
    v2 = http.get("/v2/models/digits/versions/2").json()["parameters"]
    assert (v1["batching"], v1["max_batch_size"]) == (True, 16)
    assert (v2["batching"], v2["max_batch_size"]) == (True, 32)
    fixed = http.get("/v2/models/fixed").json()["parameters"]
    assert (fixed["max_inflight"], fixed["max_queue"]) == (1, 2)


def test_versions_are_served_side_by_side(triton, http):
    x = np.zeros((1, 64), np.float32)
    for v in ("1", "2"):
        i = th.InferInput("input", [1, 64], "FP32")
        i.set_data_from_numpy(x)
        r = triton.infer("digits", [i], model_version=v)
        assert r.get_response()["model_version"] == v
    latest = http.post("/v2/models/digits/infer", json={"inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    assert latest.json()["model_version"] == "2"
    with pytest.raises(InferenceServerException, match="no version 9"):
        triton.infer("digits", [i], model_version="9")


def test_repository_index_lists_models_and_state(triton):
    index = triton.get_model_repository_index()
    got = {(m["name"], m["version"], m["state"]) for m in index}
    assert got == {("digits", "1", "READY"), ("digits", "2", "READY"), ("echo", "1", "READY"),
                   ("fixed", "1", "READY")}


def _metric(text: str, name: str, labels: str, default: float | None = None) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    if m is None and default is not None:
        return default
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def test_concurrent_requests_are_batched_and_split_back(http, packages):
    before = http.get("/metrics").text
    runs0 = _metric(before, "edgerun_batch_size_count", 'model="digits"')
    rows0 = _metric(before, "edgerun_batch_size_sum", 'model="digits"')
    capped0 = _metric(before, "edgerun_batch_size_bucket", 'le="16.0",model="digits"')
    rng = np.random.default_rng(3)
    xs = [rng.random((1 + i % 3, 64), dtype=np.float32) for i in range(96)]

    def call(x):
        import httpx

        with httpx.Client(base_url=str(http.base_url), timeout=30) as c:
            r = c.post("/v2/models/digits/versions/1/infer",
                       json={"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                         "data": x.ravel().tolist()}]})
            assert r.status_code == 200, r.text
            out = r.json()["outputs"][0]
            return np.array(out["data"], np.float32).reshape(out["shape"])

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, xs))
    for x, got in zip(xs, results):
        np.testing.assert_allclose(got, reference(packages["digits"], x), rtol=1e-5, atol=1e-6)
    after = http.get("/metrics").text
    runs = _metric(after, "edgerun_batch_size_count", 'model="digits"') - runs0
    rows = _metric(after, "edgerun_batch_size_sum", 'model="digits"') - rows0
    assert rows == sum(len(x) for x in xs)
    assert runs < len(xs), f"{len(xs)} concurrent requests ran as {runs} separate runs: nothing was batched"
    # the histogram is per model name, and digits v2 (max_batch_size 32) may have run bigger batches earlier
    capped = _metric(after, "edgerun_batch_size_bucket", 'le="16.0",model="digits"') - capped0
    assert capped == runs, "a run of version 1 exceeded its max_batch_size 16"


def test_batching_is_off_without_a_batch_dimension(server, http):
    import httpx

    assert http.get("/v2/models/fixed").json()["parameters"]["batching"] is False
    assert http.get("/v2/models/digits").json()["parameters"]["batching"] is True
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}

    def call(_):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/v2/models/fixed/infer", json=body).status_code

    before = http.get("/metrics").text
    with cf.ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(call, range(24))).count(200)
    after = http.get("/metrics").text
    runs = (_metric(after, "edgerun_batch_size_count", 'model="fixed"')
            - _metric(before, "edgerun_batch_size_count", 'model="fixed"', default=0))
    assert ok and runs == ok, f"{ok} requests to a model without a batch dimension ran as {runs} runs"
    assert _metric(after, "edgerun_batch_size_bucket", 'le="1.0",model="fixed"') == _metric(
        after, "edgerun_batch_size_count", 'model="fixed"')


def test_output_selection_and_binary_per_output(http):
    raw = http.post("/v2/models/echo/infer", json={**echo_request(in_FP32={"data": [2.5]}), "outputs": [
        {"name": "out_INT32"}, {"name": "out_FP32", "parameters": {"binary_data": True}}]})
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "application/octet-stream"
    n = int(raw.headers["inference-header-content-length"])
    doc = orjson.loads(raw.content[:n])
    assert "id" not in doc and doc["model_version"] == "1"
    assert doc["outputs"] == [
        {"name": "out_INT32", "datatype": "INT32", "shape": [1, 1], "data": [1]},
        {"name": "out_FP32", "datatype": "FP32", "shape": [1, 1], "parameters": {"binary_data_size": 4}}]
    assert np.frombuffer(raw.content[n:], "<f4").tolist() == [2.5]
    everything = http.post("/v2/models/echo/infer", json={**echo_request(), "outputs": []}).json()
    assert [o["name"] for o in everything["outputs"]] == [f"out_{dt}" for dt in ALL_DATATYPES]
    assert all("data" in o for o in everything["outputs"])


@pytest.mark.parametrize("binary", [True, False])
def test_nan_and_infinity_survive_json_and_binary(triton, binary):
    special = [np.nan, np.inf, -np.inf, 1.5]
    doc = echo_request(**{f"in_{dt}": {"shape": [1, 4], "data": [1] * 4 if dt != "BYTES" else ["a"] * 4}
                          for dt in ALL_DATATYPES})
    inputs = []
    for t in doc["inputs"]:
        dt = t["datatype"]
        arr = np.array([special if dt.startswith("FP") else t["data"]], dtype=th.triton_to_np_dtype(dt))
        if dt == "BOOL":
            arr = np.ones((1, 4), bool)
        i = th.InferInput(t["name"], [1, 4], dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    outputs = [th.InferRequestedOutput(f"out_{dt}", binary_data=binary) for dt in ("FP16", "FP32", "FP64")]
    r = triton.infer("echo", inputs, outputs=outputs)
    for dt in ("FP16", "FP32", "FP64"):
        np.testing.assert_array_equal(r.as_numpy(f"out_{dt}").astype(np.float64), [special])


def test_full_queue_answers_503_and_server_keeps_serving(server, http):
    import httpx

    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}

    def call(_):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/v2/models/fixed/infer", json=body)

    with cf.ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(call, range(192)))
    codes = {r.status_code for r in responses}
    assert codes <= {200, 503}, codes
    assert 503 in codes, "192 concurrent requests never overflowed a queue of 2"
    busy = next(r for r in responses if r.status_code == 503)
    assert "queue is full" in busy.json()["error"]
    assert http.post("/v2/models/fixed/infer", json=body).status_code == 200


def test_metrics_report_requests_failures_and_models(http):
    http.post("/v2/models/digits/infer", json={"inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    http.post("/v2/models/digits/infer", content=b"{not json")
    text = http.get("/metrics").text
    assert _metric(text, "edgerun_requests_total", 'model="digits"') >= 1
    assert _metric(text, "edgerun_request_failures_total", 'model="digits",reason="bad_request"') >= 1
    assert _metric(text, "edgerun_request_duration_seconds_count", 'model="digits"') >= 1
    assert _metric(text, "edgerun_queue_duration_seconds_count", 'model="digits"') >= 1
    assert _metric(text, "edgerun_compute_duration_seconds_count", 'model="digits"') >= 1
    assert re.search(r'^edgerun_model_loaded\{backend="\w+",device="\w+",model="digits",variant="onnx-fp32",version="1"\} 1\.0$', text,
                     re.M), text
    assert re.search(r'^edgerun_model_memory_bytes\{backend="onnxruntime",device="\w+",model="echo",.*\} \d', text, re.M)
