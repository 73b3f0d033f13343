"""inference.proto against Triton's clients: same names, numbers and types, so tritonclient.grpc and perf_analyzer
read and write what edgerun reads and writes; and the committed modules are the ones inference.proto makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc.aio")
pytest.importorskip("tritonclient.grpc")

from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: E402
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: E402,F401  (registers Triton's messages)

from edgerun.grpc import inference_pb2  # noqa: E402

TRITON = descriptor_pool.Default()
OURS = inference_pb2.DESCRIPTOR
PROTO = Path(inference_pb2.__file__).with_name("inference.proto")
RPCS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
        "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]


def _messages(descs):
    for d in descs:
        yield d
        yield from _messages(d.nested_types)


def _enums():
    yield from OURS.enum_types_by_name.values()
    for m in _messages(OURS.message_types_by_name.values()):
        yield from m.enum_types


MESSAGES = {m.full_name: m for m in _messages(OURS.message_types_by_name.values())}
ENUMS = {e.full_name: e for e in _enums()}


def _field(fd) -> dict:
    return {"number": fd.number, "type": fd.type, "repeated": fd.is_repeated,
            "message": fd.message_type.full_name if fd.message_type else None,
            "enum": fd.enum_type.full_name if fd.enum_type else None,
            "oneof": fd.containing_oneof.name if fd.containing_oneof else None}


def test_the_proto_defines_every_message_the_rpcs_need() -> None:
    assert OURS.package == "inference"
    assert len(MESSAGES) >= 50 and len(ENUMS) == 3, (sorted(MESSAGES), sorted(ENUMS))


@pytest.mark.parametrize("full_name", sorted(MESSAGES))
def test_message_fields_match_tritons(full_name: str) -> None:
    ours = MESSAGES[full_name]
    theirs = TRITON.FindMessageTypeByName(full_name)
    if not ours.fields:
        assert not theirs.fields, f"{full_name} is empty but Triton's has fields"
    for fd in ours.fields:
        assert fd.name in theirs.fields_by_name, f"{full_name}.{fd.name}: Triton's message has no such field"
        assert _field(fd) == _field(theirs.fields_by_name[fd.name]), f"{full_name}.{fd.name}"
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry


@pytest.mark.parametrize("full_name", sorted(ENUMS))
def test_enum_values_match_tritons(full_name: str) -> None:
    theirs = TRITON.FindEnumTypeByName(full_name)
    ours = {v.name: v.number for v in ENUMS[full_name].values}
    assert ours == {name: v.number for name, v in theirs.values_by_name.items() if name in ours}
    assert set(ours) == set(theirs.values_by_name), "the enum has every value Triton's has"


def test_service_methods_match_tritons() -> None:
    ours = OURS.services_by_name["GRPCInferenceService"]
    theirs = TRITON.FindServiceByName("inference.GRPCInferenceService")
    assert [m.name for m in ours.methods] == RPCS
    for m in ours.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.full_name, m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                m.server_streaming) == (t.full_name, t.input_type.full_name, t.output_type.full_name,
                                        t.client_streaming, t.server_streaming)
    assert ours.methods_by_name["ModelStreamInfer"].client_streaming
    assert ours.methods_by_name["ModelStreamInfer"].server_streaming


def test_committed_modules_are_generated_from_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "set.pb"
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
                           f"--descriptor_set_out={out}", PROTO.name], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    compiled = _without_json_names(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0])
    committed = _without_json_names(descriptor_pb2.FileDescriptorProto.FromString(OURS.serialized_pb))
    assert committed == compiled, "inference.proto changed: run python -m edgerun.grpc.generate"


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    def strip(msgs):
        for m in msgs:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)
    strip(file.message_type)
    return file


def test_messages_load_beside_tritonclients_in_one_process() -> None:
    req = service_pb2.ModelInferRequest(model_name="digits", raw_input_contents=[b"\x00" * 4])
    req.inputs.add(name="x", datatype="FP32", shape=[1, 1]).parameters["k"].int64_param = 7
    got = inference_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert (got.model_name, got.inputs[0].shape, got.inputs[0].parameters["k"].int64_param) == ("digits", [1, 1], 7)
    assert type(got) is not type(req) and got.DESCRIPTOR.file.pool is not TRITON
