"""KV events for routers: the engine's prefix-cache event log fanned out to subscribers.

The step thread drains the core's bounded log after every step and hands the batch to the
event loop; each subscriber keeps a bounded queue of batches. A subscriber starts with a
snapshot (every block hash cached, as of a sequence number) and then gets live batches,
skipping events the snapshot already covers. Event kinds: 1 stored on the GPU, 2 evicted
from it, 3 stored in the host tier, 4 evicted from it. A snapshot lists the GPU hashes
then the host tier's; when the host part is not empty its `kinds` names each hash's tier
(1 or 3), else it is empty (every hash on the GPU). A subscriber whose queue fills, or every
subscriber when the core's log overflowed, is resynced with a fresh snapshot: the engine
never waits for a reader and memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvserve.server.proto import pb

log = logging.getLogger(__name__)

CORE_LOG_CAPACITY = 1 << 16  # events between two drains (one step) before a resync
SUBSCRIBER_QUEUE_BATCHES = 1024  # steps a subscriber may fall behind before a resync
HASH_BYTES = 16
GPU_STORED, HOST_STORED = 1, 3


def snapshot_fields(gpu: bytes, host: bytes) -> dict[str, bytes]:
    """A snapshot message's hashes and, with a host part, each hash's tier."""
    if not host:
        return {"block_hashes": gpu}
    kinds = bytes([GPU_STORED]) * (len(gpu) // HASH_BYTES) + bytes([HOST_STORED]) * (
        len(host) // HASH_BYTES
    )
    return {"block_hashes": gpu + host, "kinds": kinds}


class KvEventSource(Protocol):
    def enable_kv_events(self, capacity: int) -> None: ...
    def drain_kv_events(self) -> tuple[bool, int, bytes, bytes]: ...
    def kv_snapshot(self) -> tuple[int, bytes, bytes]: ...


@dataclass(eq=False)  # identity: subscribers live in a set
class _Subscriber:
    max_batches: int
    batches: collections.deque[tuple[int, bytes, bytes]] = field(default_factory=collections.deque)
    need_snapshot: bool = True
    covered_seq: int = 0  # events up to here are in the last snapshot sent
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    resyncs: int = 0

    def offer(self, resync: bool, first_seq: int, kinds: bytes, hashes: bytes) -> None:
        if resync or len(self.batches) >= self.max_batches:
            self.batches.clear()
            self.need_snapshot = True
        elif kinds:
            self.batches.append((first_seq, kinds, hashes))
        self.wake.set()


class KvEventHub:
    def __init__(
        self,
        source: KvEventSource,
        instance_id: str,
        block_size: int,
        queue_batches: int = SUBSCRIBER_QUEUE_BATCHES,
        core_capacity: int = CORE_LOG_CAPACITY,
    ) -> None:
        self.source = source
        self.instance_id = instance_id
        self.block_size = block_size
        self.queue_batches = queue_batches
        self._subs: set[_Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        source.enable_kv_events(core_capacity)
        self.resyncs = 0  # snapshots sent after the first, all subscribers

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def on_step(self, _stats: Any) -> None:
        """Engine step listener (step thread): drain the core's log, hand it to the loop."""
        resync, first_seq, kinds, hashes = self.source.drain_kv_events()
        if not self._subs or self._loop is None or (not kinds and not resync):
            return
        self._loop.call_soon_threadsafe(self._fan_out, resync, first_seq, kinds, hashes)

    def _fan_out(self, resync: bool, first_seq: int, kinds: bytes, hashes: bytes) -> None:
        for sub in self._subs:
            sub.offer(resync, first_seq, kinds, hashes)

    def _message(self, **fields: Any) -> pb.KvEvents:
        return pb.KvEvents(instance_id=self.instance_id, block_size=self.block_size, **fields)

    async def subscribe(self) -> AsyncIterator[pb.KvEvents]:
        """Snapshot, then live batches, until the caller stops iterating."""
        sub = _Subscriber(self.queue_batches)
        self._subs.add(sub)  # before the snapshot: nothing drained after it is missed
        first = True
        try:
            while True:
                if sub.need_snapshot:
                    sub.need_snapshot = False
                    seq, gpu, host = await asyncio.to_thread(self.source.kv_snapshot)
                    sub.covered_seq = seq
                    if not first:
                        self.resyncs += 1
                    first = False
                    yield self._message(snapshot=True, seq=seq, **snapshot_fields(gpu, host))
                    continue
                if not sub.batches:
                    sub.wake.clear()
                    await sub.wake.wait()
                    continue
                first_seq, kinds, hashes = sub.batches.popleft()
                skip = max(0, sub.covered_seq + 1 - first_seq)
                if skip >= len(kinds):
                    continue
                yield self._message(
                    seq=first_seq + skip,
                    kinds=kinds[skip:],
                    block_hashes=hashes[skip * HASH_BYTES :],
                )
        finally:
            self._subs.discard(sub)
