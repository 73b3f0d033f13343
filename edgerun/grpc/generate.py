"""Regenerate inference_pb2.py, inference_pb2.pyi and inference_pb2_grpc.py from inference.proto.

Run ``python -m edgerun.grpc.generate`` (needs grpcio-tools). The output is then made importable as part of
edgerun: the service module imports its messages package-relatively, and the messages are built in a
descriptor pool of their own, so they load beside another copy of the same protocol (tritonclient.grpc's)
in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "inference.proto"
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def main() -> int:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}", str(HERE / PROTO)]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    _edit(HERE / "inference_pb2.py", _DEFAULT_POOL, _OWN_POOL)
    _edit(HERE / "inference_pb2_grpc.py", "\nimport inference_pb2 as inference__pb2\n",
          "\nfrom . import inference_pb2 as inference__pb2\n")
    return 0


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path.name}: expected one {old.strip()!r} in protoc's output")
    path.write_text(text.replace(old, new))


if __name__ == "__main__":
    sys.exit(main())
