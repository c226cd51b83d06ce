"""The cuda attention backend: NVRTC-compiled paged kernels (python/kvserve/kernels/).

A step's batch is decodes first, then prefills: the decode part runs the decode tiling
(GQA heads of one token per warp, split-KV when the batch is small), the prefill part the
prefill tiling; both are the same kernel source. On sm_90 with head_dim 128 the prefill part
goes to the Hopper kernels instead (kernels/prefill_sm90.py).
An FP8 (e4m3) cache: the cache write quantizes with the layer's scales and the decode and
mma.sync prefill tilings dequantize in registers (kernels/paged_attention.cu); the Hopper
prefill kernels do not read FP8, so FP8 prefills run the mma.sync tiling. FP8 is refused at
start (kv_cache_refusal) below sm_89 and for head sizes the kernels lack.
No host synchronisation: host-side sizes come from meta's *_cpu tensors and ints.
On sm_90 the cache write and the decode part launch with programmatic dependent launch;
kv_written=True skips the cache write (rope_qkv in kernels/decoder_kernels.py already
stored k and v).
"""

from __future__ import annotations

import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.attention.kv_quant import KVScales, is_fp8, kv_dtype_name, rotate_keys
from kvserve.kernels import prefill_sm90
from kvserve.kernels.cache_write import cache_write
from kvserve.kernels.launcher import CudaUnavailableError, cuda_unavailable_reason
from kvserve.kernels.paged_attention import (
    DECODE_CONFIG,
    DECODE_CONFIG_FP8,
    PREFILL_CONFIG,
    PREFILL_CONFIG_FP8,
    paged_attention,
)
from kvserve.kernels.paged_kv import LAYOUTS, PagedKV
from kvserve.kernels.validate import FP8_HEAD_DIMS, FP8_MIN_CAPABILITY

# Both layouts measured equal (docs/architecture.md, "KV layout"; benches/RESULTS.md).
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
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.capability = torch.cuda.get_device_capability()
        # griddepcontrol exists from sm_90 on; elsewhere the kernels launch plainly.
        self._pdl_arch = self.capability[0] >= 9

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        if self.layout == "NHD":
            return (num_blocks, block_size, num_kv_heads, head_dim)
        return (num_blocks, num_kv_heads, block_size, head_dim)

    def kv_cache_refusal(self, kv_dtype: torch.dtype, model_dtype: torch.dtype,
                         head_dim: int) -> str | None:
        if is_fp8(kv_dtype):
            if tuple(self.capability) < FP8_MIN_CAPABILITY:
                major, minor = self.capability
                return (f"the cuda attention kernels read an FP8 KV cache from compute "
                        f"capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} on "
                        f"(e4m3 conversions); this device is {major}.{minor}: use "
                        f"--kv-cache-dtype auto")
            if head_dim not in FP8_HEAD_DIMS:
                return (f"the cuda attention kernels read an FP8 KV cache for head sizes "
                        f"{', '.join(map(str, FP8_HEAD_DIMS))}, not {head_dim}: use "
                        f"--kv-cache-dtype auto")
            if model_dtype not in (torch.bfloat16, torch.float16):
                return (f"the cuda attention kernels need a bf16 or fp16 model, got "
                        f"{kv_dtype_name(model_dtype)}")
            return None
        if kv_dtype != model_dtype:
            return (f"the cuda attention kernels read the KV cache in the model dtype "
                    f"({kv_dtype_name(model_dtype)}); use --kv-cache-dtype auto or --dtype "
                    f"{kv_dtype_name(kv_dtype)}")
        return None

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
        kv_scales: KVScales | None = None,
    ) -> torch.Tensor:
        fp8 = is_fp8(k_cache.dtype)
        if fp8 != (kv_scales is not None):
            raise ValueError("kv_scales: given exactly when the KV cache is FP8")
        ks, vs = (kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)
        pdl = self._pdl_arch
        if fp8:  # the FP8 cache holds K rotated (kv_quant.rotate_keys); q.k is unchanged
            q = rotate_keys(q)
            if not kv_written:
                k = rotate_keys(k)
        if not kv_written:
            cache_write(k, v, k_cache, v_cache, meta.slot_mapping, self.layout, pdl=pdl,
                        k_scale=ks, v_scale=vs)
        if q.stride(2) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or q.data_ptr() % 16:
            q = q.contiguous()  # the prefill tiling copies Q rows with 16-byte cp.async
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd, ns = meta.num_decodes, meta.num_seqs
        n_real = int(meta.query_start_loc_cpu[ns]) if ns else 0
        if n_real < q.shape[0]:
            out[n_real:].zero_()  # padding rows (slot -1) get defined values
        kv = PagedKV(
            k_cache, v_cache, self.layout, meta.block_table, meta.query_start_loc, meta.seq_lens,
            ks, vs,
        )
        if nd:
            paged_attention(
                q,
                kv,
                out,
                scale,
                seq_begin=0,
                seq_end=nd,
                max_query_len=1,
                max_seq_len=int(meta.seq_lens_cpu[:nd].max()),
                config=DECODE_CONFIG_FP8 if fp8 else DECODE_CONFIG,
                first_token=0,
                pdl=pdl,
            )
        if ns == nd:
            return out
        if meta.max_query_len > 1 and not fp8 and prefill_sm90.supported(q, out):
            # 1-token chunks keep the split-KV path below.
            prefill_sm90.paged_prefill_sm90(
                q, kv, out, scale, seq_begin=nd, seq_end=ns, max_query_len=meta.max_query_len
            )
        else:
            paged_attention(
                q,
                kv,
                out,
                scale,
                seq_begin=nd,
                seq_end=ns,
                max_query_len=meta.max_query_len,
                max_seq_len=meta.max_seq_len,
                config=PREFILL_CONFIG_FP8 if fp8 else PREFILL_CONFIG,
                # A prefill part of 1-token chunks may still split; partials index from here.
                first_token=int(meta.query_start_loc_cpu[nd]),
            )
        return out
