"""Scoped tokens over HTTP: a tokens file made by ``edgerun token``, each token allowed its scopes and refused the
rest with a clear 401 or 403, refusals counted in /metrics, bad files stopping the start, revocation on SIGHUP."""

from __future__ import annotations

import hashlib
import signal
import stat
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from prometheus_client.parser import text_string_to_metric_families

from edgerun.testing.models import make_digits_package
from edgerun.testing.serving import TOKEN, ServerProcess, create_token, make_echo_package, reference, run_cli

X = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def scoped(tmp_path_factory, digits_package):
    """digits and echo served, a repository holding mnist, four tokens from the CLI and the API token."""
    d = tmp_path_factory.mktemp("access")
    echo = make_echo_package(d / "echo")
    make_digits_package(d / "models" / "mnist", name="mnist", int8=False)
    tokens = d / "tokens.toml"
    made = {"team-a": create_token(tokens, "team-a", "infer:digits"),
            "reader": create_token(tokens, "reader", "metadata:*"),
            "scraper": create_token(tokens, "scraper", "metrics"),
            "ops": create_token(tokens, "ops", "admin")}
    (d / "token").write_text(TOKEN)
    cfg = d / "edgerun.toml"
    cfg.write_text(f'[server]\ntokens_file = "{tokens}"\ntoken_file = "{d / "token"}"\n'
                   f'repository_dir = "{d / "models"}"\ngrpc_port = 0\n'
                   f'\n[[models]]\npath = "{digits_package.root}"\nvariant = "onnx-fp32"\n'
                   f'\n[[models]]\npath = "{echo.root}"\nbackend = "onnxruntime"\n')
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    proc.tokens, proc.tokens_file = made, tokens
    yield proc
    assert proc.stop() == 0, proc.output()
    log = proc.output()
    for token in [*made.values(), TOKEN]:
        assert token not in log, "a clear token was logged"


