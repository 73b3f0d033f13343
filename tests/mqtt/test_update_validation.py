"""An update whose first-choice quantized variant fails this device's validation installs the next choice."""

from __future__ import annotations

import dataclasses

import numpy as np

from edgerun.package import ModelPackage, Validation, file_entry, save_package
from edgerun.testing.models import digits_data, mlp_onnx, random_mlp_weights
from mqtt_helpers import make_package


def test_a_release_whose_int8_disagrees_here_installs_fp32_and_says_why(tmp_path, hub, watcher, device_factory):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dev = device_factory().start()
    root = tmp_path / "v1"
    pkg = make_package(root, 1)
    fp32 = pkg.variants[0]
    other = mlp_onnx(random_mlp_weights([64, 32, 10], seed=99), tmp_path / "other.onnx")
    quantize_dynamic(str(other), str(root / "model.int8.onnx"), weight_type=QuantType.QInt8)
    _, _, x_val, _ = digits_data()
    x = x_val[:32]
    ref = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    bad = dataclasses.replace(fp32, id="onnx-int8", precision="int8", files=(file_entry(root, "model.int8.onnx"),),
                              accuracy=0.99, atol=10.0, info={"validation": {"agreement": 1.0, "samples": 32}})
    pkg.variants = [dataclasses.replace(fp32, accuracy=0.9), bad]
    pkg.validation = Validation({"input": x}, np.argmax(ref.run(None, {"input": x})[0], axis=1))
    save_package(pkg, root)
    hub.release(ModelPackage.load(root))
    active = watcher.event(1, ("active", "failed"), timeout=60)
    assert active["state"] == "active" and "onnx-fp32" in active["detail"], active
    assert "onnx-int8 on" in active["detail"] and "set aside" in active["detail"]  # the status shows it too
    dev.wait_version(1)
    downloads = [e["detail"] for e in watcher.events if e["version"] == 1 and e["state"] == "downloading"]
    assert downloads[0].startswith("variant onnx-int8"), downloads  # the first choice was tried...
    assert downloads[-1].startswith("variant onnx-fp32") and "set aside" in downloads[-1] \
        and "agrees with fp32 on" in downloads[-1], downloads  # ...and the reason travels with the next one
    r = dev.infer()
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    status = watcher.wait_for(lambda: (watcher.status.get("dev1") or {}).get("models") and watcher.status["dev1"],
                              what="status")
    assert status["models"][0]["variant"] == "onnx-fp32"
