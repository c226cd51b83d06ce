"""The kvserve.v1 API: the shipped .proto, its committed message stubs and the gRPC glue.

kvserve_pb2.py is generated from kvserve/v1/kvserve.proto by `python -m
kvserve.server.proto.regen` and committed. It is generated with libprotoc 26.x (grpcio-tools
1.63), whose code runs on every protobuf runtime >= 5.26, the floor pyproject declares; a
newer protoc would stamp a runtime-version check that older runtimes refuse. The service
glue (service.py) is written by hand for the same reason: grpcio-tools' *_pb2_grpc.py
refuses to import under a grpcio older than the tools that generated it.
"""

from pathlib import Path

from kvserve.server.proto import kvserve_pb2 as pb

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = PROTO_ROOT / "kvserve" / "v1" / "kvserve.proto"

__all__ = ["PROTO_FILE", "PROTO_ROOT", "pb"]
