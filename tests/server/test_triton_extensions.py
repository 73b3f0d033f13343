"""Triton's extensions as its own client sees them: model configuration, statistics, model repository control."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from edgerun.testing.models import make_digits_package
from edgerun.testing.serving import TOKEN, ServerProcess

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def auth() -> dict[str, str]:
    """A fresh header dict: tritonclient adds its own headers to the dict it is given."""
    return dict(AUTH)


def digits_input(rows: int = 1) -> th.InferInput:
    x = th.InferInput("input", [rows, 64], "FP32")
    x.set_data_from_numpy(np.random.default_rng(rows).random((rows, 64), dtype=np.float32), binary_data=True)
    return x


def test_model_config_describes_inputs_outputs_and_batching(triton):
    cfg = triton.get_model_config("digits")  # the highest version: v2, default batching
    assert cfg["name"] == "digits" and cfg["platform"].endswith("_onnx") and cfg["max_batch_size"] == 32
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64], "format": "FORMAT_NONE"}]
    assert cfg["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    v1 = triton.get_model_config("digits", "1")  # its own [[models]] entry: 16 rows, 2 ms
    assert v1["max_batch_size"] == 16 and v1["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert v1["parameters"]["variant"] == {"string_value": "onnx-fp32"}


def test_model_config_of_a_model_without_a_batch_dimension(triton):
    cfg = triton.get_model_config("fixed")
    assert cfg["max_batch_size"] == 0 and "dynamic_batching" not in cfg
    assert cfg["input"][0]["dims"] == [1, 64] and cfg["output"][0]["dims"] == [1, 10]


def test_model_config_of_an_unknown_model_or_version_is_404(http):
    assert http.get("/v2/models/nope/config").status_code == 404
    r = http.get("/v2/models/digits/versions/7/config")
    assert r.status_code == 404 and "no version 7" in r.json()["error"]


def stats_of(triton, model: str, version: str = "") -> dict:
    (s,) = triton.get_inference_statistics(model, version)["model_stats"]
    return s


def test_statistics_count_requests_rows_runs_and_failures(triton, http):
    before = stats_of(triton, "digits", "2")
    for rows in (1, 3, 2):
        triton.infer("digits", [digits_input(rows)], model_version="2")
    bad = {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}
    assert http.post("/v2/models/digits/versions/2/infer", json=bad).status_code == 400
    after = stats_of(triton, "digits", "2")
    assert (after["name"], after["version"]) == ("digits", "2")
    assert after["inference_count"] - before["inference_count"] == 6  # rows, as Triton counts them
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert s1["success"]["count"] - s0["success"]["count"] == 3
    assert s1["fail"]["count"] - s0["fail"]["count"] == 1
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert s1[key]["count"] - s0[key]["count"] == 3 and s1[key]["ns"] > s0[key]["ns"], key
    assert after["last_inference"] >= max(before["last_inference"], 1)
    sizes = {b["batch_size"] for b in after["batch_stats"]}
    assert sizes & {1, 2, 3, 5, 6}, after["batch_stats"]


def test_an_unknown_output_is_refused_before_the_model_runs(triton, http):
    before = stats_of(triton, "digits", "2")
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}],
            "outputs": [{"name": "logits"}]}
    r = http.post("/v2/models/digits/versions/2/infer", json=body)
    assert r.status_code == 400 and "has no output 'logits'" in r.json()["error"]
    after = stats_of(triton, "digits", "2")
    assert after["execution_count"] == before["execution_count"], "the model ran for a request it then refused"


def test_statistics_of_every_model_and_of_an_unknown_one(http):
    names = {(s["name"], s["version"]) for s in http.get("/v2/models/stats").json()["model_stats"]}
    assert {("digits", "1"), ("digits", "2"), ("echo", "1"), ("fixed", "1")} <= names
    assert {s["version"] for s in http.get("/v2/models/digits/stats").json()["model_stats"]} == {"1", "2"}
    assert http.get("/v2/models/nope/stats").status_code == 404
    assert http.get("/v2/models/digits/versions/9/stats").status_code == 404


def test_server_metadata_lists_the_extensions(http):
    ext = http.get("/v2").json()["extensions"]
    assert {"model_configuration", "statistics", "model_repository", "binary_tensor_data"} <= set(ext)


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory, digits_package):
    """A server with a token and a model repository holding two packages and a broken one; digits from the config."""
    d = tmp_path_factory.mktemp("repo")
    repo = d / "models"
    make_digits_package(repo / "mnist", name="mnist", int8=False)
    make_digits_package(repo / "broken", name="broken", int8=False)
    make_digits_package(repo / "digits", int8=False)  # the name of a model the configuration serves
    (repo / "broken" / "model.fp32.onnx").write_bytes(b"not an onnx model")
    shutil.copy(digits_package.path_of(digits_package.variant("onnx-fp32").main_file), repo / "plain.onnx")
    (d / "token").write_text(TOKEN)
    cfg = d / "edgerun.toml"
    cfg.write_text(f'[server]\nrepository_dir = "{repo}"\ntoken_file = "{d / "token"}"\n\n'
                   f'[[models]]\npath = "{digits_package.root}"\n')
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    proc.repo = repo
    yield proc
    assert proc.stop() == 0, proc.output()


def test_repository_load_serve_and_unload(repo_server):
    c = th.InferenceServerClient(repo_server.url.removeprefix("http://"))
    try:
        index = {m["name"]: m for m in c.get_model_repository_index(headers=auth())}
        assert index["digits"]["state"] == "READY" and index["digits"]["version"] == "1"
        assert index["mnist"]["state"] == "UNAVAILABLE" and index["plain"]["state"] == "UNAVAILABLE"
        assert not c.is_model_ready("mnist", headers=auth())
        c.load_model("mnist", headers=auth())
        assert c.is_model_ready("mnist", headers=auth())
        out = c.infer("mnist", [digits_input(2)], headers=auth()).as_numpy("probabilities")
        assert out.shape == (2, 10) and np.allclose(out.sum(axis=1), 1, atol=1e-4)
        c.load_model("plain", headers=auth())  # a bare model file in the repository
        assert c.get_model_metadata("plain", headers=auth())["inputs"][0]["name"] == "input"
        c.unload_model("mnist", headers=auth())
        assert not c.is_model_ready("mnist", headers=auth())
        with pytest.raises(InferenceServerException, match="unknown model 'mnist'"):
            c.infer("mnist", [digits_input()], headers=auth())
        assert {m["name"]: m["state"] for m in c.get_model_repository_index(headers=auth())}["mnist"] == "UNAVAILABLE"
    finally:
        c.close()


@pytest.mark.parametrize("path,status,message", [
    ("/v2/repository/models/nope/load", 404, "no model 'nope' in the repository"),
    ("/v2/repository/models/%2E%2E/load", 404, "a model name is letters"),
    ("/v2/repository/models/broken/load", 400, "model.fp32.onnx: size 17 bytes, expected"),
    ("/v2/repository/models/digits/load", 403, "not from the model repository"),
    ("/v2/repository/models/digits/unload", 403, "not from the model repository"),
    ("/v2/repository/models/mnist/unload", 404, "not loaded"),
])
def test_repository_refusals_are_clear_and_the_server_keeps_serving(repo_server, path, status, message):
    r = httpx.post(repo_server.url + path, headers=auth(), timeout=60)
    assert r.status_code == status and message in r.json()["error"], r.text
    x = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    assert httpx.post(repo_server.url + "/v2/models/digits/infer", json=x, headers=auth()).status_code == 200


def test_repository_load_refuses_parameters_and_needs_the_token(repo_server):
    r = httpx.post(repo_server.url + "/v2/repository/models/mnist/load", headers=auth(),
                   json={"parameters": {"config": "{}"}})
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    assert httpx.post(repo_server.url + "/v2/repository/models/mnist/load").status_code == 401


def test_repository_control_is_refused_without_a_token(server, http):
    r = http.post("/v2/repository/models/digits/load")
    assert r.status_code == 403 and "admin action" in r.json()["error"]
    assert http.post("/v2/repository/models/digits/unload").status_code == 403
    assert http.get("/v2/models/digits/ready").status_code == 200
