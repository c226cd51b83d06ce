"""gRPC glue for kvserve.v1.KvServe: method paths, a client stub, server registration.

Written by hand instead of generated (see __init__.py): it is a table of five methods.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from kvserve.server.proto import pb
from kvserve.server.proto.decode import deserializer

SERVICE_NAME = "kvserve.v1.KvServe"
GENERATE = f"/{SERVICE_NAME}/Generate"
TOKENIZE = f"/{SERVICE_NAME}/Tokenize"
MODEL_INFO = f"/{SERVICE_NAME}/ModelInfo"
GET_LOAD = f"/{SERVICE_NAME}/GetLoad"
STREAM_KV_EVENTS = f"/{SERVICE_NAME}/StreamKvEvents"


class KvServeStub:
    """Client stub; works on a `grpc.Channel` and on a `grpc.aio.Channel`."""

    # Each method is a sync or an aio multicallable, by the channel's kind.
    Generate: Any
    Tokenize: Any
    ModelInfo: Any
    GetLoad: Any

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.Generate = channel.unary_stream(
            GENERATE,
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        self.Tokenize = channel.unary_unary(
            TOKENIZE,
            request_serializer=pb.TokenizeRequest.SerializeToString,
            response_deserializer=pb.TokenizeResponse.FromString,
        )
        self.ModelInfo = channel.unary_unary(
            MODEL_INFO,
            request_serializer=pb.ModelInfoRequest.SerializeToString,
            response_deserializer=pb.ModelInfoResponse.FromString,
        )
        self.GetLoad = channel.unary_unary(
            GET_LOAD,
            request_serializer=pb.GetLoadRequest.SerializeToString,
            response_deserializer=pb.GetLoadResponse.FromString,
        )
        self.StreamKvEvents = channel.unary_stream(
            STREAM_KV_EVENTS,
            request_serializer=pb.StreamKvEventsRequest.SerializeToString,
            response_deserializer=pb.KvEvents.FromString,
        )


class KvServeServicer(Protocol):
    """What the server implements. Requests may arrive as decode.BadRequest (bad UTF-8)."""

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None: ...
    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...
    async def ModelInfo(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...
    async def GetLoad(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...
    def StreamKvEvents(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any: ...


def add_kvserve_servicer(servicer: KvServeServicer, server: grpc.aio.Server) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=deserializer(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize,
            request_deserializer=deserializer(pb.TokenizeRequest),
            response_serializer=pb.TokenizeResponse.SerializeToString,
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo,
            request_deserializer=deserializer(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfoResponse.SerializeToString,
        ),
        "GetLoad": grpc.unary_unary_rpc_method_handler(
            servicer.GetLoad,
            request_deserializer=deserializer(pb.GetLoadRequest),
            response_serializer=pb.GetLoadResponse.SerializeToString,
        ),
        "StreamKvEvents": grpc.unary_stream_rpc_method_handler(
            servicer.StreamKvEvents,
            request_deserializer=deserializer(pb.StreamKvEventsRequest),
            response_serializer=pb.KvEvents.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
