"""`kvserve bench --server`: the load goes to a running kvserve server over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvserve.bench.driver import StreamEvent
from kvserve.bench.workloads import RequestSpec
from kvserve.commands.remote import parse_target
from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


class GrpcClient:
    def __init__(self, server: str, api_key: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(parse_target(server))
        self.stub = KvServeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        request = pb.GenerateRequest(
            request_id=spec.request_id,
            prompt_token_ids=pb.TokenIds(ids=spec.prompt_token_ids),
            # ignore_eos: the workload, not the model, decides how long each answer is.
            sampling=pb.SamplingParams(
                temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True
            ),
        )
        async for msg in self.stub.Generate(request, metadata=self.metadata):
            yield StreamEvent(
                token_ids=list(msg.token_ids),
                finished=msg.finished,
                finish_reason=_FINISH.get(msg.finish_reason),
                cached_prompt_tokens=msg.usage.cached_prompt_tokens if msg.finished else 0,
            )

    async def load(self) -> dict[str, float]:
        reply = await self.stub.GetLoad(pb.GetLoadRequest(), metadata=self.metadata)
        load = dict(reply.metrics)
        load.update(kv_usage=reply.kv_usage, running=reply.running, waiting=reply.waiting)
        return load

    async def limits(self) -> tuple[int, int]:
        info = await self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata)
        return info.vocab_size, info.max_model_len

    async def close(self) -> None:
        await self.channel.close()
