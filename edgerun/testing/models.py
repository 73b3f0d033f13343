"""Small real models: an MLP trained on scikit-learn's digits, exported to ONNX, and packages around them.

Needs the ``dev`` extra (scikit-learn, onnx); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from edgerun.package import ModelPackage, Sample, Validation, Variant, file_entry, save_package
from edgerun.tensors import TensorSpec


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 in [0, 1]: (x_train, y_train, x_val, y_val)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, y_train, x_val, y_val


def train_digits_mlp(hidden: Sequence[int] = (64,), seed: int = 0, max_iter: int = 300):
    """An MLPClassifier trained on digits (a second or two on one core)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, y_train, _, _ = digits_data(seed)
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return clf


def mlp_onnx(weights: Sequence[tuple[np.ndarray, np.ndarray]], path: str | Path, *, softmax: bool = True,
             input_name: str = "input", output_name: str = "probabilities", batch: int | str = "batch",
             opset: int = 17) -> Path:
    """Write a ReLU MLP (Gemm layers) as an ONNX file; ``batch`` is a fixed size or a dynamic dim name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    prev = input_name
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"),
                  numpy_helper.from_array(np.asarray(b, np.float32).reshape(-1), f"B{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [out], name=f"dense{i}"))
        prev = out
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax" if softmax else "Identity", [prev], [output_name], axis=1)
                 if softmax else helper.make_node("Identity", [prev], [output_name]))
    n_in, n_out = weights[0][0].shape[0], weights[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgerun")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def sklearn_weights(clf) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in zip(clf.coefs_, clf.intercepts_)]


def random_mlp_weights(sizes: Sequence[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised weights for an MLP of the given layer sizes (for speed tests, not accuracy)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, np.sqrt(2 / a), (a, b)).astype(np.float32), rng.normal(0, 0.01, b).astype(np.float32))
            for a, b in zip(sizes[:-1], sizes[1:])]


def accuracy_of(run, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of ``run(x_batch) -> scores`` on (x, y)."""
    hits = 0
    for i in range(0, len(x), batch):
        hits += int((np.argmax(run(x[i:i + batch]), axis=1) == y[i:i + batch]).sum())
    return hits / len(x)


def make_digits_package(root: str | Path, *, name: str = "digits", version: int = 1, hidden: Sequence[int] = (64,),
                        int8: bool = True, seed: int = 0, samples: int = 2, validation: int = 0) -> ModelPackage:
    """A package with a trained digits MLP: an ONNX fp32 variant and (optionally) a dynamic-int8 one,
    each with its accuracy measured on the validation split, and warm-up samples with expected outputs;
    ``validation``: that many held-out examples as the package's validation sample (fp32's top-1 on each)."""
    import onnxruntime as ort

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clf = train_digits_mlp(hidden, seed)
    _, _, x_val, y_val = digits_data(seed)
    fp32 = mlp_onnx(sklearn_weights(clf), root / "model.fp32.onnx")
    files = [("onnx-fp32", "fp32", fp32)]
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = root / "model.int8.onnx"
        quantize_dynamic(str(fp32), str(int8_path), weight_type=QuantType.QInt8)
        files.append(("onnx-int8", "int8", int8_path))
    variants = []
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    x_s = x_val[:samples]
    expected = ref.run(None, {"input": x_s})[0]
    for vid, precision, path in files:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        acc = accuracy_of(lambda xb: sess.run(None, {"input": xb})[0], x_val, y_val)
        dev = float(np.max(np.abs(sess.run(None, {"input": x_s})[0] - expected)))
        atol = 1e-4 if precision == "fp32" else max(1e-3, round(dev * 4, 4))
        variants.append(Variant(vid, "onnx", precision, (file_entry(root, path.name),), accuracy=round(acc, 4),
                                atol=atol, rtol=1e-3))
    val = None
    if validation:
        x_v = np.ascontiguousarray(x_val[:validation])
        val = Validation({"input": x_v}, np.argmax(ref.run(None, {"input": x_v})[0], axis=1).astype(np.int64))
    pkg = ModelPackage(name=name, version=version,
                       inputs=[TensorSpec("input", "FP32", (-1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
                       variants=variants, samples=[Sample({"input": x_s}, {"probabilities": expected})],
                       validation=val,
                       description="MLP classifier for 8x8 handwritten digits (scikit-learn digits)")
    save_package(pkg, root)
    return ModelPackage.load(root)


def tiny_package(root: Path, version: int, name: str = "m") -> ModelPackage:
    """A package whose one file is a few KB unique to ``name`` and ``version``, for a fleet that loads nothing."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(hashlib.sha256(f"{name}-{version}".encode()).digest() * 128)
    pkg = ModelPackage(name, version, [TensorSpec("input", "FP32", (-1, 4))], [TensorSpec("out", "FP32", (-1, 2))],
                       [Variant("onnx-fp32", "onnx", "fp32", (file_entry(root, "model.onnx"),))])
    save_package(pkg, root)
    return ModelPackage.load(root)


def train_digits_cnn(path: Path, *, epochs: int = 30, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """A small CNN trained with PyTorch on scikit-learn's digits as [N, 1, 8, 8] images, exported to ONNX
    (input ``input``, output ``logits``); returns the file and the data: x_train, y_train, x_val, y_val."""
    import torch
    from torch import nn

    x_train, y_train, x_val, y_val = digits_data(seed)
    images = {"x_train": x_train.reshape(-1, 1, 8, 8), "y_train": y_train, "x_val": x_val.reshape(-1, 1, 8, 8),
              "y_val": y_val}
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.tensor(images["x_train"]), torch.tensor(y_train)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path, images
