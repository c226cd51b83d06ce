"""The cuda attention backend: NVRTC-compiled paged kernels (python/kvserve/kernels/).

A step's batch is decodes first, then prefills: the decode part runs the decode tiling
(GQA heads of one token per warp, split-KV when the batch is small), the prefill part the
prefill tiling; both are the same kernel source. On sm_90 with head_dim 128 the prefill part
can go to the wgmma kernel instead (paged_prefill_sm90.cu, when ops.SM90_PREFILL_ENABLED).
No host synchronisation: host-side sizes come from meta's *_cpu tensors and ints.
On sm_90 the cache write and the decode part launch with programmatic dependent launch
(kernels.fused.PDL_ATTENTION, KVSERVE_PDL_ATTN); kv_written=True skips the cache write
(the fused rope_qkv kernel already stored k and v).
"""

from __future__ import annotations

import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.kernels import fused, ops
from kvserve.kernels.launcher import CudaUnavailableError, cuda_unavailable_reason

# Chosen by measurement on H100 (docs/architecture.md, "Kernels"; benches/RESULTS.md).
DEFAULT_LAYOUT = "HND"


class CudaAttentionBackend:
    name = "cuda"
    # Decode launches read only device-side lengths plus host bounds that a capture can fix
    # (kvserve.cuda_graphs), so decode steps can be captured and replayed.
    supports_cuda_graphs = True

    def __init__(self, layout: str = DEFAULT_LAYOUT) -> None:
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise CudaUnavailableError(f"the cuda attention backend cannot run here: {reason}")
        if layout not in ops.LAYOUTS:
            raise ValueError(f"layout must be one of {ops.LAYOUTS}, got {layout!r}")
        self.layout = layout
        # griddepcontrol exists from sm_90 on; elsewhere the kernels launch plainly.
        self._pdl_arch = torch.cuda.get_device_capability()[0] >= 9

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        if self.layout == "NHD":
            return (num_blocks, block_size, num_kv_heads, head_dim)
        return (num_blocks, num_kv_heads, block_size, head_dim)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_written: bool = False,
    ) -> torch.Tensor:
        pdl = fused.PDL_ATTENTION and self._pdl_arch
        if not kv_written:
            ops.cache_write(k, v, k_cache, v_cache, meta.slot_mapping, self.layout, pdl=pdl)
        if q.stride(2) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or q.data_ptr() % 16:
            q = q.contiguous()  # the prefill tiling copies Q rows with 16-byte cp.async
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd, ns = meta.num_decodes, meta.num_seqs
        n_real = int(meta.query_start_loc_cpu[ns]) if ns else 0
        if n_real < q.shape[0]:
            out[n_real:].zero_()  # padding rows (slot -1) get defined values
        common = {
            "k_cache": k_cache,
            "v_cache": v_cache,
            "layout": self.layout,
            "block_table": meta.block_table,
            "query_start_loc": meta.query_start_loc,
            "seq_lens": meta.seq_lens,
            "out": out,
            "scale": scale,
        }
        if nd:
            ops.paged_attention(
                q,
                seq_begin=0,
                seq_end=nd,
                max_query_len=1,
                max_seq_len=int(meta.seq_lens_cpu[:nd].max()),
                config=ops.DECODE_CONFIG,
                first_token=0,
                pdl=pdl,
                **common,
            )
        use_sm90 = (
            ops.SM90_PREFILL_ENABLED
            and meta.max_query_len > 1  # 1-token chunks keep the split-KV path
            and ops.sm90_prefill_supported(q, out)
        )
        if ns > nd and use_sm90:
            # Hopper wgmma kernel: only where measured correct and faster (kernels/ops.py).
            ops.paged_prefill_sm90(
                q, seq_begin=nd, seq_end=ns, max_query_len=meta.max_query_len, **common
            )
        elif ns > nd:
            ops.paged_attention(
                q,
                seq_begin=nd,
                seq_end=ns,
                max_query_len=meta.max_query_len,
                max_seq_len=meta.max_seq_len,
                config=ops.PREFILL_CONFIG,
                # A prefill part of 1-token chunks may still split; partials index from here.
                first_token=int(meta.query_start_loc_cpu[nd]),
                **common,
            )
        return out
