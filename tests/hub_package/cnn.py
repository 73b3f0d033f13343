"""A MobileNet-like CNN written with onnx.helper (random He-initialised weights), and structured images for it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

MOBILENET_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
                (512, 1), (1024, 2), (1024, 1))


def mobilenet_onnx(path: str | Path, *, size: int = 64, stem: int = 32, blocks: Sequence[tuple[int, int]] = MOBILENET_V1,
                   classes: int = 10, seed: int = 0, batch: int | str = "batch",
                   head_images: np.ndarray | None = None) -> Path:
    """Stem conv 3x3/2, depthwise-separable blocks (out channels, stride), global average pool, Gemm, Softmax (NCHW).

    With ``head_images``, the classifier scores the leading principal components of the pooled features over
    those images (the top three, whitened, mixed into the classes at random, folded into the Gemm), so that random convolutions still spread
    the images over the classes by their strongest features.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int, name: str) -> str:
        fan_in = cin // group * k * k
        w = rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        b = np.zeros(cout, np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    inits.extend([numpy_helper.from_array(np.array(0.5, np.float32), "pixel_mean"),
                  numpy_helper.from_array(np.array(4.0, np.float32), "pixel_scale")])
    nodes.append(helper.make_node("Sub", ["image", "pixel_mean"], ["centred"], name="centre"))
    nodes.append(helper.make_node("Mul", ["centred", "pixel_scale"], ["normalised"], name="scale"))
    x = conv("normalised", 3, stem, 3, 2, 1, "stem")
    cin = stem
    for i, (cout, stride) in enumerate(blocks):
        x = conv(x, cin, cin, 3, stride, cin, f"dw{i}")
        x = conv(x, cin, cout, 1, 1, 1, f"pw{i}")
        cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], name="flatten", axis=1))
    w = rng.normal(0, np.sqrt(1.0 / cin), (cin, classes)).astype(np.float32)
    b = np.zeros(classes, np.float32)
    if head_images is not None:
        import onnxruntime as ort

        probe = helper.make_model(helper.make_graph(
            nodes, "probe", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
            [helper.make_tensor_value_info("feat", TensorProto.FLOAT, [batch, cin])], inits),
            opset_imports=[helper.make_opsetid("", 17)])
        probe.ir_version = 8
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        feats = np.concatenate([sess.run(None, {"image": head_images[i:i + 64]})[0]
                                for i in range(0, len(head_images), 64)])
        mean = feats.mean(axis=0)
        _, sv, vt = np.linalg.svd(feats - mean, full_matrices=False)
        k = min(3, len(sv))
        mix = rng.normal(size=(k, classes))
        w = (vt[:k].T / (sv[:k] / np.sqrt(len(feats)) + 1e-6)) @ (mix / np.linalg.norm(mix, axis=0))
        b = (-(mean @ w)).astype(np.float32)
        w = (w * 2.0).astype(np.float32)
        b = (b * 2.0).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(b, "fc_b")])
    nodes.append(helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["logits"], name="fc"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    graph = helper.make_graph(nodes, "mobilenet_like",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgerun-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def structured_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (upsampled 4x4 noise plus stripes at random angles), NCHW float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, 4, 4)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, size // 4, axis=2), size // 4, axis=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi, (n, 1, 1, 1)).astype(np.float32)
    freq = rng.uniform(2, 8, (n, 1, 1, 1)).astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    return np.clip(0.6 * img + 0.4 * stripes, 0, 1).astype(np.float32)


def fp32_labels(model_path: str | Path, x: np.ndarray) -> np.ndarray:
    """Top-1 of the fp32 model itself: a synthetic labelled set on which fp32 scores 100% by construction."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.concatenate([np.argmax(sess.run(None, {"image": x[i:i + 64]})[0], axis=1) for i in range(0, len(x), 64)])
