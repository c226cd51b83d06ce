"""The model runner: owns the weights and the paged KV cache; turns a plan into logits."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from kvserve.attention import kv_quant
from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.cuda_graphs import DecodeGraphs
from kvserve.host_tier import STAGING_BYTES, HostCopier, HostPool
from kvserve.model import Checkpoint, build_model
from kvserve.model.llama import Attention

if TYPE_CHECKING:
    from kvserve._core import Plan

log = logging.getLogger(__name__)
PREFILL_PROBE_TOKENS = 256  # the start-up prefill that measures the device's FLOP rate


@dataclass(frozen=True)
class StepInputs:
    """A step built by hand for the forward alone (bench/perplexity.py: one sequence's
    prefill chunk); the engine's steps are `_core.Plan`s, which carry the same columns."""

    input_ids: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    slot_mapping: npt.NDArray[np.int64]
    query_start_loc: npt.NDArray[np.int32]
    seq_lens: npt.NDArray[np.int32]
    block_table: npt.NDArray[np.int32]
    logits_indices: npt.NDArray[np.int64]
    num_decodes: int = 0


def host_tensor(table: np.ndarray) -> torch.Tensor:
    """A plan's read-only block table as a CPU tensor, without a copy where numpy can say
    "read-only" through DLPack (torch.from_numpy would warn about a non-writable array)."""
    try:
        return torch.from_dlpack(table)
    except (BufferError, TypeError):  # numpy too old to export read-only arrays
        return torch.from_numpy(np.array(table))


