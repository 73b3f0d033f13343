"""Write a ReLU MLP as a .tflite file with LiteRT's flatbuffer schema: no TensorFlow needed (tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def mlp_tflite(weights: Sequence[tuple[np.ndarray, np.ndarray]], path: str | Path, *, softmax: bool = True,
               input_name: str = "input", output_name: str = "probabilities") -> Path:
    """An fp32 MLP (FULLY_CONNECTED layers, dynamic batch) with a serving_default signature named like the ONNX one."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    buffers = [s.BufferT()]  # buffer 0 is the conventional empty buffer
    tensors: list = []

    def tensor(name: str, shape: tuple[int, ...], data: np.ndarray | None = None, dynamic_batch: bool = False) -> int:
        t = s.TensorT()
        t.name = name
        t.type = s.TensorType.FLOAT32
        t.shape = list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1] + list(shape[1:])
        if data is not None:
            b = s.BufferT()
            b.data = np.ascontiguousarray(data, dtype="<f4").view(np.uint8).reshape(-1)
            buffers.append(b)
            t.buffer = len(buffers) - 1
        else:
            t.buffer = 0
        tensors.append(t)
        return len(tensors) - 1

    op_codes = []
    code_index: dict[int, int] = {}

    def opcode(builtin: int) -> int:
        if builtin not in code_index:
            c = s.OperatorCodeT()
            c.builtinCode = builtin
            c.deprecatedBuiltinCode = min(builtin, 127)
            c.version = 1
            op_codes.append(c)
            code_index[builtin] = len(op_codes) - 1
        return code_index[builtin]

    operators = []
    n_in = weights[0][0].shape[0]
    prev = tensor(input_name, (1, n_in), dynamic_batch=True)
    first = prev
    for i, (w, b) in enumerate(weights):
        last = i == len(weights) - 1
        wt = tensor(f"W{i}", (w.shape[1], w.shape[0]), np.asarray(w, np.float32).T)
        bt = tensor(f"B{i}", (w.shape[1],), np.asarray(b, np.float32).reshape(-1))
        out_name = ("logits" if softmax else output_name) if last else f"h{i}"
        out = tensor(out_name, (1, w.shape[1]), dynamic_batch=True)
        op = s.OperatorT()
        op.opcodeIndex = opcode(s.BuiltinOperator.FULLY_CONNECTED)
        op.inputs, op.outputs = [prev, wt, bt], [out]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        opts = s.FullyConnectedOptionsT()
        opts.fusedActivationFunction = (s.ActivationFunctionType.NONE if last else s.ActivationFunctionType.RELU)
        op.builtinOptions = opts
        operators.append(op)
        prev = out
    if softmax:
        out = tensor(output_name, (1, weights[-1][0].shape[1]), dynamic_batch=True)
        op = s.OperatorT()
        op.opcodeIndex = opcode(s.BuiltinOperator.SOFTMAX)
        op.inputs, op.outputs = [prev], [out]
        op.builtinOptionsType = s.BuiltinOptions.SoftmaxOptions
        so = s.SoftmaxOptionsT()
        so.beta = 1.0
        op.builtinOptions = so
        operators.append(op)
        prev = out

    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators, sub.name = tensors, [first], [prev], operators, "main"
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    tin, tout = s.TensorMapT(), s.TensorMapT()
    tin.name, tin.tensorIndex = input_name, first
    tout.name, tout.tensorIndex = output_name, prev
    sig.inputs, sig.outputs = [tin], [tout]
    model = s.ModelT()
    model.version, model.description = 3, "edgerun mlp"
    model.operatorCodes, model.subgraphs, model.buffers, model.signatureDefs = op_codes, [sub], buffers, [sig]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(builder.Output())
    return path
