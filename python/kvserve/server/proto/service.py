"""gRPC glue for kvserve.v1.KvServe: method paths, a client stub, server registration.

Written by hand instead of generated (see __init__.py): it is a table of five methods
(`METHODS`) that the stub and the registration both read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from kvserve.server.proto import pb
from kvserve.server.proto.decode import deserializer

SERVICE_NAME = "kvserve.v1.KvServe"


@dataclass(frozen=True)
class Method:
    """One RPC of the service: its name, whether it streams responses, and its messages."""

    name: str
    streams: bool
    request: type[Message]
    response: type[Message]

    @property
    def path(self) -> str:
        return f"/{SERVICE_NAME}/{self.name}"


METHODS = (
    Method("Generate", True, pb.GenerateRequest, pb.GenerateResponse),
    Method("Tokenize", False, pb.TokenizeRequest, pb.TokenizeResponse),
    Method("ModelInfo", False, pb.ModelInfoRequest, pb.ModelInfoResponse),
    Method("GetLoad", False, pb.GetLoadRequest, pb.GetLoadResponse),
    Method("StreamKvEvents", True, pb.StreamKvEventsRequest, pb.KvEvents),
)


class KvServeStub:
    """Client stub; works on a `grpc.Channel` and on a `grpc.aio.Channel`."""

    # Each method is a sync or an aio multicallable, by the channel's kind.
    Generate: Any
    Tokenize: Any
    ModelInfo: Any
    GetLoad: Any
    StreamKvEvents: Any

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        for m in METHODS:
            call = channel.unary_stream if m.streams else channel.unary_unary
            setattr(self, m.name, call(m.path, request_serializer=m.request.SerializeToString,
                                       response_deserializer=m.response.FromString))


class KvServeServicer(Protocol):
    """What the server implements. Requests may arrive as decode.BadRequest (bad UTF-8)."""

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None: ...
    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...
    async def ModelInfo(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...
    async def GetLoad(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...
    def StreamKvEvents(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...


def add_kvserve_servicer(servicer: KvServeServicer, server: grpc.aio.Server) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for m in METHODS:
        handler = (grpc.unary_stream_rpc_method_handler if m.streams
                   else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = handler(getattr(servicer, m.name),
                                   request_deserializer=deserializer(m.request),
                                   response_serializer=m.response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