def test_a_model_token_runs_and_reads_its_model(scoped, digits_package):
    h = bearer(scoped.tokens["team-a"])
    c = th.InferenceServerClient(scoped.url.removeprefix("http://"))
    x = np.random.default_rng(2).random((2, 64), dtype=np.float32)
    i = th.InferInput("input", [2, 64], "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    out = c.infer("digits", [i], headers=h).as_numpy("probabilities")
    np.testing.assert_allclose(out, reference(digits_package, x), rtol=1e-5, atol=1e-6)
    assert c.get_model_metadata("digits", headers=h)["name"] == "digits"
    assert c.get_model_config("digits", headers=h)["max_batch_size"] == 32
    assert c.is_model_ready("digits", headers=h)
    assert c.get_inference_statistics("digits", headers=h)["model_stats"][0]["name"] == "digits"
    assert c.get_server_metadata(headers=h)["name"] == "edgerun"
    c.close()


@pytest.mark.parametrize("method,path,what,needs", [
    ("POST", "/v2/models/echo/infer", "may not run model 'echo'", "infer:echo"),
    ("GET", "/v2/models/echo", "may not read model 'echo'", "metadata:echo or infer:echo"),
    ("GET", "/v2/models/echo/versions/1/config", "may not read model 'echo'", "metadata:echo"),
    ("GET", "/v2/models/stats", "may not read every model", "metadata:*"),
    ("POST", "/v2/repository/index", "may not read every model", "metadata:*"),
    ("GET", "/metrics", "may not read /metrics", "the scope metrics"),
    ("POST", "/v2/repository/models/mnist/load", "may not control the model repository", "the scope admin"),
])
def test_a_model_token_is_refused_the_rest_with_a_clear_403(scoped, method, path, what, needs):
    r = httpx.request(method, scoped.url + path, headers=bearer(scoped.tokens["team-a"]), timeout=30)
    assert r.status_code == 403, r.text
    message = r.json()["error"]
    assert "token 'team-a'" in message and what in message and needs in message, message
    assert "its scopes are infer:digits" in message
    ok = httpx.post(scoped.url + "/v2/models/digits/infer", json=X, headers=bearer(scoped.tokens["team-a"]))
    assert ok.status_code == 200, "the server stopped serving the token's own model"


def test_a_metadata_token_reads_every_model_and_runs_none(scoped):
    h = bearer(scoped.tokens["reader"])
    assert httpx.get(scoped.url + "/v2/models/echo", headers=h).status_code == 200
    assert {m["name"] for m in httpx.post(scoped.url + "/v2/repository/index", headers=h).json()} == \
        {"digits", "echo", "mnist"}
    assert len(httpx.get(scoped.url + "/v2/models/stats", headers=h).json()["model_stats"]) == 2
    r = httpx.post(scoped.url + "/v2/models/digits/infer", json=X, headers=h)
    assert r.status_code == 403 and "may not run model 'digits'" in r.json()["error"]


def test_a_metrics_token_reads_metrics_only(scoped):
    h = bearer(scoped.tokens["scraper"])
    r = httpx.get(scoped.url + "/metrics", headers=h)
    assert r.status_code == 200 and "edgerun_auth_refusals_total" in r.text
    for method, path in (("GET", "/v2/models/digits"), ("POST", "/v2/models/digits/infer"),
                         ("POST", "/v2/repository/models/mnist/load")):
        r = httpx.request(method, scoped.url + path, headers=h, json=X)
        assert r.status_code == 403 and "token 'scraper'" in r.json()["error"], path


def test_admin_tokens_control_the_repository(scoped):
    for token in (scoped.tokens["ops"], TOKEN):  # a tokens-file admin, and the API token (token_file)
        h = bearer(token)
        with httpx.Client(base_url=scoped.url, headers=h, timeout=60) as c:
            assert c.post("/v2/repository/models/mnist/load").status_code == 200
            assert c.post("/v2/models/mnist/infer", json=X).status_code == 200
            assert c.get("/metrics").status_code == 200
            assert c.post("/v2/repository/models/mnist/unload").status_code == 200
            assert c.get("/v2/models/mnist/ready").status_code == 404


@pytest.mark.parametrize("headers,message", [
    ({}, "missing bearer token"),
    ({"authorization": "Bearer not-a-token-it-knows"}, "wrong bearer token: not one this server knows"),
    ({"authorization": "Basic dXNlcjpwYXNz"}, "authorization is not 'Bearer <token>'"),
])
def test_missing_or_wrong_tokens_are_401(scoped, headers, message):
    for method, path in (("POST", "/v2/models/digits/infer"), ("GET", "/v2"), ("GET", "/metrics"),
                         ("GET", "/v2/nothing-here")):
        r = httpx.request(method, scoped.url + path, headers=headers, json=X)
        assert r.status_code == 401 and message in r.json()["error"], (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(scoped.url + "/v2/health/ready").status_code == 200


def refusals(url: str, token: str) -> dict[str, float]:
    """edgerun_auth_refusals_total by reason, and edgerun_request_failures_total's unauthorized and forbidden."""
    text = httpx.get(url + "/metrics", headers=bearer(token)).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "edgerun_auth_refusals_total":
                out[s.labels["reason"]] = s.value
            elif s.name == "edgerun_request_failures_total" and s.labels["reason"] in ("unauthorized", "forbidden"):
                out[s.labels["reason"]] = s.value
    return out


def test_metrics_count_refusals_by_reason(scoped):
    scraper = scoped.tokens["scraper"]
    before = refusals(scoped.url, scraper)
    for _ in range(3):
        httpx.post(scoped.url + "/v2/models/digits/infer", json=X)
    for _ in range(2):
        httpx.post(scoped.url + "/v2/models/digits/infer", json=X, headers=bearer("revoked-or-wrong"))
    httpx.post(scoped.url + "/v2/models/echo/infer", json=X, headers=bearer(scoped.tokens["team-a"]))
    after = refusals(scoped.url, scraper)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta == {"missing_token": 3, "unknown_token": 2, "scope": 1, "unauthorized": 5, "forbidden": 1}


def test_the_tokens_file_holds_hashes_never_tokens(scoped):
    text = scoped.tokens_file.read_text()
    assert stat.S_IMODE(scoped.tokens_file.stat().st_mode) == 0o600
    for name, token in scoped.tokens.items():
        assert token not in text, f"the clear token of {name} is in the tokens file"
        assert len(token) >= 43
        assert hashlib.sha256(token.encode()).hexdigest() in text
    listed = run_cli("token", "list", "--tokens-file", str(scoped.tokens_file))
    assert listed.returncode == 0
    for name in scoped.tokens:
        assert name in listed.stdout
    assert "infer:digits" in listed.stdout and "metadata:*" in listed.stdout
    assert hashlib.sha256(scoped.tokens["ops"].encode()).hexdigest() not in listed.stdout


def test_token_cli_refusals(tmp_path):
    f = tmp_path / "tokens.toml"
    create_token(f, "team-a", "infer:digits")
    bad_scope = run_cli("token", "create", "x", "--scope", "infer:digits/../x", "--tokens-file", str(f))
    assert bad_scope.returncode == 2 and "the model is a name" in bad_scope.stderr and bad_scope.stdout == ""
    unknown = run_cli("token", "create", "x", "--scope", "write", "--tokens-file", str(f))
    assert unknown.returncode == 2 and "unknown scope 'write'" in unknown.stderr
    again = run_cli("token", "create", "team-a", "--scope", "metrics", "--tokens-file", str(f))
    assert again.returncode == 1 and "already has a token named 'team-a'" in again.stderr and again.stdout == ""
    missing = run_cli("token", "revoke", "team-b", "--tokens-file", str(f))
    assert missing.returncode == 66 and "no token named 'team-b'" in missing.stderr and "team-a" in missing.stderr
    (tmp_path / "edgerun.toml").write_text("[server]\n")
    nowhere = run_cli("token", "list", env={"EDGERUN_CONFIG": str(tmp_path / "edgerun.toml")})
    assert nowhere.returncode == 78 and "no tokens file" in nowhere.stderr


GOOD = "a" * 64


@pytest.mark.parametrize("entries,key,message", [
    (f'[[token]]\nname = "t"\ntoken = "s3cret-clear"\nsha256 = "{GOOD}"\nscopes = ["admin"]\n',
     "token[0].token", "never a clear token"),
    ('[[token]]\nname = "t"\nsha256 = "abc123"\nscopes = ["admin"]\n',
     "token[0].sha256", "64 lowercase hex digits, got 'abc123'"),
    (f'[[token]]\nname = "ok"\nsha256 = "{"b" * 64}"\nscopes = ["metrics"]\n'
     f'[[token]]\nname = "t"\nsha256 = "{GOOD}"\nscopes = ["infer:digits", "delete:*"]\n',
     "token[1].scopes[1]", "unknown scope 'delete:*'"),
    (f'[[token]]\nname = "t"\nsha256 = "{GOOD}"\nscopes = ["metrics"]\n'
     f'[[token]]\nname = "t"\nsha256 = "{"b" * 64}"\nscopes = ["metrics"]\n',
     "token[1].name", "names are unique"),
])
def test_a_bad_tokens_file_stops_the_start_naming_the_problem(tmp_path, digits_package, entries, key, message):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entries)
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[server]\ntokens_file = "{tokens}"\ngrpc_port = 0\n\n[[models]]\npath = "{digits_package.root}"\n')
    for args in (["serve", "--config", str(cfg), "--state-dir", str(tmp_path / "state")],
                 ["config", "check", "--config", str(cfg)]):
        r = run_cli(*args)
        err = " ".join((r.stderr + r.stdout).split())
        assert r.returncode == 78, err
        assert f"file {tokens}" in err and f"key '{key}'" in err and message in err and "token 't'" in err, err
        assert "s3cret-clear" not in err


def test_revoke_and_sighup_refuse_the_token_while_the_server_serves(tmp_path, digits_package):
    tokens = tmp_path / "tokens.toml"
    kept, gone = create_token(tokens, "kept", "infer:digits"), create_token(tokens, "gone", "infer:digits")
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[server]\ntokens_file = "{tokens}"\ngrpc_port = 0\n\n[[models]]\npath = "{digits_package.root}"\n')
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    codes: list[int] = []
    stop = threading.Event()

    def keep_inferring() -> None:
        with httpx.Client(base_url=proc.url, headers=bearer(kept), timeout=30) as c:
            while not stop.is_set():
                codes.append(c.post("/v2/models/digits/infer", json=X).status_code)

    t = threading.Thread(target=keep_inferring)
    t.start()
    try:
        assert httpx.post(proc.url + "/v2/models/digits/infer", json=X, headers=bearer(gone)).status_code == 200
        r = run_cli("token", "revoke", "gone", "--tokens-file", str(tokens))
        assert r.returncode == 0, r.stderr
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(proc.url + "/v2/models/digits/infer", json=X, headers=bearer(gone))
            if r.status_code == 401 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 401 and "not one this server knows" in r.json()["error"]
        # a broken file on the next SIGHUP changes nothing: the error is logged, the tokens stay as they were
        tokens.write_text(tokens.read_text() + f'\n[[token]]\nname = "oops"\ntoken = "{gone}"\nscopes = ["admin"]\n')
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload failed" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "never a clear token" in proc.output()
        assert httpx.post(proc.url + "/v2/models/digits/infer", json=X, headers=bearer(gone)).status_code == 401
    finally:
        stop.set()
        t.join()
        assert proc.stop() == 0, proc.output()
    assert codes and set(codes) == {200}, f"the kept token was refused during the reload: {set(codes)}"
    assert "removed gone" in proc.output()
    assert kept not in proc.output() and gone not in proc.output()
