"""CUDA graphs for decode steps: capture once per padded batch size, replay each step.

A decode step launches a few hundred small kernels; on a small batch their launch gaps
cost more than the weights take to read. Captured graphs replay the whole forward (and
the logits of every row) as one launch. Only decode-only steps replay; anything else runs
eagerly. The attention backend must be capturable (`supports_cuda_graphs`): it may read no
host-side value that changes between steps, so the capture uses max_model_len as every
sequence's host-side length bound and the kernels read the true lengths on the device.

Run-ahead (greedy decode): the host's work between two steps (read the tokens, commit,
schedule, upload, launch) leaves the GPU idle between steps. When every sampled row is
greedy (the caller says so) and the core says no row's next position starts a new block
(`Plan.advances_in_place`: decode-only, nothing to swap or copy, every row's next position
in the block it is in and below max_model_len), `run` launches the next step right behind
this one: a small kernel turns this step's inputs into the next
one's on the device (the argmax as input id, every position and slot one on), then the same
graph replays. The core says whether the next plan is exactly that step
(`Plan.continues_plan_id`: the same rows, fed the tokens this step chose, positions and
slots one on, an unchanged block table, nothing to swap or copy). If so, its results are
already there (or on the way); if not, the step runs normally and the run-ahead results
are dropped. That is safe because a run-ahead step
writes K/V only to the slot after each row's last, inside a block the row still holds
(never a full block, so never one in the prefix cache); a row that ended meanwhile frees
that block only on the host, after the write is queued, and any later owner writes a slot
before it reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.model import decoder_ops

if TYPE_CHECKING:
    from kvserve._core import Plan

log = logging.getLogger(__name__)
_MAX_TABLE_UPLOAD = 1 << 20  # bytes of whole block-table rows worth one upload per step
# Greedy decode steps are launched ahead (module docstring) while this holds; tests turn it
# off to compare the tokens against plain steps.
RUN_AHEAD = True


@dataclass
class _Ahead:
    """The step launched ahead: the plan it continues, and the graph it replayed."""

    plan_id: int
    bs: int


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
        kv_caches: list[Any],
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
    ) -> None:
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        self.max_blocks = max_blocks
        # Static inputs: every replay reads these addresses; each step uploads into them.
        # They are typed views of one byte buffer, mirrored by one pinned host buffer, so a
        # step's inputs go up in a single copy: ids, positions, slots (int64), lengths and
        # the block table (int32), in that order.
        self._offsets = [0, 8 * n, 16 * n, 24 * n, 28 * n]
        table_bytes = n * max_blocks * 4
        self._dev = torch.zeros(28 * n + table_bytes, dtype=torch.uint8, device=device)
        self._host = torch.zeros(28 * n + table_bytes, dtype=torch.uint8).pin_memory()
        (self.input_ids, self.positions, self.slot_mapping, self.seq_lens,
         self.block_table) = self._views(self._dev, n)
        self._h_ids, self._h_pos, self._h_slots, self._h_lens, self._h_table = (
            t.numpy() for t in self._views(self._host, n))
        self._h_slots[:] = -1
        self._h_lens[:] = 1
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._uploaded = torch.cuda.Event()  # the host buffer is reused once this passed
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.last_greedy: torch.Tensor | None = None
        self._ahead: _Ahead | None = None
        self._h_greedy = torch.zeros(n, dtype=torch.int64).pin_memory()
        self._greedy_copied = torch.cuda.Event()
        self.steps_ahead_used = 0  # run-ahead steps that matched their plan (tests, metrics)

    def _views(self, buf: torch.Tensor, n: int) -> list[torch.Tensor]:
        o = self._offsets
        return [buf[o[0]:o[1]].view(torch.int64), buf[o[1]:o[2]].view(torch.int64),
                buf[o[2]:o[3]].view(torch.int64), buf[o[3]:o[4]].view(torch.int32),
                buf[o[4]:].view(torch.int32).view(n, self.max_blocks)]

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

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits of every row, and their argmax (the greedy tokens), on the device."""
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs),
                            self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return logits, decoder_ops.greedy(logits)

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
                logits, greedy = self._forward(bs)
            self.graphs[bs] = (graph, logits, greedy)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def close(self) -> None:
        """Drop the graphs (and their memory pool) and every reference to the caches."""
        if self._ahead is not None:
            torch.cuda.synchronize(self.device)  # a run-ahead replay may still be running
            self._ahead = None
        self.graphs.clear()
        self.model, self.kv_caches = None, []

    def drop_ahead(self) -> None:
        """Forget a step launched ahead (the next plan runs eagerly)."""
        self._ahead = None

    def can_run(self, plan: Plan) -> bool:
        n = int(plan.num_seqs)
        decode_only = int(plan.num_decodes) == n == int(plan.num_tokens)
        return 0 < n <= self.sizes[-1] and decode_only and plan.logits_indices.shape[0] == n

    def run(self, plan: Plan, greedy_only: bool = False) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; fp32 logits of its n rows.

        last_greedy is then their argmax (int64 [n]), computed in the graph: on the device,
        or on the host when the next step was launched ahead. greedy_only: the caller uses
        only last_greedy, not the logits (which a run-ahead step overwrites), so the next
        step may be launched ahead (see the module docstring).
        """
        n = int(plan.num_seqs)
        bs = next(s for s in self.sizes if s >= n)
        graph, logits, greedy = self.graphs[bs]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.bs == bs and plan.continues_plan_id == ahead.plan_id:
            self.steps_ahead_used += 1  # this step already ran (or is running)
        else:
            self._replay(plan, n, bs)
        if not (greedy_only and RUN_AHEAD and plan.advances_in_place):
            self.last_greedy = greedy[:n]
            return logits[:n]  # a decode-only step samples every row, in order
        from kvserve.kernels import decoder_kernels  # CUDA only; imported where it runs

        # This step's tokens to the host before the next replay overwrites them, then the
        # next step, its inputs advanced on the device.
        self._h_greedy[:n].copy_(greedy[:n], non_blocking=True)
        self._greedy_copied.record()
        decoder_kernels.advance_decode(self.input_ids[:bs], self.positions[:bs],
                                       self.slot_mapping[:bs], self.seq_lens[:bs], greedy)
        graph.replay()
        self._greedy_copied.synchronize()
        tokens = self._h_greedy[:n].numpy().copy()
        self._ahead = _Ahead(int(plan.id), bs)
        self.last_greedy = torch.from_numpy(tokens)
        return logits[:n]

    def _replay(self, plan: Plan, n: int, bs: int) -> None:
        """Upload the plan's inputs into the static buffers and replay graph bs."""
        width = plan.block_table.shape[1]
        self._uploaded.synchronize()  # the previous step's upload has left the host buffer
        self._h_ids[:n] = plan.input_ids
        self._h_pos[:n] = plan.positions
        self._h_slots[:n] = plan.slot_mapping
        self._h_lens[:n] = plan.seq_lens
        # Padding rows: no cache write (slot -1) and a one-token context in block 0.
        self._h_slots[n:bs] = -1
        self._h_lens[n:bs] = 1
        # One upload: the small arrays, then whole block-table rows [:bs] (entries past a
        # row's length are never read); a wide table goes up as its used columns only.
        whole_rows = bs * self.max_blocks * 4 <= _MAX_TABLE_UPLOAD
        if whole_rows:
            self._h_table[:n, :width] = plan.block_table
            self._h_table[n:bs, 0] = 0
        end = self._offsets[4] + (bs * self.max_blocks * 4 if whole_rows else 0)
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self._uploaded.record()
        if not whole_rows:
            table = torch.from_numpy(np.array(plan.block_table))  # read-only: copy
            self.block_table[:n, :width].copy_(table, non_blocking=False)
            self.block_table[n:bs, 0] = 0
        self.graphs[bs][0].replay()
