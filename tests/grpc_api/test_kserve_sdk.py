"""The KServe Python SDK's own clients, REST and gRPC, against ``edgerun serve``.

The SDK registers the protocol's messages in protobuf's default pool, as tritonclient does, so the two cannot be
imported in one process: the SDK runs in a child process that prints what it saw.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

if importlib.util.find_spec("kserve") is None:  # not imported here: see the module docstring
    pytest.skip("the KServe SDK is not installed (pip install kserve)", allow_module_level=True)
pytest.importorskip("grpc")

from edgerun.testing.serving import ServerProcess, free_port, reference  # noqa: E402

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    http_url, grpc_url = sys.argv[1], sys.argv[2]
    x = np.array(json.loads(sys.argv[3]), dtype=np.float32)

    def request(binary, name="input", data=x):
        i = InferInput(name, list(data.shape), "FP32")
        i.set_data_from_numpy(data, binary_data=binary)
        return InferRequest(model_name="digits", infer_inputs=[i], request_id="r1")

    async def main():
        seen = {}
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        seen["rest_live"] = await rest.is_server_live(http_url)
        seen["rest_ready"] = await rest.is_server_ready(http_url)
        seen["rest_model_ready"] = await rest.is_model_ready(http_url, "digits")
        for binary in (False, True):
            r = await rest.infer(http_url, request(binary), model_name="digits")
            seen[f"rest_binary_{binary}"] = r.outputs[0].as_numpy().tolist()
        try:
            await rest.infer(http_url, request(False, "nope"), model_name="digits")
        except Exception as exc:
            seen["rest_error"] = f"{type(exc).__name__}: {exc}"
        await rest.close()
        client = InferenceGRPCClient(grpc_url, timeout=30)
        seen["grpc_live"] = await client.is_server_live()
        seen["grpc_ready"] = await client.is_server_ready()
        seen["grpc_model_ready"] = await client.is_model_ready("digits")
        r = await client.infer(request(True))
        seen["grpc_id"] = r.id
        seen["grpc"] = r.outputs[0].as_numpy().tolist()
        try:
            await client.infer(request(True, "input", x[:, :63].copy()))
        except Exception as exc:
            seen["grpc_error"] = f"{type(exc).__name__}: {exc}"
        await client.close()
        print(json.dumps(seen))

    asyncio.run(main())
""")


def test_kserve_sdk_rest_and_grpc_clients(digits_package):
    port = free_port()
    server = ServerProcess(["--model", str(digits_package.root)], env={"EDGERUN_SERVER_GRPC_PORT": str(port)})
    try:
        server.wait_ready()
        x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
        r = subprocess.run([sys.executable, "-c", SCRIPT, server.url, f"127.0.0.1:{port}", json.dumps(x.tolist())],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        assert server.stop() == 0, server.output()
    want = reference(digits_package, x)
    assert all(seen[k] is True for k in ("rest_live", "rest_ready", "rest_model_ready", "grpc_live", "grpc_ready",
                                         "grpc_model_ready")), seen
    for key in ("rest_binary_False", "rest_binary_True", "grpc"):
        np.testing.assert_allclose(np.array(seen[key]), want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert seen["grpc_id"] == "r1"
    assert "has no input 'nope'" in seen["rest_error"], seen["rest_error"]
    assert "shape [2, 63], model expects [-1, 64]" in seen["grpc_error"], seen["grpc_error"]
