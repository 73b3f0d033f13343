"""A loaded model described in Triton's model configuration (the subset that describes an edgerun model).

The JSON form is what ``GET /v2/models/{m}/config`` answers and what the gRPC ``ModelConfig`` call carries,
so Triton's tools (``perf_analyzer``, ``tritonclient``'s ``get_model_config``) read an edgerun model as
they read a Triton one. With a batch dimension, ``max_batch_size`` is above 0 and ``dims`` leave it out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgerun.tensors import TensorSpec

if TYPE_CHECKING:
    from edgerun.runtime import LoadedModel
    from edgerun.serving.batching import Policy

TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                "BYTES": "TYPE_STRING"}
KINDS = {"CPU": "KIND_CPU", "GPU": "KIND_GPU", "CUDA": "KIND_GPU"}


def _tensor(spec: TensorSpec, batched: bool, kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": spec.name, "data_type": TRITON_TYPES[spec.datatype],
                           "dims": list(spec.shape[1:] if batched else spec.shape)}
    if kind == "input":
        doc["format"] = "FORMAT_NONE"
    return doc


def model_config(model: LoadedModel, policy: Policy, batched: bool) -> dict[str, Any]:
    """The Triton model configuration of one loaded model version, as JSON."""
    device = str(model.session.device).upper()
    doc: dict[str, Any] = {
        "name": model.name,
        "platform": f"{model.backend}_{model.variant.format}",
        "backend": model.backend,
        "max_batch_size": policy.max_batch_size if batched else 0,
        "input": [_tensor(s, batched, "input") for s in model.inputs],
        "output": [_tensor(s, batched, "output") for s in model.outputs],
        "version_policy": {"specific": {"versions": [model.version]}},
        "instance_group": [{"name": model.name, "kind": KINDS.get(device.split(":")[0], "KIND_MODEL"),
                            "count": policy.max_inflight}],
        "parameters": {"variant": {"string_value": model.variant.id},
                       "precision": {"string_value": model.variant.precision},
                       "device": {"string_value": str(model.session.device)}},
    }
    if policy.batching:
        doc["dynamic_batching"] = {"max_queue_delay_microseconds": int(policy.max_queue_delay * 1e6),
                                   "preferred_batch_size": [], "preserve_ordering": False}
    return doc
