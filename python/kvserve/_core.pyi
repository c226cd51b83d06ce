"""Typed stubs for kvserve._core, the Rust core's Python binding (rust/src/python/).

Kept exactly in step with the binding: tests/test_core_stubs.py checks both ways.
"""

from collections.abc import Sequence
from typing import TypeAlias, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "AtCapacityError",
    "ConfigError",
    "Core",
    "InvalidRequestError",
    "Plan",
    "PrefixIndex",
    "RequestTooLargeError",
    "StalePlanError",
    "StepOutput",
    "__version__",
    "block_hashes",
]
__version__: str

_TokenIds: TypeAlias = Sequence[int] | npt.NDArray[np.int64]

class InvalidRequestError(ValueError):
    """A bad request or commit field (the message names it)."""

class RequestTooLargeError(InvalidRequestError):
    """A request that could never run even alone in an empty cache (the message names the
    field)."""

class ConfigError(ValueError):
    """A bad Core(...) argument (the message names it)."""

class AtCapacityError(RuntimeError):
    """The waiting queue is full; nothing was queued."""

class StalePlanError(RuntimeError):
    """commit() for a plan that is not the latest uncommitted one."""

@final
class Plan:
    """One step's batch, as numpy arrays owned by the plan."""

    @property
    def id(self) -> int: ...
    @property
    def num_seqs(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_decodes(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def handles(self) -> npt.NDArray[np.uint64]: ...
    @property
    def input_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def positions(self) -> npt.NDArray[np.int64]: ...
    @property
    def slot_mapping(self) -> npt.NDArray[np.int64]: ...
    @property
    def query_start_loc(self) -> npt.NDArray[np.int32]: ...
    @property
    def seq_lens(self) -> npt.NDArray[np.int32]: ...
    @property
    def block_table(self) -> npt.NDArray[np.int32]: ...
    @property
    def logits_indices(self) -> npt.NDArray[np.int64]: ...
    @property
    def sample_handles(self) -> npt.NDArray[np.uint64]: ...
    @property
    def swap_out(self) -> npt.NDArray[np.int64]: ...
    @property
    def swap_in(self) -> npt.NDArray[np.int64]: ...
    @property
    def copies(self) -> npt.NDArray[np.int64]: ...
    @property
    def offloads(self) -> npt.NDArray[np.int64]:
        """(gpu, host) pairs: host prefix tier copies of idle cached GPU blocks. The GPU
        blocks are neither written nor reused before this plan's commit (the copies may
        overlap the forward); they must be complete when commit is called."""
    @property
    def loads(self) -> npt.NDArray[np.int64]:
        """(host, gpu) pairs: host prefix tier blocks loaded into fresh GPU blocks; they
        must land before the forward reads them."""
    @property
    def must_commit(self) -> bool:
        """True when this plan must be committed before the next schedule(): it has
        sequences, or host-tier copies whose completion the commit reports."""
    @property
    def continues_plan_id(self) -> int | None:
        """The previous plan's id when this plan is its forward one step on (same decode
        rows one position further, fed the tokens its commit took, same block table,
        nothing to swap or copy); None otherwise."""
    @property
    def advances_in_place(self) -> bool:
        """Decode-only, nothing to swap or copy, and every row's next position lies in the
        block its current one does and below max_model_len: the next step writes each
        row's K/V to the slot after this step's (a step run ahead may be launched)."""

@final
class StepOutput:
    """What one commit appended, and who finished."""

    @property
    def handles(self) -> npt.NDArray[np.uint64]: ...
    @property
    def token_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def finished_handles(self) -> npt.NDArray[np.uint64]: ...
    @property
    def finish_reasons(self) -> list[str]: ...
    @property
    def finished_ids(self) -> list[str]: ...
    @property
    def finished_cached_prompt_tokens(self) -> npt.NDArray[np.uint64]:
        """Prompt tokens each finished request had served from the prefix cache (aligned
        with finished_handles)."""

@final
class Core:
    """The KV-cache manager and scheduler."""

    def __new__(
        cls,
        num_gpu_blocks: int,
        block_size: int = 16,
        num_host_blocks: int = 0,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 4096,
        max_waiting: int = 4096,
        enable_prefix_caching: bool = True,
        preemption_mode: str = "auto",
        watermark: float = 0.01,
        kv_bytes_per_token: int = 0,
        flops_per_token: float = 0.0,
        swap_bytes_per_s: float = 25e9,
        prefill_flops_per_s: float = 1e14,
        finished_memory: int = 4096,
        evicted_memory: int | None = None,
        host_prefix_cache: bool = False,
        load_bytes_per_s: float = 25e9,
    ) -> Core: ...
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: _TokenIds,
        max_tokens: int,
        min_tokens: int = 0,
        stop_token_ids: _TokenIds | None = None,
        eos_token_id: int | None = None,
        ignore_eos: bool = False,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> int: ...
    def schedule(self) -> Plan: ...
    def commit(self, plan_id: int, sampled_token_ids: _TokenIds) -> StepOutput: ...
    def retained(self) -> dict[str, int]: ...
    def steady_outlook(
        self, token: int, max_steps: int
    ) -> tuple[int, npt.NDArray[np.int64]]: ...
    def run_steady(self, max_steps: int, token: int) -> int: ...
    def finish(self, request_id: str, reason: str) -> int | None:
        """End a live request; the prompt tokens it had served from the prefix cache, or
        None when the id is not live."""
    def abort(self, request_id: str) -> int | None:
        """Free everything a live request holds; its handle, or None when not live."""
    def fail_copies(self, plan_id: int) -> list[str]: ...
    def has_unfinished(self) -> bool: ...
    def metrics(self) -> dict[str, int | float]: ...
    def request_stats(self, request_id: str) -> dict[str, int | str]: ...
    def check_invariants(self) -> None: ...
    # KV events for routers: hashes are 16 little-endian bytes per block
    def enable_kv_events(self, capacity: int) -> None: ...
    def drain_kv_events(self) -> tuple[bool, int, bytes, bytes]: ...
    def kv_snapshot(self) -> tuple[int, bytes, bytes]: ...
    def waiting_prompt_tokens(self) -> int: ...
    @property
    def num_gpu_blocks(self) -> int: ...
    @property
    def num_free_gpu_blocks(self) -> int: ...
    @property
    def num_cached_gpu_blocks(self) -> int: ...
    @property
    def num_used_gpu_blocks(self) -> int: ...
    @property
    def num_host_blocks(self) -> int: ...
    @property
    def num_used_host_blocks(self) -> int: ...
    @property
    def num_cached_host_blocks(self) -> int: ...
    @property
    def host_prefix_cache(self) -> bool: ...
    @property
    def block_size(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_num_batched_tokens(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_swapped(self) -> int: ...


def block_hashes(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None
) -> bytes: ...

@final
class PrefixIndex:
    """The router's global prefix index: block hash -> replicas holding it."""

    def __new__(cls, max_blocks_per_replica: int = ...) -> PrefixIndex: ...
    def add_replica(self, name: str) -> int: ...
    def remove_replica(self, name: str) -> bool: ...
    def clear_replica(self, name: str) -> None: ...
    def store(self, name: str, hashes: bytes) -> int: ...
    def evict(self, name: str, hashes: bytes) -> int: ...
    def store_host(self, name: str, hashes: bytes) -> int: ...
    def evict_host(self, name: str, hashes: bytes) -> int: ...
    def host_blocks(self, name: str) -> int: ...
    def longest_prefixes(self, hashes: bytes) -> dict[str, int]: ...
    def match_prompt(
        self, token_ids: Sequence[int], block_size: int, cache_salt: str | None = None
    ) -> tuple[dict[str, int], int]: ...
    def match_prompt_tiers(
        self, token_ids: Sequence[int], block_size: int, cache_salt: str | None = None
    ) -> tuple[dict[str, tuple[int, int]], int]: ...
    def holds(self, name: str, hash: bytes) -> bool: ...
    def replica_stats(self, name: str) -> tuple[int, int]: ...
    def replicas(self) -> list[str]: ...
    def __len__(self) -> int: ...
