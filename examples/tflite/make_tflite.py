"""Build the digits .tflite example package: a Keras MLP (64-64-10) trained on scikit-learn's digits.

Run once at generation time (needs tensorflow; tests and CI only read the committed files):

    python examples/tflite/make_tflite.py

Writes, beside this script:

- ``digits_fp32.tflite``   float32, dynamic batch (input [None, 64]).
- ``digits_int8.tflite``   full-integer quantization (int8 weights *and* activations, calibrated on the
  training split) with a float32 interface, so it serves the same ``input``/``probabilities`` tensors as
  the fp32 variant; LiteRT runs it with its int8 kernels.
- ``digits_int8_io.tflite`` the same int8 model with int8 input and output tensors (not in the package:
  tests use it to check that quantized tensors keep their real datatype).
- ``digits_fp32.onnx``     the same fp32 weights as ONNX (not in the package: tests compare litert's outputs
  with onnxruntime's on it).
- ``edgerun.toml``         the package: both tflite variants with their accuracy measured with the LiteRT
  interpreter on the validation split, and one warm-up sample with its expected outputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0


def train(x: np.ndarray, y: np.ndarray):
    """A seeded Keras MLP 64-64-10 with softmax."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    inp = tf.keras.Input(shape=(64,), name="input")
    h = tf.keras.layers.Dense(64, activation="relu", name="hidden")(inp)
    out = tf.keras.layers.Dense(10, activation="softmax", name="probabilities")(h)
    model = tf.keras.Model(inp, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=30, batch_size=32, verbose=0, shuffle=True)
    return model


def weights_of(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel, bias) of the two Dense layers as float32 arrays."""
    return [(np.asarray(model.get_layer(n).kernel.numpy(), np.float32), np.asarray(model.get_layer(n).bias.numpy(), np.float32))
            for n in ("hidden", "probabilities")]


def convert(model, x_calib: np.ndarray, *, int8: bool = False, int8_io: bool = False) -> bytes:
    """TFLite flatbuffer with one serving_default signature: input ``input`` [None, 64] -> ``probabilities``."""
    import tensorflow as tf

    # The trained weights become graph constants, so the converter has no resource variables to freeze.
    (w0, b0), (w1, b1) = weights_of(model)

    class Serve(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="input")])
        def serve(self, input):  # noqa: A002 - the signature's input name
            h = tf.nn.relu(tf.matmul(input, tf.constant(w0)) + tf.constant(b0))
            return {"probabilities": tf.nn.softmax(tf.matmul(h, tf.constant(w1)) + tf.constant(b1))}

    import tempfile

    module = Serve()
    saved = tempfile.mkdtemp(prefix="edgerun-digits-")
    tf.saved_model.save(module, saved, signatures={"serving_default": module.serve})
    conv = tf.lite.TFLiteConverter.from_saved_model(saved)
    if int8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative():
            for i in range(0, 400, 4):
                yield [x_calib[i:i + 4]]

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    return conv.convert()


def litert_run(path: Path, x: np.ndarray) -> np.ndarray:
    """Run a float-interface tflite file on a batch with the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return it.get_tensor(out["index"])


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(HERE.parents[1]))
    from edgerun.package import ModelPackage, Sample, Variant, file_entry, save_package
    from edgerun.tensors import TensorSpec
    from edgerun.testing.models import accuracy_of, digits_data, mlp_onnx

    x_train, y_train, x_val, y_val = digits_data(SEED)
    model = train(x_train, y_train)
    files = {
        "digits_fp32.tflite": convert(model, x_train),
        "digits_int8.tflite": convert(model, x_train, int8=True),
        "digits_int8_io.tflite": convert(model, x_train, int8=True, int8_io=True),
    }
    for name, data in files.items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
    mlp_onnx(weights_of(model), HERE / "digits_fp32.onnx")

    x_s = x_val[:2]
    expected = litert_run(HERE / "digits_fp32.tflite", x_s)
    variants = []
    for vid, precision, name in (("tflite-fp32", "fp32", "digits_fp32.tflite"),
                                 ("tflite-int8", "int8", "digits_int8.tflite")):
        path = HERE / name
        acc = accuracy_of(lambda xb: litert_run(path, xb), x_val, y_val)
        dev = float(np.max(np.abs(litert_run(path, x_s) - expected)))
        atol = 1e-4 if precision == "fp32" else max(1e-3, round(dev * 4, 4))
        print(f"{vid}: accuracy {acc:.4f} on {len(x_val)} validation digits, max deviation {dev:.3g}")
        variants.append(Variant(vid, "tflite", precision, (file_entry(HERE, name),), accuracy=round(acc, 4),
                                atol=atol, rtol=1e-3))
    pkg = ModelPackage(name="digits-tflite", version=1,
                       inputs=[TensorSpec("input", "FP32", (-1, 64))],
                       outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
                       variants=variants, samples=[Sample({"input": x_s}, {"probabilities": expected})],
                       description="Keras MLP for 8x8 handwritten digits (scikit-learn digits), as TFLite")
    save_package(pkg, HERE)
    print(f"wrote {HERE / 'edgerun.toml'}")


if __name__ == "__main__":
    main()
