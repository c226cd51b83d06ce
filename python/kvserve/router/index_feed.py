"""Each replica's StreamKvEvents applied to the router's PrefixIndex (Rust core).

A snapshot replaces what the index holds for the replica (its `kinds`, when present, name
each hash's tier: 1 GPU, 3 host); events must follow each other
by sequence number (a gap means a lost message: resubscribe for a fresh snapshot). When
the stream drops the replica leaves the index at once, and `connected` turns false so it
gets no work until a new stream's snapshot is in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from kvserve.router.replicas import Replica, ReplicaSet
from kvserve.server.proto import pb

log = logging.getLogger(__name__)

STORED, EVICTED, HOST_STORED, HOST_EVICTED = 1, 2, 3, 4


class IndexFeed:
    def __init__(self, index: Any, replicas: ReplicaSet | None = None) -> None:
        self.index = index  # kvserve._core.PrefixIndex
        self.replicas = replicas
        self.snapshots = 0
        self.events = 0

    def start(self, r: Replica) -> asyncio.Task[None]:
        return asyncio.ensure_future(self.follow(r))

    def forget(self, r: Replica) -> None:
        self.index.remove_replica(r.name)

    async def follow(self, r: Replica) -> None:
        assert self.replicas is not None
        md = self.replicas.upstream.metadata()
        call = r.stub.StreamKvEvents(pb.StreamKvEventsRequest(), metadata=md)
        next_seq = -1
        try:
            async for msg in call:  # an aio stream
                if msg.snapshot:
                    self.index.remove_replica(r.name)
                    self.index.add_replica(r.name)
                    if msg.kinds:
                        self.apply(r.name, msg.kinds, msg.block_hashes)
                    else:
                        self.index.store(r.name, msg.block_hashes)
                    next_seq = msg.seq + 1
                    self.snapshots += 1
                    r.connected = True
                    r.instance_id = msg.instance_id or r.instance_id
                    continue
                if msg.seq != next_seq:
                    log.warning(
                        "replica %s: event %d, expected %d; resubscribing",
                        r.name,
                        msg.seq,
                        next_seq,
                    )
                    break
                self.apply(r.name, msg.kinds, msg.block_hashes)
                next_seq += len(msg.kinds)
            why = "event stream ended"
        except grpc.aio.AioRpcError as exc:
            why = f"event stream: {exc.code().name}"
        finally:
            call.cancel()
        self.replicas.mark_down(r, why)

    def apply(self, name: str, kinds: bytes, hashes: bytes) -> None:
        # consecutive events of one kind go to the index in one call
        start = 0
        for i in range(1, len(kinds) + 1):
            if i == len(kinds) or kinds[i] != kinds[start]:
                chunk = hashes[start * 16 : i * 16]
                if kinds[start] == STORED:
                    self.index.store(name, chunk)
                elif kinds[start] == EVICTED:
                    self.index.evict(name, chunk)
                elif kinds[start] == HOST_STORED:
                    self.index.store_host(name, chunk)
                elif kinds[start] == HOST_EVICTED:
                    self.index.evict_host(name, chunk)
                start = i
