"""Schema fuzzing with schemathesis: a real ``edgerun serve`` against docs/openapi.yaml and KServe's v2 document.

Every operation of a document gets its examples, schemathesis's coverage cases (boundaries, and values the
schema refuses) and a bounded number of generated requests, valid and invalid. Each answer must not be a 5xx
and must be what the document says: a documented status code, its content type, headers and schema; every
endpoint but the health checks must refuse the request without its token. Afterwards the server must still be
ready, answer a correct inference, and have logged no traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis

from edgerun.testing.serving import TOKEN, ServerProcess, make_echo_package, reference

ROOT = Path(__file__).resolve().parents[2]
OWN_DOCUMENT = ROOT / "docs" / "openapi.yaml"
# KServe's REST document (paths usable by tools, a digits example added) is not ours to commit: it is read from
# beside the checkout when it is there
KSERVE_DOCUMENT = Path(os.environ.get("EDGERUN_KSERVE_OPENAPI",
                                      ROOT.parent / "shared" / "oip" / "rest_predict_v2.patched-digits-example.yaml"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 60  # generated requests per operation, besides its examples and coverage cases
SEED = 20240612
calls = {"own": 0}  # requests the fuzz of our own document made


def _config(server: ServerProcess, checks: list[str], **extra) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "base-url": server.url,
        "seed": SEED,
        "suppress-health-check": ["all"],  # a slow shared machine is not the server's failure
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in checks}},
        **extra,
    })


@pytest.fixture(scope="module")
def fuzzed(digits_package, tmp_path_factory):
    """digits from the config, an API token (so load and unload are allowed) and a repository holding echo."""
    d = tmp_path_factory.mktemp("schema-fuzz")
    make_echo_package(d / "repository" / "echo")
    (d / "token").write_text(TOKEN + "\n")
    cfg = d / "edgerun.toml"
    cfg.write_text(f"""
[server]
max_body = "1MiB"
token_file = "{d / 'token'}"
repository_dir = "{d / 'repository'}"

[[models]]
path = "{digits_package.root}"
variant = "onnx-fp32"
""")
    proc = ServerProcess(["--config", str(cfg)]).wait_ready()
    yield proc
    assert proc.proc.poll() is None, f"the server died during the fuzz:\n{proc.output()}"
    code = proc.stop()
    assert code == 0, f"edgerun serve exited with {code} on SIGTERM:\n{proc.output()}"


@pytest.fixture(scope="module")
def own_schema(fuzzed):
    checks = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
              "response_schema_conformance", "response_headers_conformance", "ignored_auth"]
    # the token through the document's security scheme, so that the auth check knows it for ours
    return schemathesis.openapi.from_path(OWN_DOCUMENT, config=_config(
        fuzzed, checks, auth={"openapi": {"bearerAuth": {"bearer": TOKEN}}}))


@pytest.fixture(scope="module")
def kserve_schema(fuzzed):
    if not KSERVE_DOCUMENT.is_file():
        pytest.skip(f"KServe's v2 REST document is not at {KSERVE_DOCUMENT} (a clone without the shared "
                    "documents beside it; EDGERUN_KSERVE_OPENAPI names another copy)")
    # KServe's document lists 200 (and some 400s) only, so which statuses we answer is not checked against it;
    # its paths name the served model, so that its schemas are checked against real answers
    checks = ["not_a_server_error", "content_type_conformance", "response_schema_conformance"]
    return schemathesis.openapi.from_path(KSERVE_DOCUMENT, config=_config(
        fuzzed, checks, headers=AUTH, parameters={"MODEL_NAME": "digits", "MODEL_VERSION": "1"}))


own = schemathesis.pytest.from_fixture("own_schema")
kserve = schemathesis.pytest.from_fixture("kserve_schema")


@own.parametrize()
def test_server_answers_as_its_openapi_document_says(case):
    calls["own"] += 1
    case.call_and_validate()


@kserve.parametrize()
def test_server_answers_within_kserves_document(case):
    case.call_and_validate()


def test_server_still_serves_correctly_after_the_fuzz(fuzzed, digits_package):
    if not calls["own"]:
        pytest.skip("runs after the fuzz tests of this module")
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    with httpx.Client(base_url=fuzzed.url, headers=AUTH, timeout=30) as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}
        r = c.post("/v2/models/digits/infer",
                   json={"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": x.tolist()}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]),
                                   reference(digits_package, x), rtol=1e-5, atol=1e-6)
    log = fuzzed.output()
    assert "Traceback" not in log, log
