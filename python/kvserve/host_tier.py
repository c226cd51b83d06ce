"""The host KV pool on the runner side: how big it is, where its bytes live, and the copier
that moves blocks between the device cache and it.

The Rust core decides which block goes where (swap-out / swap-in of preempted requests, and
the host tier under the prefix cache: offload of an evicted block, load of a host hit); this
module only carries the bytes. One pool serves both uses, so one accounting (the core's)
covers them.

Size rule (`--host-kv-cache SIZE`): off on CPU unless given; on CUDA the default is a quarter
of the host's available memory, capped at `DEFAULT_CAP` (pinned pages cannot be swapped out,
so the default leaves most of the host to everything else). The pinned total (host tier plus
`--swap-space`) may be at most `PINNABLE_FRACTION` of MemAvailable; more is refused at start.

Layout: `[num_blocks, 2 * layers, bytes of one layer's K (or V) block]` as raw bytes, block
major, so one host block is one contiguous run and a run of consecutive host blocks is one
PCIe copy. Bytes come from the device cache tensors themselves, so the pool is exactly as
big as the KV dtype makes a block (fp8 blocks are half of bf16 ones).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.25  # of MemAvailable, the CUDA default host tier
DEFAULT_CAP = 32 * 2**30  # bytes, the CUDA default's ceiling
PINNABLE_FRACTION = 0.9  # of MemAvailable: the most the pinned pool may take
STAGING_BYTES = 256 * 2**20  # device staging for gathers/scatters, per copy chunk
COPY_TIMEOUT_S = 10.0  # a copy still unfinished this long after it was queued has failed
BANDWIDTH_PROBE_BYTES = 256 * 2**20
POLL_S = 50e-6  # between completion checks of a copy the commit waits for
# Tests set False to run every copy on the compute stream and wait for it (the synchronous
# reference that the overlapped copies must match).
OVERLAP = True


class HostTierError(RuntimeError):
    """The host pool cannot be set up as asked (raised at start, names the flag)."""


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (physical pages where it is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def host_tier_bytes(requested: int | None, device_type: str, available: int) -> int:
    """Bytes of the host tier: `requested` (None: the default for the device)."""
    if requested is not None:
        return requested
    if device_type != "cuda":
        return 0
    return min(int(available * DEFAULT_FRACTION), DEFAULT_CAP)


def check_pinnable(tier_bytes: int, swap_bytes: int, available: int) -> None:
    """Refuse a pinned pool the host cannot hold, naming the flags and what is available."""
    limit = int(available * PINNABLE_FRACTION)
    if tier_bytes + swap_bytes > limit:
        raise HostTierError(
            f"--host-kv-cache: {_gib(tier_bytes)} (plus --swap-space {_gib(swap_bytes)}) is "
            f"more host memory than can be pinned here: {_gib(available)} available, at most "
            f"{_gib(limit)} ({PINNABLE_FRACTION:.0%}) may be pinned; give a smaller "
            "--host-kv-cache (or 0 to turn the host tier off)")


def resolve_host_tier(requested: int | None, swap_bytes: int, prefix_caching: bool,
                      device_type: str) -> int:
    """Bytes of the host tier at start: the size rule, refused when the host cannot hold
    it beside the swap space. It is the prefix cache's second tier, so without prefix
    caching the default is off and asking for it is an error."""
    if not prefix_caching:
        if requested:
            raise HostTierError("--host-kv-cache: the host tier is the prefix cache's second "
                                "tier; it needs prefix caching (drop --no-prefix-caching)")
        return 0
    available = mem_available()
    tier = host_tier_bytes(requested, device_type, available)
    if tier:
        check_pinnable(tier, swap_bytes, available)
    return tier


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def cache_byte_views(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each layer's K then V cache as [num_blocks, bytes per block] uint8 (no copy)."""
    views = []
    for pair in kv_caches:
        for t in pair:
            views.append(t.view(t.shape[0], -1).view(torch.uint8))
    return views