def _calloc_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed host tensor from calloc (numpy.zeros): the kernel maps zero pages as they are
    first touched, where torch.zeros writes every byte of a large pool up front."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, ckpt: Checkpoint, backend: AttentionBackend, device: torch.device,
                 dtype: torch.dtype, block_size: int, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int, kv_cache_bytes: int,
                 gpu_memory_utilization: float, swap_bytes: int,
                 enforce_eager: bool = False, kv_dtype: torch.dtype | None = None,
                 host_tier_bytes: int = 0, num_gpu_blocks_override: int | None = None) -> None:
        cfg = ckpt.config
        self.config, self.device, self.dtype, self.block_size = cfg, device, dtype, block_size
        self.kv_dtype = kv_dtype or dtype  # what the cache stores (--kv-cache-dtype)
        self.backend = backend
        self.model = build_model(ckpt, backend, max_model_len, dtype, device)
        self.kv_scales: list[kv_quant.KVScales] = []  # per layer, FP8 caches only
        if kv_quant.is_fp8(self.kv_dtype):
            self._calibrate_fp8(min(kv_quant.CALIBRATION_TOKENS, max_model_len,
                                    max_num_batched_tokens))
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        # K and V, all layers: what one cached token costs.
        self.kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
        self.block_bytes = self.kv_bytes_per_token * block_size
        # Swap and the host tier share one host pool (one accounting, the core's).
        self.num_host_tier_blocks = host_tier_bytes // self.block_bytes
        self.num_host_blocks = swap_bytes // self.block_bytes + self.num_host_tier_blocks
        staging = self._staging_bytes()
        if device.type == "cuda":
            budget = self._profile_cuda(max_num_batched_tokens, max_num_seqs, max_model_len,
                                        gpu_memory_utilization) - staging
        else:
            budget = kv_cache_bytes
        self.num_blocks = budget // self.block_bytes
        if num_gpu_blocks_override is not None:
            if device.type == "cuda" and num_gpu_blocks_override > self.num_blocks:
                raise ValueError(f"num_gpu_blocks_override: {num_gpu_blocks_override} blocks "
                                 f"do not fit; the device has room for {self.num_blocks}")
            self.num_blocks = num_gpu_blocks_override
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {budget} bytes hold no KV block "
                             f"(one block needs {self.block_bytes} bytes)")
        self.kv_caches = self._allocate(self.num_blocks, device)
        self.host_pool = HostPool(self.num_host_blocks, 2 * cfg.num_layers,
                                  self.block_bytes // (2 * cfg.num_layers),
                                  pin=device.type == "cuda")
        self.copier = HostCopier(self.kv_caches, self.host_pool, device, staging)
        # The host link's rates each way (bytes/s) and this device's prefill rate (FLOP/s),
        # measured for the core's load-or-recompute choice when the host tier is on.
        self.link_bytes_per_s: tuple[float, float] | None = None
        self.prefill_flops_per_s: float | None = None
        if self.num_host_tier_blocks:
            self.link_bytes_per_s = self.copier.measure_bandwidth()
            self.prefill_flops_per_s = self._measure_prefill_rate(
                min(PREFILL_PROBE_TOKENS, max_num_batched_tokens, max_model_len - 1))
            log.info("host link %.1f GB/s device->host, %.1f GB/s host->device; prefill "
                     "%.3g FLOP/s", self.link_bytes_per_s[0] / 1e9,
                     self.link_bytes_per_s[1] / 1e9, self.prefill_flops_per_s)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB), host pool %d blocks "
                 "(%d of them the host tier, %.1f MiB)", self.num_blocks, block_size,
                 self.num_blocks * self.block_bytes / 2**20, self.num_host_blocks,
                 self.num_host_tier_blocks, self.num_host_blocks * self.block_bytes / 2**20)
        self.graphs: DecodeGraphs | None = None
        # After execute(): the argmax of the returned logits when the step computed it on the
        # device (graph replays), else None. The sampler's greedy fast path takes it.
        self.last_greedy: torch.Tensor | None = None
        if device.type == "cuda" and not enforce_eager:
            if getattr(backend, "supports_cuda_graphs", False):
                self.graphs = DecodeGraphs(self.model, self.kv_caches, device, max_num_seqs,
                                           max_model_len, block_size)
                self.graphs.capture()
            else:
                log.info("no decode CUDA graphs: the %s attention backend is not capturable",
                         backend.name)

    def close(self) -> None:
        """Release the weights, caches and graphs now, not whenever the GC gets to them."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        self.copier.synchronize()
        self.host_pool.close()
        self.kv_caches = []
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _allocate(self, num_blocks: int, device: torch.device,
                  dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config
        dtype = dtype or self.kv_dtype
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, cfg.num_kv_heads,
                                            cfg.head_dim)

        def make() -> torch.Tensor:
            if device.type == "cpu":
                return _calloc_zeros(shape, dtype)
            return torch.zeros(shape, dtype=dtype, device=device)

        return [(make(), make()) for _ in range(cfg.num_layers)]

    def _staging_bytes(self) -> int:
        """Device memory the host copier stages copies in: a chunk of at most STAGING_BYTES
        (at least one block), nothing without a host pool."""
        if not self.num_host_blocks:
            return 0
        blocks = min(self.num_host_blocks, max(1, STAGING_BYTES // self.block_bytes))
        return blocks * self.block_bytes

    @torch.inference_mode()
    def _measure_prefill_rate(self, n: int) -> float:
        """FLOP/s of an n-token prefill on this device (best of two after a warm-up), counted
        the core's way (flops_per_token per token)."""
        blocks = (n + self.block_size - 1) // self.block_size
        caches = self._allocate(blocks, self.device)
        meta = _meta_for_one_prefill(n, self.block_size, self.device)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)
        best = float("inf")
        for rep in range(3):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.model(ids, positions, meta, caches)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if rep:
                best = min(best, time.perf_counter() - t0)
        return n * self.config.flops_per_token / max(best, 1e-9)

    @torch.inference_mode()
    def _calibrate_fp8(self, n: int) -> None:
        """Per layer and KV head FP8 scales from one n-token prefill of seeded random tokens
        into a model-dtype cache (the rule in attention/kv_quant.py, K's taken after the
        key rotation the FP8 cache stores K in); set on every layer."""
        gen = torch.Generator().manual_seed(kv_quant.CALIBRATION_SEED)
        ids = torch.randint(0, self.config.vocab_size, (n,), generator=gen).to(self.device)
        blocks = (n + self.block_size - 1) // self.block_size
        caches = self._allocate(blocks, self.device, dtype=self.dtype)
        meta = _meta_for_one_prefill(n, self.block_size, self.device)
        self.model(ids, torch.arange(n, device=self.device), meta, caches)
        for layer, (k, v) in zip(self.model.layers, caches):
            if getattr(self.backend, "layout", "NHD") == "HND":  # [blocks, Hkv, bs, D]
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            rows = (-1, *k.shape[-2:])  # [slots, Hkv, D]
            scales = kv_quant.KVScales(
                k=kv_quant.scales_from_absmax(
                    kv_quant.head_absmax(kv_quant.rotate_keys(k.reshape(rows)[:n]))),
                v=kv_quant.scales_from_absmax(kv_quant.head_absmax(v.reshape(rows)[:n])))
            attention = layer.self_attn
            assert isinstance(attention, Attention)
            attention.kv_scales = scales
            self.kv_scales.append(scales)

    def _profile_cuda(self, max_tokens: int, max_seqs: int, max_model_len: int,
                      utilization: float) -> int:
        """Bytes left for the KV cache after weights and a worst-case forward's activations."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        blocks = (max_tokens + self.block_size - 1) // self.block_size
        caches = self._allocate(blocks, self.device)
        meta = _meta_for_one_prefill(max_tokens, self.block_size, self.device)
        ids = torch.zeros(max_tokens, dtype=torch.long, device=self.device)
        # Positions wrap at max_model_len: the RoPE table holds no more (only shapes matter).
        positions = torch.arange(max_tokens, device=self.device) % max_model_len
        hidden = self.model(ids, positions, meta, caches)
        self.model.compute_logits(hidden[: min(max_seqs, max_tokens)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        cache_bytes = blocks * self.block_bytes
        del caches, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # other processes
        budget = int(total * utilization) - others - (peak - cache_bytes)
        if budget < self.block_bytes:
            raise RuntimeError(f"gpu_memory_utilization: {utilization} of {total} bytes leaves "
                               f"no room for the KV cache (weights + activations use {peak})")
        return budget

    @torch.inference_mode()
    def execute(self, plan: Plan, greedy_only: bool = False) -> torch.Tensor | None:
        """Host copies (swap-out, swap-in, host-tier loads and offloads, in that order on the
        copier's stream), block copies, then the forward; fp32 logits of sampled rows.
        The forward waits for the swaps and loads on the device; offloads run under it and
        `wait_copies` (before the commit) waits for them.

        greedy_only: the caller reads only last_greedy (every row greedy, no logprobs), so a
        decode graph may run the next step ahead (cuda_graphs.py) and overwrite the logits.
        """
        self.copier.to_host(plan.swap_out)
        self.copier.to_device(plan.swap_in)
        self.copier.to_device(plan.loads)
        self.copier.to_host(plan.offloads, gate=False)  # idle blocks: unwritten until commit
        self.copier.wait_ready()
        self._copy(plan.copies)
        self.last_greedy = None
        if plan.num_tokens == 0:
            return None
        if self.graphs is not None and self.graphs.can_run(plan):
            logits = self.graphs.run(plan, greedy_only)
            self.last_greedy = self.graphs.last_greedy
            return logits
        if self.graphs is not None:
            self.graphs.drop_ahead()
        return self.forward(plan)

    @torch.inference_mode()
    def forward(self, plan: Plan | StepInputs) -> torch.Tensor:
        """The eager forward of a step's tokens; fp32 logits of its logits_indices rows."""
        dev = self.device
        qsl = torch.from_numpy(plan.query_start_loc)
        seq_lens = torch.from_numpy(plan.seq_lens)
        nb = dev.type == "cuda"  # host->device copies overlap with the host work that follows
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(plan.slot_mapping).to(dev, non_blocking=nb),
            query_start_loc=qsl.to(dev, non_blocking=nb),
            seq_lens=seq_lens.to(dev, non_blocking=nb),
            block_table=host_tensor(plan.block_table).to(dev, non_blocking=nb),
            num_decodes=int(plan.num_decodes),
            max_query_len=int(np.diff(plan.query_start_loc).max()),
            max_seq_len=int(plan.seq_lens.max()),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        input_ids = torch.from_numpy(plan.input_ids).to(dev, non_blocking=nb)
        positions = torch.from_numpy(plan.positions).to(dev, non_blocking=nb)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        rows = torch.from_numpy(plan.logits_indices).to(dev, non_blocking=nb)
        return self.model.compute_logits(hidden[rows])

    def wait_copies(self) -> bool:
        """Wait for the host copies of the step just executed (the core's commit says they
        are done); False when one failed to finish in time (the caller fails them)."""
        late = self.copier.wait_done()
        for batch in late:
            log.error("host %s copy of %d blocks unfinished after %.1f s", batch.kind,
                      len(batch.pairs), self.copier.timeout_s)
        return not late

    def _copy(self, pairs: np.ndarray) -> None:
        if len(pairs) == 0:
            return
        src = torch.from_numpy(np.ascontiguousarray(pairs[:, 0])).to(self.device)
        dst = torch.from_numpy(np.ascontiguousarray(pairs[:, 1])).to(self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]


def _meta_for_one_prefill(n: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """A single n-token prefill over blocks 0.. (for memory profiling)."""
    qsl = torch.tensor([0, n], dtype=torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    blocks = (n + block_size - 1) // block_size
    return AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        query_start_loc=qsl.to(device), seq_lens=lens.to(device),
        block_table=torch.arange(blocks, dtype=torch.int32, device=device).unsqueeze(0),
        num_decodes=0, max_query_len=n, max_seq_len=n,
        query_start_loc_cpu=qsl, seq_lens_cpu=lens)
