"""Scoped tokens over gRPC, as tritonclient.grpc sees them: each RPC needs the scope of its HTTP twin, refusals are
UNAUTHENTICATED or PERMISSION_DENIED with the HTTP API's message, and /metrics counts them with the HTTP ones."""

from __future__ import annotations

import queue

import httpx
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
tritongrpc = pytest.importorskip("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

import edgerun  # noqa: E402
from edgerun.errors import Forbidden, Unauthenticated  # noqa: E402
from edgerun.testing.models import make_digits_package  # noqa: E402
from edgerun.testing.serving import ServerProcess, create_token, free_port, make_echo_package, reference  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_package):
    d = tmp_path_factory.mktemp("grpc-access")
    echo = make_echo_package(d / "echo")
    make_digits_package(d / "models" / "mnist", name="mnist", int8=False)
    tokens = d / "tokens.toml"
    made = {"team-a": create_token(tokens, "team-a", "infer:digits"),
            "scraper": create_token(tokens, "scraper", "metrics"),
            "ops": create_token(tokens, "ops", "admin")}
    cfg = d / "edgerun.toml"
    cfg.write_text(f'[server]\ntokens_file = "{tokens}"\nrepository_dir = "{d / "models"}"\n'
                   f'\n[[models]]\npath = "{digits_package.root}"\nvariant = "onnx-fp32"\n'
                   f'\n[[models]]\npath = "{echo.root}"\nbackend = "onnxruntime"\n')
    port = free_port()
    proc = ServerProcess(["--config", str(cfg)], env={"EDGERUN_SERVER_GRPC_PORT": str(port)}).wait_ready()
    proc.grpc_port, proc.tokens = port, made
    yield proc
    assert proc.stop() == 0, proc.output()
    for token in made.values():
        assert token not in proc.output()


@pytest.fixture
def client(served):
    c = tritongrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    yield c
    c.close()


def auth(served, name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {served.tokens[name]}"}


def digits(rows: int = 1) -> tuple[np.ndarray, list]:
    x = np.random.default_rng(rows).random((rows, 64), dtype=np.float32)
    i = tritongrpc.InferInput("input", [rows, 64], "FP32")
    i.set_data_from_numpy(x)
    return x, [i]


def refused(call, code: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}", info.value.message()
    return info.value.message()


def test_a_model_token_runs_and_reads_its_model(served, client, digits_package):
    h = auth(served, "team-a")
    x, inputs = digits(3)
    out = client.infer("digits", inputs, headers=h).as_numpy("probabilities")
    np.testing.assert_allclose(out, reference(digits_package, x), rtol=1e-5, atol=1e-6)
    assert client.get_model_metadata("digits", headers=h, as_json=True)["name"] == "digits"
    assert client.get_model_config("digits", headers=h, as_json=True)["config"]["name"] == "digits"
    assert client.is_model_ready("digits", headers=h)
    assert client.get_inference_statistics("digits", headers=h, as_json=True)["model_stats"][0]["name"] == "digits"
    assert client.get_server_metadata(headers=h, as_json=True)["name"] == "edgerun"


def test_a_model_token_is_refused_the_rest(served, client):
    h = auth(served, "team-a")
    echo = tritongrpc.InferInput("in_FP32", [1, 1], "FP32")
    echo.set_data_from_numpy(np.ones((1, 1), np.float32))
    for call, what in [(lambda: client.infer("echo", [echo], headers=h), "may not run model 'echo'"),
                       (lambda: client.get_model_metadata("echo", headers=h), "may not read model 'echo'"),
                       (lambda: client.is_model_ready("echo", headers=h), "may not read model 'echo'"),
                       (lambda: client.get_inference_statistics(headers=h), "may not read every model"),
                       (lambda: client.get_model_repository_index(headers=h), "may not read every model"),
                       (lambda: client.load_model("mnist", headers=h), "may not control the model repository")]:
        message = refused(call, "PERMISSION_DENIED")
        assert "token 'team-a'" in message and what in message and "infer:digits" in message, message
    assert client.infer("digits", digits()[1], headers=h).as_numpy("probabilities").shape == (1, 10)


def test_wrong_or_missing_tokens_are_unauthenticated(served, client):
    assert client.is_server_live() and client.is_server_ready()
    assert "missing bearer token" in refused(lambda: client.infer("digits", digits()[1]), "UNAUTHENTICATED")
    message = refused(lambda: client.get_server_metadata(headers={"authorization": "Bearer nope"}), "UNAUTHENTICATED")
    assert "not one this server knows" in message


def test_an_admin_token_loads_from_the_repository(served, client):
    h = auth(served, "ops")
    client.load_model("mnist", headers=h)
    assert client.infer("mnist", digits()[1], headers=h).as_numpy("probabilities").shape == (1, 10)
    client.unload_model("mnist", headers=h)
    assert not client.is_model_ready("mnist", headers=h)


def test_a_stream_runs_only_the_models_its_token_allows(served, client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=auth(served, "team-a"))
    try:
        echo = tritongrpc.InferInput("in_FP32", [1, 1], "FP32")
        echo.set_data_from_numpy(np.ones((1, 1), np.float32))
        client.async_stream_infer("digits", digits()[1], request_id="d1")
        client.async_stream_infer("echo", [echo], request_id="e1")
        client.async_stream_infer("digits", digits(2)[1], request_id="d2")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    ok = sorted(r.get_response().id for r, e in got if e is None)
    errors = [str(e) for r, e in got if e is not None]
    assert ok == ["d1", "d2"]
    assert len(errors) == 1 and "token 'team-a' may not run model 'echo'" in errors[0]


def test_grpc_refusals_are_counted_in_metrics(served, client):
    def counts() -> dict[str, float]:
        text = httpx.get(served.url + "/metrics", headers=auth(served, "scraper")).text
        return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("edgerun_auth_refusals_total{")}

    before = counts()
    refused(lambda: client.infer("digits", digits()[1]), "UNAUTHENTICATED")
    refused(lambda: client.infer("digits", digits()[1], headers={"authorization": "Bearer x"}), "UNAUTHENTICATED")
    refused(lambda: client.get_model_metadata("echo", headers=auth(served, "team-a")), "PERMISSION_DENIED")
    refused(lambda: client.get_model_metadata("digits", headers=auth(served, "scraper")), "PERMISSION_DENIED")
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {"missing_token": 1, "unknown_token": 1, "scope": 2}


def test_edgerun_client_raises_the_refusals(served):
    with edgerun.Client(f"grpc://127.0.0.1:{served.grpc_port}", token=served.tokens["team-a"]) as c:
        assert c.infer("digits", {"input": np.zeros((1, 64), np.float32)})["probabilities"].shape == (1, 10)
        with pytest.raises(Forbidden, match="may not read every model"):
            c.models()
    with edgerun.Client(f"grpc://127.0.0.1:{served.grpc_port}", token="wrong") as c:
        with pytest.raises(Unauthenticated, match="not one this server knows"):
            c.metadata("digits")
