"""The model runner: owns the weights and the paged KV cache; turns a plan into logits."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from kvserve.attention import kv_quant
from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.cuda_graphs import DecodeGraphs
from kvserve.model import Checkpoint, build_model
from kvserve.model.llama import Attention

log = logging.getLogger(__name__)


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
                 enforce_eager: bool = False, kv_dtype: torch.dtype | None = None) -> None:
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
        if device.type == "cuda":
            budget = self._profile_cuda(max_num_batched_tokens, max_num_seqs, max_model_len,
                                        gpu_memory_utilization)
        else:
            budget = kv_cache_bytes
        self.num_blocks = budget // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory: {budget} bytes hold no KV block "
                             f"(one block needs {self.block_bytes} bytes)")
        self.num_host_blocks = swap_bytes // self.block_bytes
        self.kv_caches = self._allocate(self.num_blocks, device, pin=False)
        # Host blocks are read only after a swap-out wrote them: no need to zero them.
        self.host_caches = (self._allocate(self.num_host_blocks, torch.device("cpu"),
                                           pin=device.type == "cuda", zeroed=False)
                            if self.num_host_blocks else [])
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB), host swap %d blocks",
                 self.num_blocks, block_size, self.num_blocks * self.block_bytes / 2**20,
                 self.num_host_blocks)
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
        self.kv_caches, self.host_caches = [], []
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _allocate(self, num_blocks: int, device: torch.device, pin: bool, zeroed: bool = True,
                  dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config
        dtype = dtype or self.kv_dtype
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, cfg.num_kv_heads,
                                            cfg.head_dim)

        def make() -> torch.Tensor:
            if zeroed and device.type == "cpu" and not pin:
                return _calloc_zeros(shape, dtype)
            alloc = torch.zeros if zeroed else torch.empty
            return alloc(shape, dtype=dtype, device=device, pin_memory=pin)

        return [(make(), make()) for _ in range(cfg.num_layers)]

    @torch.inference_mode()
    def _calibrate_fp8(self, n: int) -> None:
        """Per layer and KV head FP8 scales from one n-token prefill of seeded random tokens
        into a model-dtype cache (the rule in attention/kv_quant.py, K's taken after the
        key rotation the FP8 cache stores K in); set on every layer."""
        gen = torch.Generator().manual_seed(kv_quant.CALIBRATION_SEED)
        ids = torch.randint(0, self.config.vocab_size, (n,), generator=gen).to(self.device)
        blocks = (n + self.block_size - 1) // self.block_size
        caches = self._allocate(blocks, self.device, pin=False, dtype=self.dtype)
        meta = _meta_for_one_prefill(n, self.block_size, self.device)
        self.model(ids, torch.arange(n, device=self.device), meta, caches)
        for layer, (k, v) in zip(self.model.layers, caches):
            rows = (-1, *k.shape[-2:])  # the torch layout: [slots, Hkv, D]
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
        caches = self._allocate(blocks, self.device, pin=False)
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
    def execute(self, plan: Any, greedy_only: bool = False) -> torch.Tensor | None:
        """Swaps out, swaps in, block copies, then the forward; fp32 logits of sampled rows.

        greedy_only: the caller reads only last_greedy (every row greedy, no logprobs), so a
        decode graph may run the next step ahead (cuda_graphs.py) and overwrite the logits.
        """
        self._swap(plan.swap_out, to_host=True)
        self._swap(plan.swap_in, to_host=False)
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

    def _swap(self, pairs: np.ndarray, to_host: bool) -> None:
        if len(pairs) == 0:
            return
        src_ids = torch.from_numpy(np.ascontiguousarray(pairs[:, 0]))
        dst_ids = torch.from_numpy(np.ascontiguousarray(pairs[:, 1]))
        gpu_ids, host_ids = (src_ids, dst_ids) if to_host else (dst_ids, src_ids)
        gpu_ids = gpu_ids.to(self.device)
        for gpu, host in zip(self.kv_caches, self.host_caches):
            for g, h in zip(gpu, host):
                if to_host:
                    h[host_ids] = g[gpu_ids].to("cpu")
                else:
                    g[gpu_ids] = h[host_ids].to(self.device, non_blocking=True)

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
