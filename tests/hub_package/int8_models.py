"""Real models on which int8 goes wrong in a known way: kernels that saturate without VNNI, and a layer whose
inputs no 8-bit range can hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(nodes: list, inits: dict[str, np.ndarray], n_in: int, n_out: int, path: Path, output: str = "scores") -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, path.stem,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", n_out])],
                              [numpy_helper.from_array(a.astype(np.float32), k) for k, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def bright_gemm(root: Path, n_in: int = 2048, n_out: int = 256, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A Gemm whose class 0 sums every input with weight 1 and wins by a margin on bright inputs (in [0.6, 1]);
    the other classes have small weights and a bias just below class 0's sum. With full-range int8 weights every
    pair of uint8 x int8 products (255 x 127 x 2) overflows the 16-bit sums of VPMADDUBSW, the instruction
    onnxruntime's and OpenVINO's int8 kernels use on x86 CPUs without VNNI: class 0 loses everywhere. With 7-bit
    weights (64 x 255 x 2 < 32768) it cannot saturate. Returns the model, inputs and the fp32 model's classes."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.01, (n_in, n_out))
    w[:, 0] = 1.0
    b = np.full(n_out, 0.7 * n_in) + rng.normal(0, 1, n_out)
    b[0] = 0.0
    x = rng.uniform(0.6, 1.0, (240, n_in)).astype(np.float32)
    model = _save([_gemm("x", "W", "b", "scores", "fc")], {"W": w, "b": b}, n_in, n_out, root / "bright.onnx")
    return model, x, np.argmax(x @ w.astype(np.float32) + b.astype(np.float32), axis=1)


def _gemm(x: str, w: str, b: str, out: str, name: str):
    from onnx import helper

    return helper.make_node("Gemm", [x, w, b], [out], name=name)


def noisy_input_mlp(root: Path, hidden: int = 1024) -> tuple[Path, dict[str, np.ndarray], np.ndarray, str]:
    """The digits MLP's first layer (trained) on 64 pixels plus a 65th input it ignores (weight 0), two wide random
    ReLU layers and a least-squares readout: 97-98% on digits, and large enough that int8 pays. The 65th input
    carries readings up to 1000, so one 8-bit range over the input tensor cannot hold the pixels (0..1): the first
    layer is the sensitive one, and int8 of the whole model answers at random until that layer stays in fp32.
    Returns the model, the validation set (with labels), the calibration rows and the name of that layer."""
    from edgerun.testing.models import digits_data, sklearn_weights, train_digits_mlp

    x_train, y_train, x_val, y_val = digits_data()
    (w0, b0), _ = sklearn_weights(train_digits_mlp())
    w0 = np.vstack([w0, np.zeros((1, w0.shape[1]))])
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, np.sqrt(2.0 / w0.shape[1]), (w0.shape[1], hidden))
    w2 = rng.normal(0, np.sqrt(2.0 / hidden), (hidden, hidden))
    zeros = np.zeros(hidden)

    def noisy(x: np.ndarray) -> np.ndarray:
        return np.hstack([x, rng.uniform(0, 1000, (len(x), 1))]).astype(np.float32)

    def features(x: np.ndarray) -> np.ndarray:
        return np.maximum(np.maximum(np.maximum(x @ w0 + b0, 0) @ w1, 0) @ w2, 0)

    train = noisy(x_train)
    h = features(train)
    w3 = np.linalg.solve(h.T @ h + np.eye(hidden), h.T @ np.eye(10)[y_train])
    nodes = [_gemm("x", "W0", "B0", "h0", "dense0"), _relu("h0", "r0"), _gemm("r0", "W1", "B1", "h1", "dense1"),
             _relu("h1", "r1"), _gemm("r1", "W2", "B2", "h2", "dense2"), _relu("h2", "r2"),
             _gemm("r2", "W3", "B3", "scores", "dense3")]
    inits = {"W0": w0, "B0": b0, "W1": w1, "B1": zeros, "W2": w2, "B2": zeros, "W3": w3, "B3": np.zeros(10)}
    model = _save(nodes, inits, 65, 10, root / "noisy.onnx")
    return model, {"x": noisy(x_val), "labels": y_val}, train[:200], "dense0"


def _relu(x: str, out: str):
    from onnx import helper

    return helper.make_node("Relu", [x], [out], name=f"relu_{out}")
