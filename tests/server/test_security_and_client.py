"""Bearer token, loopback-by-default, Unix socket, drain on SIGTERM, and edgerun.Client against a real server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as th

import edgerun
from edgerun.errors import InvalidInput, ModelNotFound
from edgerun.testing.serving import CLI, TOKEN, ServerProcess, free_port, reference


@pytest.fixture(scope="module")
def secured(digits_package, tmp_path_factory):
    """A server with a token file and a Unix socket beside its TCP port."""
    d = tmp_path_factory.mktemp("secured")
    (d / "token").write_text(TOKEN + "\n")
    proc = ServerProcess(["--model", str(digits_package.root), "--token-file", str(d / "token"),
                          "--uds", str(d / "edgerun.sock")]).wait_ready()
    proc.sock = d / "edgerun.sock"
    yield proc
    assert proc.stop() == 0, proc.output()
    assert not proc.sock.exists(), "the Unix socket was left behind"


def test_token_required_everywhere_but_health(secured):
    url = secured.url
    assert httpx.get(url + "/v2/health/live").status_code == 200
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    for method, path in [("GET", "/v2"), ("GET", "/v2/models/digits"), ("GET", "/v2/models/digits/ready"),
                         ("GET", "/metrics"),
                         ("POST", "/v2/repository/index"), ("POST", "/v2/models/digits/infer")]:
        r = httpx.request(method, url + path)
        assert r.status_code == 401, path
        assert "bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, url + path, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
    ok = httpx.get(url + "/v2", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["name"] == "edgerun"


def test_tritonclient_with_token(secured, digits_package):
    c = th.InferenceServerClient(secured.url.removeprefix("http://"))
    x = np.ones((2, 64), np.float32)
    i = th.InferInput("input", [2, 64], "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    r = c.infer("digits", [i], headers={"Authorization": f"Bearer {TOKEN}"})
    np.testing.assert_allclose(r.as_numpy("probabilities"), reference(digits_package, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_client_over_tcp(secured, digits_package, binary):
    x = np.random.default_rng(4).random((3, 64), dtype=np.float32)
    with edgerun.Client(secured.url, token=TOKEN) as c:
        assert c.live() and c.ready()
        assert c.server_metadata()["name"] == "edgerun"
        assert c.model_ready("digits") and c.model_ready("digits", 1) and not c.model_ready("digits", 5)
        assert [(m["name"], m["version"]) for m in c.models()] == [("digits", "1")]
        assert c.metadata("digits")["inputs"][0]["shape"] == [-1, 64]
        got = c.infer("digits", {"input": x}, binary=binary)
        np.testing.assert_allclose(got["probabilities"], reference(digits_package, x), rtol=1e-5, atol=1e-6)
        with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
            c.infer("nope", {"input": x})
        with pytest.raises(InvalidInput, match="datatype FP64, model expects FP32"):
            c.infer("digits", {"input": x.astype(np.float64)}, binary=binary)


def test_served_variant_is_the_runtimes_choice(secured, digits_package):
    from edgerun.runtime import Runtime

    chosen = Runtime().explain(digits_package).chosen
    with edgerun.Client(secured.url, token=TOKEN) as c:
        meta = c.metadata("digits")
        index = c.models()
    assert meta["parameters"]["variant"] == chosen.variant.id == index[0]["variant"]
    assert meta["platform"] == f"{chosen.backend}_{chosen.variant.format}" and index[0]["backend"] == chosen.backend


def test_client_over_unix_socket(secured, digits_package):
    x = np.zeros((1, 64), np.float32)
    with edgerun.Client("http://edgerun", token=TOKEN, uds=str(secured.sock)) as c:
        got = c.infer("digits", {"input": x}, version=1)
    np.testing.assert_allclose(got["probabilities"], reference(digits_package, x), rtol=1e-5, atol=1e-6)


def test_client_on_a_stopped_server():
    with edgerun.Client(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        assert not c.live() and not c.ready()


def test_client_without_token_is_refused(secured):
    from edgerun.errors import Unauthenticated

    with edgerun.Client(secured.url) as c:
        with pytest.raises(Unauthenticated, match="bearer token"):
            c.models()


def test_sigterm_drains_requests_in_flight(digits_package):
    proc = ServerProcess(["--model", str(digits_package.root)]).wait_ready()
    codes = []
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}

    def hammer():
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            for _ in range(400):
                try:
                    codes.append(c.post("/v2/models/digits/infer", json=body).status_code)
                except httpx.TransportError:
                    return  # the server closed the connection between requests: fine

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(codes) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.stop() == 0, proc.output()
    for t in threads:
        t.join()
    assert codes and set(codes) == {200}, f"requests failed during the drain: {set(codes)}"


def test_refuses_non_loopback_host_without_token(digits_package):
    r = subprocess.run([sys.executable, "-c", CLI, "serve", "--model", str(digits_package.root), "--host", "0.0.0.0",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "EDGERUN_API_TOKEN": ""})
    assert r.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API token" in r.stderr + r.stdout
