"""CUDA graphs for decode steps: capture once per padded batch size, replay each step.

A decode step launches a few hundred small kernels; on a small batch their launch gaps
cost more than the weights take to read. Captured graphs replay the whole forward (and
the logits of every row) as one launch. Only decode-only steps replay; anything else runs
eagerly. The attention backend must be capturable (`supports_cuda_graphs`): it may read no
host-side value that changes between steps, so the capture uses max_model_len as every
sequence's host-side length bound and the kernels read the true lengths on the device.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from kvserve.attention.base import AttentionMetadata

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(sizes)


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
    ) -> None:
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        # Static inputs: every replay reads these addresses; each step copies into them.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_table = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Host staging, pinned so the per-step upload is one asynchronous copy per array.
        self._host_ids = torch.zeros(n, dtype=torch.long).pin_memory()
        self._host_pos = torch.zeros(n, dtype=torch.long).pin_memory()
        self._host_slots = torch.zeros(n, dtype=torch.long).pin_memory()
        self._host_lens = torch.zeros(n, dtype=torch.int32).pin_memory()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs],
            num_decodes=bs,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((bs,), self.max_model_len, dtype=torch.int32),
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs),
                            self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the largest size first so smaller graphs reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(self.sizes[-1])  # warm-up: kernels compiled, workspaces made
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bs)
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def close(self) -> None:
        """Drop the graphs (and their memory pool) and every reference to the caches."""
        self.graphs.clear()
        self.model, self.kv_caches = None, []

    def can_run(self, plan: Any) -> bool:
        n = int(plan.num_seqs)
        decode_only = int(plan.num_decodes) == n == int(plan.num_tokens)
        return 0 < n <= self.sizes[-1] and decode_only and plan.logits_indices.shape[0] == n

    def run(self, plan: Any) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; fp32 logits of its n rows."""
        n = int(plan.num_seqs)
        bs = next(s for s in self.sizes if s >= n)
        width = plan.block_table.shape[1]
        self._host_ids[:n] = torch.from_numpy(plan.input_ids)
        self._host_pos[:n] = torch.from_numpy(plan.positions)
        self._host_slots[:n] = torch.from_numpy(plan.slot_mapping)
        self._host_lens[:n] = torch.from_numpy(plan.seq_lens)
        # Padding rows: no cache write (slot -1) and a one-token context in block 0.
        self._host_slots[n:bs] = -1
        self._host_lens[n:bs] = 1
        self.input_ids[:bs].copy_(self._host_ids[:bs], non_blocking=True)
        self.positions[:bs].copy_(self._host_pos[:bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(self._host_slots[:bs], non_blocking=True)
        self.seq_lens[:bs].copy_(self._host_lens[:bs], non_blocking=True)
        table = torch.from_numpy(np.ascontiguousarray(plan.block_table))
        self.block_table[:n, :width].copy_(table, non_blocking=False)
        self.block_table[n:bs, 0] = 0
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]  # a decode-only step samples every row, in order