class HostPool:
    """The host blocks: one uint8 tensor, pinned on CUDA (registered with cudaHostRegister:
    torch's pinned allocator rounds a request up to a power of two, doubling a large pool)."""

    def __init__(self, num_blocks: int, parts: int, part_bytes: int, pin: bool) -> None:
        self.num_blocks, self.parts, self.part_bytes = num_blocks, parts, part_bytes
        self.block_bytes = parts * part_bytes
        # Not zeroed: a host block is read only after a copy to the host wrote it.
        self.data = torch.from_numpy(np.empty((num_blocks, parts, part_bytes), dtype=np.uint8))
        self.pinned = False
        if pin and num_blocks:
            self._register()

    def _register(self) -> None:
        nbytes = self.data.numel()
        err = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise HostTierError(
                f"--host-kv-cache: pinning {_gib(nbytes)} of host KV blocks failed (CUDA error "
                f"{int(err)}); {_gib(mem_available())} of host memory is available; give a "
                "smaller --host-kv-cache or --swap-space")
        self.pinned = True

    def close(self) -> None:
        """Unpin and free the pool now (a closed engine may outlive its last reference)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.pinned = False
        self.data = torch.empty((0, self.parts, self.part_bytes), dtype=torch.uint8)


def runs(ids: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids, in order."""
    if len(ids) == 0:
        return
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(ids)]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, int(ids[s]), e - s


@dataclass
class CopyBatch:
    """The copies queued by one call, and the event that marks them complete."""
    kind: str  # "to_host" | "to_device"
    pairs: np.ndarray  # (src, dst) block ids as the plan gave them
    queued_at: float
    done: torch.cuda.Event | None = None  # None: completed when queued (CPU)


