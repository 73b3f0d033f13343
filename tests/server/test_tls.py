"""Mutual TLS: HTTPS and gRPC over TLS serve only clients with a certificate from ``server.tls_client_ca_file``."""

from __future__ import annotations

import ssl

import httpx
import numpy as np
import pytest

import edgerun
from edgerun.errors import EdgerunError
from edgerun.testing.serving import ServerProcess, free_port, reference, run_cli
from edgerun.testing.tls import make_test_ca

X = np.random.default_rng(5).random((2, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The server's CA (server and client certificates), and another CA whose client certificate is a stranger's."""
    d = tmp_path_factory.mktemp("pki")
    make_test_ca(d / "ours")
    make_test_ca(d / "theirs")
    return d


def tls_config(pki, *, client_ca: bool = True) -> str:
    ours = pki / "ours"
    return (f'tls_cert_file = "{ours / "server.pem"}"\ntls_key_file = "{ours / "server.key"}"\n'
            + (f'tls_client_ca_file = "{ours / "ca.pem"}"\n' if client_ca else ""))


@pytest.fixture(scope="module")
def mtls(tmp_path_factory, digits_package, pki):
    """digits on HTTPS and gRPC over TLS, client certificates required, listening on every address: no token."""
    cfg = tmp_path_factory.mktemp("mtls") / "edgerun.toml"
    grpc_port = free_port()
    cfg.write_text(f'[server]\nhost = "0.0.0.0"\n{tls_config(pki)}'
                   f'\n[[models]]\npath = "{digits_package.root}"\nvariant = "onnx-fp32"\n')
    ours = pki / "ours"
    proc = ServerProcess(["--config", str(cfg)], env={"EDGERUN_SERVER_GRPC_PORT": str(grpc_port)},
                         tls=(ours / "ca.pem", ours / "client.pem", ours / "client.key"))
    proc.wait_ready()
    proc.grpc_port = grpc_port
    yield proc
    assert proc.stop() == 0, proc.output()
    assert f"serving KServe v2 gRPC on grpcs://0.0.0.0:{grpc_port}" in proc.output()


def client_options(pki, who: str = "ours") -> dict:
    return {"ca": pki / "ours" / "ca.pem", "cert": pki / who / "client.pem", "key": pki / who / "client.key"}


def test_a_client_with_a_certificate_from_the_ca_is_served(mtls, pki, digits_package):
    for url in (mtls.url, f"grpcs://127.0.0.1:{mtls.grpc_port}"):
        with edgerun.Client(url, **client_options(pki)) as c:
            got = c.infer("digits", {"input": X})["probabilities"]
            np.testing.assert_allclose(got, reference(digits_package, X), rtol=1e-5, atol=1e-6)
            assert c.metadata("digits")["name"] == "digits"


def test_a_body_of_megabytes_is_read_whole_over_tls(mtls, pki, digits_package):
    x = np.random.default_rng(6).random((16384, 64), dtype=np.float32)  # 4 MiB of binary tensor data
    with edgerun.Client(mtls.url, **client_options(pki)) as c:
        for _ in range(2):  # and the connection goes on
            got = c.infer("digits", {"input": x})["probabilities"]
            np.testing.assert_allclose(got, reference(digits_package, x), rtol=1e-5, atol=1e-6)


def test_a_client_without_a_certificate_is_refused(mtls, pki):
    no_cert = ssl.create_default_context(cafile=str(pki / "ours" / "ca.pem"))
    with pytest.raises(httpx.TransportError):
        httpx.get(mtls.url + "/v2/health/live", verify=no_cert, timeout=10)
    with edgerun.Client(f"grpcs://127.0.0.1:{mtls.grpc_port}", ca=pki / "ours" / "ca.pem", timeout=10) as c:
        assert not c.live()
        with pytest.raises(EdgerunError):
            c.infer("digits", {"input": X})
    assert httpx.get(mtls.url + "/v2/health/live", verify=mtls.verify).status_code == 200, "the server stopped"


def test_a_certificate_from_another_ca_is_refused(mtls, pki):
    for url in (mtls.url, f"grpcs://127.0.0.1:{mtls.grpc_port}"):
        with edgerun.Client(url, timeout=10, **client_options(pki, "theirs")) as c:
            assert not c.live(), url


def test_plain_http_is_not_served_on_a_tls_port(mtls):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{mtls.port}/v2/health/live", timeout=10)


def test_tls_settings_need_a_tls_url():
    with pytest.raises(ValueError, match="use https:// or grpcs://"):
        edgerun.Client("http://127.0.0.1:8000", ca="ca.pem")
    with pytest.raises(ValueError, match="give both cert and key"):
        edgerun.Client("https://127.0.0.1:8000", cert="client.pem")


def test_tls_without_client_certificates_does_not_open_a_public_address(tmp_path, digits_package, pki):
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text(f'[server]\nhost = "0.0.0.0"\ngrpc_port = 0\n{tls_config(pki, client_ca=False)}'
                   f'\n[[models]]\npath = "{digits_package.root}"\n')
    r = run_cli("serve", "--config", str(cfg), "--port", str(free_port()), "--state-dir", str(tmp_path / "state"),
                env={"EDGERUN_API_TOKEN": ""})
    assert r.returncode == 78
    assert "refusing to listen on 0.0.0.0 without an API token" in r.stderr and "tls_client_ca_file" in r.stderr


@pytest.mark.parametrize("change,key,message", [
    ({"tls_key_file": "theirs/server.key"}, "server.tls_cert_file", "with the key"),
    ({"tls_client_ca_file": "ours/server.key"}, "server.tls_client_ca_file", "not a PEM CA certificate"),
    ({"tls_cert_file": None}, "server.tls_key_file", "needs server.tls_cert_file"),
    ({"tls_key_file": "ours/missing.key"}, "server.tls_key_file", "expected a readable file"),
])
def test_bad_tls_files_stop_the_start_naming_the_key(tmp_path, pki, change, key, message):
    settings = {"tls_cert_file": "ours/server.pem", "tls_key_file": "ours/server.key",
                "tls_client_ca_file": "ours/ca.pem", **change}
    cfg = tmp_path / "edgerun.toml"
    cfg.write_text("[server]\n" + "".join(f'{k} = "{pki / v}"\n' for k, v in settings.items() if v))
    for args in (["serve", "--config", str(cfg), "--state-dir", str(tmp_path / "state")],
                 ["config", "check", "--config", str(cfg)]):
        r = run_cli(*args)
        err = " ".join(r.stderr.split())
        assert r.returncode == 78 and f"key '{key}'" in err and message in err, (args, err)