@dataclass
class HostCopier:
    """Moves blocks between the device cache and the host pool.

    On CUDA every copy runs on the copier's own stream, in the order queued (so a plan's
    lists keep their sequential meaning: a block copied out and then reused in the same
    step is read before it is overwritten). `wait_ready()` makes the compute stream wait
    only for the device-side part: the gathers of outgoing blocks (their PCIe transfer then
    runs under the forward) and all of an incoming copy (attention reads it). On CPU the
    same gathers and scatters run at once, without a stream.
    """
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    pool: HostPool
    device: torch.device
    staging_bytes: int = STAGING_BYTES
    timeout_s: float = COPY_TIMEOUT_S
    _pending: list[CopyBatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = cache_byte_views(self.kv_caches)
        if len(self.layers) != self.pool.parts or any(
                v.shape[1] != self.pool.part_bytes for v in self.layers):
            raise ValueError("host pool layout does not match the KV cache")
        # Blocks per chunk: the staging limit (device memory the copier may hold at once).
        self.chunk_blocks = max(1, min(self.staging_bytes // self.pool.block_bytes,
                                       max(self.pool.num_blocks, 1)))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging = torch.empty((self.chunk_blocks, self.pool.parts, self.pool.part_bytes),
                                   dtype=torch.uint8, device=self.device)
        self._ready: torch.cuda.Event | None = None  # what the compute stream must wait for

    # ---- queueing ------------------------------------------------------------------------

    def to_host(self, pairs: np.ndarray, gate: bool = True) -> None:
        """Copy device block p[0] to host block p[1] for every row p of pairs.

        gate: the compute stream's next `wait_ready` waits until the device blocks have
        been read (a swapped-out block may be reused in the same step). Offloads of idle
        prefix blocks, which nothing writes before the plan's commit, pass False: their
        transfer then never holds up the forward (`wait_done` before the commit)."""
        if len(pairs):
            self._queue("to_host", pairs, gate)

    def to_device(self, pairs: np.ndarray) -> None:
        """Copy host block p[0] to device block p[1] for every row p of pairs; the compute
        stream's next `wait_ready` waits for all of it."""
        if len(pairs):
            self._queue("to_device", pairs, True)

    def _queue(self, kind: str, pairs: np.ndarray, gate: bool) -> None:
        pairs = np.ascontiguousarray(pairs, dtype=np.int64)
        batch = CopyBatch(kind, pairs, time.monotonic())
        if self.stream is None or not OVERLAP:
            self._run(kind, pairs, gate)
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            return
        main = torch.cuda.current_stream(self.device)
        # Reads and writes of device blocks come after everything the forward queued so far.
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self._run(kind, pairs, gate)
            batch.done = torch.cuda.Event()
            batch.done.record(self.stream)
        self._pending.append(batch)

    def _run(self, kind: str, pairs: np.ndarray, gate: bool) -> None:
        for start in range(0, len(pairs), self.chunk_blocks):
            chunk = pairs[start:start + self.chunk_blocks]
            if kind == "to_host":
                self._gather(chunk[:, 0])
                if gate:  # the device blocks have been read: reusing them needs no more
                    self._mark_ready()
                for pos, host, n in runs(chunk[:, 1]):
                    self.pool.data[host:host + n].copy_(self.staging[pos:pos + n],
                                                        non_blocking=self.cuda)
            else:
                for pos, host, n in runs(chunk[:, 0]):
                    self.staging[pos:pos + n].copy_(self.pool.data[host:host + n],
                                                    non_blocking=self.cuda)
                self._scatter(chunk[:, 1])
                self._mark_ready()

    def _device_ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)

    def _gather(self, gpu_ids: np.ndarray) -> None:
        ids, n = self._device_ids(gpu_ids), len(gpu_ids)
        for j, layer in enumerate(self.layers):
            self.staging[:n, j].copy_(layer.index_select(0, ids))

    def _scatter(self, gpu_ids: np.ndarray) -> None:
        ids, n = self._device_ids(gpu_ids), len(gpu_ids)
        for j, layer in enumerate(self.layers):
            layer.index_copy_(0, ids, self.staging[:n, j])

    def _mark_ready(self) -> None:
        if self.stream is not None and OVERLAP:
            self._ready = torch.cuda.Event()
            self._ready.record(self.stream)

    # ---- ordering and completion ---------------------------------------------------------

    def wait_ready(self) -> None:
        """Order the compute stream after the device-side part of every copy queued so far
        (no host wait): attention never reads a block before it arrives, and a block being
        copied out is never overwritten before it has been read."""
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def wait_done(self) -> list[CopyBatch]:
        """Wait until every queued copy has completed, at most `timeout_s` after it was
        queued; return the copies that had not (the caller fails them). Nothing stays
        pending afterwards."""
        late = []
        for b in self._pending:
            deadline = b.queued_at + self.timeout_s
            while b.done is not None and not b.done.query():
                if time.monotonic() > deadline:
                    late.append(b)
                    break
                time.sleep(POLL_S)
        self._pending.clear()
        return late

    def synchronize(self) -> None:
        """Wait for every queued copy (tests, bandwidth probes, close)."""
        if self.stream is not None:
            self.stream.synchronize()
        self._pending.clear()

    # ---- bandwidth -----------------------------------------------------------------------

    def measure_bandwidth(self, probe_bytes: int = BANDWIDTH_PROBE_BYTES,
                          reps: int = 3) -> tuple[float, float]:
        """(device->host, host->device) bytes/s between the device and this pool's own
        memory (pinned on CUDA), best of `reps` copies of up to `probe_bytes`."""
        flat = self.pool.data.view(-1)
        n = min(probe_bytes, flat.numel())
        if n == 0:
            return 0.0, 0.0
        host = flat[:n]
        dev = torch.empty(n, dtype=torch.uint8, device=self.device)
        return (self._best_rate(host, dev, reps), self._best_rate(dev, host, reps))

    def _best_rate(self, dst: torch.Tensor, src: torch.Tensor, reps: int) -> float:
        best = float("inf")
        dst.copy_(src)  # warm-up: first-touch pages, driver mappings
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), \
                    torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                dst.copy_(src)
                seconds = time.perf_counter() - t0
            best = min(best, max(seconds, 1e-9))
        return dst.numel() / best
