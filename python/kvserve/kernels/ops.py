"""Typed Python entry points for the kernels: validate, pick a configuration, launch.

Nothing here synchronises with the device: sizes come from host-side arguments.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache

import torch

from .launcher import F32, I32, I64, PTR, Kernel, _check, _driver, load_kernel

LAYOUTS = ("NHD", "HND")
_MERGE_LANES = 4  # = MERGE_LANES in paged_attention.cu
_MAX_SPLITS = 256  # = MAX_SPLITS in paged_attention.cu
_DTYPES = {torch.bfloat16: 1, torch.float16: 0}
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """Compile-time tiling of paged_attention.cu (see its header comment)."""

    bn: int  # K/V tokens per tile
    stages: int  # cp.async pipeline depth
    warps_m: int  # warps sharing a K/V tile, each with its own query rows
    warps_n: int  # warp groups walking interleaved K/V tiles, merged at the end
    mt: int = 1  # 16-row m-tiles per warp

    def block_rows(self) -> int:
        return 16 * self.mt * self.warps_m

    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def smem_bytes(self, head_dim: int) -> int:
        kv = self.warps_n * self.stages * 2 * self.bn * head_dim * 2
        if self.mt > 1:  # Q tile in shared memory too
            kv += self.block_rows() * head_dim * 2
        staging = self.warps_n * self.block_rows() * ((head_dim + 4) + 2) * 4
        return max(kv, staging)


# Prefill: 4 warps share each K/V tile, 32 packed rows each (128 per CTA, Q in shared memory);
# decode: 4 independent warps per CTA each walking its own tiles (16 packed rows = the GQA
# heads of one token). Chosen by benches/gpu/bench_attention.py --variants on H100.
PREFILL_CONFIG = AttnConfig(bn=64, stages=2, warps_m=4, warps_n=1, mt=2)
DECODE_CONFIG = AttnConfig(bn=16, stages=2, warps_m=1, warps_n=4, mt=1)


def cache_strides(cache: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(stride of block, token, head; block_size) of a 4-D cache tensor in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError(
            f"kv cache must be 4-D with a contiguous last dim, got shape {tuple(cache.shape)}"
        )
    if layout == "NHD":
        return cache.stride(0), cache.stride(1), cache.stride(2), cache.shape[1]
    return cache.stride(0), cache.stride(2), cache.stride(1), cache.shape[2]


def _kv_heads(cache: torch.Tensor, layout: str) -> int:
    return cache.shape[2] if layout == "NHD" else cache.shape[1]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _device_index(t: torch.Tensor) -> int:
    _require(t.is_cuda, f"tensors must be on a CUDA device, got {t.device}")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    *,
    pdl: bool = False,
) -> None:
    """k_cache/v_cache[slot] = k/v for every token whose slot is >= 0.

    pdl: launch with programmatic dependent launch (the kernel waits for its predecessor).
    """
    _require(
        k.dim() == 3 and v.shape == k.shape, f"k, v must be [T, Hkv, D] alike: {k.shape}, {v.shape}"
    )
    _require(k.dtype in _DTYPES, f"k dtype must be bf16 or fp16, got {k.dtype}")
    _require(
        v.dtype == k.dtype == k_cache.dtype == v_cache.dtype, "k, v, k_cache, v_cache dtypes differ"
    )
    _require(k.stride(2) == 1 and v.stride(2) == 1, "k and v need a contiguous head_dim")
    _require(
        k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
        "k_cache and v_cache must have the same shape and strides",
    )
    _require(
        slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1,
        f"slot_mapping must be 1-D int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}",
    )
    T, H, D = k.shape
    _require(
        slot_mapping.shape[0] >= T, f"slot_mapping has {slot_mapping.shape[0]} rows for {T} tokens"
    )
    sb, st, sh, block_size = cache_strides(k_cache, layout)
    _require(
        _kv_heads(k_cache, layout) == H and k_cache.shape[3] == D,
        f"cache shape {tuple(k_cache.shape)} ({layout}) does not match k [T, {H}, {D}]",
    )
    _require(D % 8 == 0, f"head_dim must be a multiple of 8, got {D}")
    for name, s in (("k", k.stride(0)), ("k", k.stride(1)), ("v", v.stride(0)), ("v", v.stride(1))):
        _require(s % 8 == 0, f"{name} strides must be multiples of 8 elements (16-byte rows)")
    if T == 0:
        return
    dev = _device_index(k)
    kern = load_kernel("cache_write.cu", "cache_write", (), 0, dev)
    total = T * H * (D // 8)
    threads = 256
    _launch_decode(
        kern,
        (math.ceil(total / threads), 1, 1),
        (threads, 1, 1),
        [
            (k.data_ptr(), PTR),
            (v.data_ptr(), PTR),
            (k.stride(0), I64),
            (k.stride(1), I64),
            (v.stride(0), I64),
            (v.stride(1), I64),
            (slot_mapping.data_ptr(), PTR),
            (k_cache.data_ptr(), PTR),
            (v_cache.data_ptr(), PTR),
            (sb, I64),
            (st, I64),
            (sh, I64),
            (block_size, I32),
            (T, I32),
            (H, I32),
            (D, I32),
        ],
        pdl,
    )


def _launch_decode(
    kern: Kernel,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: list[tuple[object, type]],
    pdl: bool,
) -> None:
    """kern.launch, or through fused.launch with PDL (cache_write / attention / merge)."""
    if not pdl:
        kern.launch(grid, block, args)
        return
    from .fused import launch  # fused imports this module: import at call time

    launch(kern, grid, block, args, True)


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_OCCUPANCY: dict[tuple[int, int], int] = {}


def _ctas_per_sm(kernel: Kernel, threads: int) -> int:
    key = (id(kernel), threads)
    if key not in _OCCUPANCY:
        err, n = _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            kernel.function, threads, kernel.dynamic_smem
        )
        _check(err, "cuOccupancyMaxActiveBlocksPerMultiprocessor", kernel.name)
        _OCCUPANCY[key] = max(int(n), 1)
    return _OCCUPANCY[key]


def _attention_kernels(
    dtype: torch.dtype, head_dim: int, group: int, cfg: AttnConfig, dev: int
) -> tuple[Kernel, Kernel]:
    defines = (
        ("BN", cfg.bn),
        ("GQA", group),
        ("HEAD_DIM", head_dim),
        ("KV_BF16", _DTYPES[dtype]),
        ("MT", cfg.mt),
        ("STAGES", cfg.stages),
        ("WARPS_M", cfg.warps_m),
        ("WARPS_N", cfg.warps_n),
    )
    attn = load_kernel(
        "paged_attention.cu", "paged_attention", defines, cfg.smem_bytes(head_dim), dev
    )
    merge = load_kernel("paged_attention.cu", "merge_splits", defines, 0, dev)
    return attn, merge


# KVSERVE_DECODE_SPLIT_MIN_TOKENS=n: context tokens per decode split at least n (fewer splits,
# a shorter merge_splits; 0 = the rule below, 2 * bn * warps_n = 128). Unmeasured: an A/B knob
# for benches/gpu/run_e2e_gpu.sh, the default keeps the measured behaviour.
DECODE_SPLIT_MIN_TOKENS = int(os.environ.get("KVSERVE_DECODE_SPLIT_MIN_TOKENS", "0"))


def choose_num_splits(
    ctas: int, max_seq_len: int, sms: int, ctas_per_sm: int, cfg: AttnConfig
) -> int:
    """Split the context when the batch alone leaves SMs idle (fill ~2 waves)."""
    target = 2 * sms * ctas_per_sm
    if ctas >= target:
        return 1
    min_tokens = 2 * cfg.bn * cfg.warps_n  # keep each split worth a launch's loads
    if cfg == DECODE_CONFIG and DECODE_SPLIT_MIN_TOKENS > 0:
        min_tokens = DECODE_SPLIT_MIN_TOKENS  # A/B knob: fewer, longer splits (less merge)
    return max(1, min(math.ceil(target / ctas), math.ceil(max_seq_len / min_tokens), 128))


def _validate_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: str,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    seq_end: int,
) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """Checks shared by the attention launches; returns (Hq, D, Hkv, cache strides)."""
    _require(
        q.dim() == 3 and q.stride(2) == 1,
        f"q must be [T, Hq, D] with contiguous D, got {tuple(q.shape)}",
    )
    _require(q.dtype in _DTYPES, f"q dtype must be bf16 or fp16, got {q.dtype}")
    _require(
        q.dtype == k_cache.dtype == v_cache.dtype == out.dtype, "q, caches and out dtypes differ"
    )
    _require(out.shape == q.shape and out.stride(2) == 1, "out must match q's shape, contiguous D")
    _require(
        k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
        "k_cache and v_cache must have the same shape and strides",
    )
    _, Hq, D = q.shape
    sb, st, sh, block_size = cache_strides(k_cache, layout)
    Hkv = _kv_heads(k_cache, layout)
    _require(k_cache.shape[3] == D, f"cache head_dim {k_cache.shape[3]} != q head_dim {D}")
    _require(
        D % 16 == 0 and 16 <= D <= 256, f"head_dim must be a multiple of 16 in [16, 256], got {D}"
    )
    _require(Hq % Hkv == 0, f"num q heads {Hq} not a multiple of num kv heads {Hkv}")
    _require(
        block_size > 0 and block_size & (block_size - 1) == 0,
        f"block_size must be a power of two, got {block_size}",
    )
    _require(
        block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.stride(1) == 1,
        "block_table must be a 2-D int32 tensor with contiguous rows",
    )
    _require(
        query_start_loc.dtype == torch.int32 and query_start_loc.is_contiguous(),
        "query_start_loc must be contiguous int32",
    )
    _require(
        seq_lens.dtype == torch.int32 and seq_lens.is_contiguous(),
        "seq_lens must be contiguous int32",
    )
    _require(
        block_table.shape[0] >= seq_end
        and seq_lens.shape[0] >= seq_end
        and query_start_loc.shape[0] >= seq_end + 1,
        "seq_end exceeds the metadata rows",
    )
    return Hq, D, Hkv, (sb, st, sh, block_size)


def _paged_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: str,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    seq_begin: int,
) -> list[tuple[int, object]]:
    """The leading kernel parameters both attention kernels share, in their order."""
    sb, st, sh, _ = cache_strides(k_cache, layout)
    bt_row = block_table.stride(0)
    return [
        (q.data_ptr(), PTR),
        (q.stride(0), I64),
        (q.stride(1), I64),
        (k_cache.data_ptr(), PTR),
        (v_cache.data_ptr(), PTR),
        (sb, I64),
        (st, I64),
        (sh, I64),
        (block_table.data_ptr() + seq_begin * bt_row * 4, PTR),
        (bt_row, I32),
        (query_start_loc.data_ptr() + seq_begin * 4, PTR),
        (seq_lens.data_ptr() + seq_begin * 4, PTR),
        (out.data_ptr(), PTR),
        (out.stride(0), I64),
        (out.stride(1), I64),
    ]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: str,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    *,
    seq_begin: int,
    seq_end: int,
    max_query_len: int,
    max_seq_len: int,
    config: AttnConfig,
    num_splits: int | None = None,
    first_token: int = 0,
    pdl: bool = False,
) -> None:
    """out[tokens of sequences seq_begin..seq_end) = causal paged attention of q over the cache.

    Host-side bounds (max_query_len, max_seq_len) must cover those sequences; first_token is
    the absolute index of seq_begin's first token (used to index split-KV partial outputs).
    pdl: launch the kernel and its split merge with programmatic dependent launch.
    """
    nseq = seq_end - seq_begin
    if nseq <= 0 or max_query_len <= 0:
        return
    Hq, D, Hkv, (_, _, _, block_size) = _validate_attention(
        q, k_cache, v_cache, layout, block_table, query_start_loc, seq_lens, out, seq_end
    )
    _require(q.stride(0) % 2 == 0 and q.stride(1) % 2 == 0, "q strides must be even (4-byte rows)")
    if config.mt > 1:  # Q rows are copied with 16-byte cp.async
        _require(
            q.stride(0) % 8 == 0 and q.stride(1) % 8 == 0 and q.data_ptr() % 16 == 0,
            "q rows must be 16-byte aligned for this tiling",
        )
    _require(
        out.stride(0) % 4 == 0 and out.stride(1) % 4 == 0,
        "out strides must be multiples of 4 elements (8-byte stores)",
    )
    dev = _device_index(q)
    group = Hq // Hkv
    attn, merge = _attention_kernels(q.dtype, D, group, config, dev)
    n_qtiles = math.ceil(max_query_len * group / config.block_rows())
    ctas = n_qtiles * Hkv * nseq
    if max_query_len > 1:
        num_splits = 1  # prefill tiles already fill the GPU; partials are for decodes only
    elif num_splits is None:
        num_splits = choose_num_splits(
            ctas, max_seq_len, _sm_count(dev), _ctas_per_sm(attn, config.threads()), config
        )
    split_tokens = max_seq_len
    if num_splits > 1:
        # Split ranges are whole multiples of what one CTA loads per step.
        step = config.bn * config.warps_n
        split_tokens = math.ceil(math.ceil(max_seq_len / num_splits) / step) * step
        num_splits = math.ceil(max_seq_len / split_tokens)
        _require(
            num_splits <= _MAX_SPLITS, f"num_splits must be <= {_MAX_SPLITS}, got {num_splits}"
        )
    token_base = 0
    part_tokens = 0
    part_o = part_lse = None
    if num_splits > 1:
        # Partial outputs are indexed from this launch's first token: its sequences' tokens
        # must be contiguous; query_start_loc is absolute, so read the range from the host side.
        _require(
            max_query_len == 1, "split-KV is only used for decode launches (one token per sequence)"
        )
        token_base = first_token
        part_tokens = nseq
        part_o = torch.empty((num_splits, nseq, Hq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, nseq, Hq), dtype=torch.float32, device=q.device)
    _launch_decode(
        attn,
        (n_qtiles * num_splits, Hkv, nseq),
        (config.threads(), 1, 1),
        [
            *_paged_args(
                q, k_cache, v_cache, layout, block_table, query_start_loc, seq_lens, out, seq_begin
            ),
            (part_o.data_ptr() if part_o is not None else 0, PTR),
            (part_lse.data_ptr() if part_lse is not None else 0, PTR),
            (token_base, I32),
            (part_tokens, I32),
            (num_splits, I32),
            (split_tokens, I32),
            (block_size, I32),
            (block_size.bit_length() - 1, I32),
            (scale * _LOG2E, F32),
        ],
        pdl,
    )
    if num_splits > 1:
        _launch_decode(
            merge,
            (nseq, Hq, 1),
            (D // 4, _MERGE_LANES, 1),
            [
                (part_o.data_ptr(), PTR),
                (part_lse.data_ptr(), PTR),
                (out.data_ptr(), PTR),
                (out.stride(0), I64),
                (out.stride(1), I64),
                (token_base, I32),
                (part_tokens, I32),
                (num_splits, I32),
            ],
            pdl,
        )


# ---------------------------------------------------------------- Hopper prefill (wgmma)

# paged_prefill_sm90.cu: fixed 128-row x 128-token tiles, two consumer warpgroups.
SM90_PREFILL_HEAD_DIM = 128
SM90_PREFILL_BM = 128
# cp.async ring depth (2 or 3) and the software-pipelined loop (softmax of one tile under the
# P V product of the previous; needs 3 stages), chosen by bench_attention.py's variants on
# H100 (2026-11-26): 2 stages, plain loop 406 TFLOP/s; 3 stages 390; pipelined 392.
SM90_PREFILL_STAGES = 2
SM90_PREFILL_PIPELINED = False
# The attention backend sends prefills to the wgmma kernel only where it was measured
# correct and faster than the mma.sync tiling (benches/RESULTS.md); off means never.
SM90_PREFILL_ENABLED = True


# paged_prefill_sm90_ws.cu: warp-specialised (TMA producer warpgroup + two ping-pong consumer
# warpgroups, 384 threads), persistent grid. "ws" selects it where the cache allows TMA
# (sm90_ws_supported; else paged_prefill_sm90.cu runs); "v1" keeps paged_prefill_sm90.cu.
# K/V ring depths, Q buffers and the grid (persistent: one CTA per SM walking the items;
# else one CTA per item). ws is the default: on H100 it passed every kernel test and, with it
# as the default, the whole of tests/gpu (backend, engine, CUDA graphs), and ran 1.3-1.5x v1
# (benches/RESULTS.md, 2026-11-26 16:20 UTC). KVSERVE_SM90_PREFILL=v1|ws overrides it.
SM90_PREFILL_KERNEL = os.environ.get("KVSERVE_SM90_PREFILL", "ws")
SM90_WS_STAGES = 2  # K ring
SM90_WS_VSTAGES = 2  # V ring
SM90_WS_QBUF = 2
SM90_WS_PERSISTENT = True
# Persistent CTAs take items from an atomic counter (dynamic) instead of a fixed stride.
SM90_WS_DYNAMIC = True
_WS_SCHED: dict[tuple[int, int], torch.Tensor] = {}


def _sm90_ws_sched(dev: int) -> torch.Tensor | None:
    """The dynamic scheduler's {next item, CTAs done} counters for the current stream.

    The kernel re-arms them (last CTA out), so launches in stream order can share one pair;
    each stream gets its own. None while a graph capture is under way and no pair exists
    yet for that stream (allocating then would tie it to the graph's pool): the launch
    then uses the static schedule.
    """
    stream = torch.cuda.current_stream(dev)
    key = (dev, stream.cuda_stream)
    t = _WS_SCHED.get(key)
    if t is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        t = torch.zeros(2, dtype=torch.int32, device=f"cuda:{dev}")
        _WS_SCHED[key] = t
    return t


def _sm90_ws_smem_bytes(stages: int, vstages: int, qbuf: int) -> int:
    return (qbuf + stages + vstages) * 128 * SM90_PREFILL_HEAD_DIM * 2 + 1024


def sm90_ws_supported(k_cache: torch.Tensor, v_cache: torch.Tensor, layout: str) -> bool:
    """True where the TMA gather of paged_prefill_sm90_ws can address the cache."""
    if layout not in LAYOUTS or k_cache.dim() != 4:
        return False
    bs = k_cache.shape[2] if layout == "HND" else k_cache.shape[1]
    return (
        bs >= 8  # a box of >= 8 rows keeps every box 1024-byte aligned (the swizzle period)
        and bs & (bs - 1) == 0
        and all(t.data_ptr() % 16 == 0 for t in (k_cache, v_cache))
        and all(
            st * t.element_size() % 16 == 0 for t in (k_cache, v_cache) for st in t.stride()[:3]
        )
    )


def _sm90_smem_bytes(stages: int) -> int:
    tile = 128 * SM90_PREFILL_HEAD_DIM * 2
    return tile + stages * 2 * tile + 1024  # Q, K+V ring, 1024-byte alignment slack


def sm90_prefill_supported(q: torch.Tensor, out: torch.Tensor) -> bool:
    """True where paged_prefill_sm90 can run: sm_90, head_dim 128, bf16/fp16, 16-byte rows."""
    if not (q.is_cuda and q.dim() == 3 and q.dtype in _DTYPES):
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return (
        q.shape[2] == SM90_PREFILL_HEAD_DIM
        and q.stride(2) == 1
        and out.stride(2) == 1
        and all(s % 8 == 0 for s in (q.stride(0), q.stride(1), out.stride(0), out.stride(1)))
        and q.data_ptr() % 16 == 0
        and out.data_ptr() % 16 == 0
    )


def paged_prefill_sm90(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: str,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    *,
    seq_begin: int,
    seq_end: int,
    max_query_len: int,
    stages: int = SM90_PREFILL_STAGES,
    pipelined: bool = SM90_PREFILL_PIPELINED,
    kernel: str | None = None,
    ws_stages: int | None = None,
    ws_vstages: int | None = None,
    ws_qbuf: int | None = None,
    persistent: bool | None = None,
    dynamic: bool | None = None,
    max_ctas: int | None = None,
    profile_buffer: torch.Tensor | None = None,
) -> None:
    """Same result as paged_attention() for a prefill part, by a Hopper wgmma kernel.

    Needs an sm_90 device and head_dim 128 (sm90_prefill_supported); max_query_len must
    cover the new tokens of sequences seq_begin..seq_end. ``kernel`` "ws" (the
    warp-specialised TMA kernel, where sm90_ws_supported) or "v1" (paged_prefill_sm90.cu,
    configured by ``stages``/``pipelined``); None takes SM90_PREFILL_KERNEL. ``max_ctas``
    caps the persistent grid (tests: many work items per CTA). ``profile_buffer`` (int64
    [7], zeroed; ws only) selects a build that adds consumer-warp cycle counters into it
    (benches/gpu/profile_prefill_sm90.py).
    """
    nseq = seq_end - seq_begin
    if nseq <= 0 or max_query_len <= 0:
        return
    Hq, D, Hkv, (sb, st, sh, block_size) = _validate_attention(
        q, k_cache, v_cache, layout, block_table, query_start_loc, seq_lens, out, seq_end
    )
    _require(
        sm90_prefill_supported(q, out),
        "paged_prefill_sm90 needs an sm_90 device, head_dim 128 and q/out rows aligned to 16 "
        f"bytes; got head_dim {D}, q strides {q.stride()}, out strides {out.stride()}",
    )
    _require(
        (sb % 8, st % 8, sh % 8) == (0, 0, 0), "kv cache strides must be multiples of 8 elements"
    )
    _require(max(abs(sb), abs(st), abs(sh)) < 2**31, "kv cache strides must fit 32 bits (elements)")
    _require(stages in (2, 3), f"stages must be 2 or 3, got {stages}")
    _require(not pipelined or stages == 3, "the pipelined wgmma loop needs stages=3")
    dev = _device_index(q)
    group = Hq // Hkv
    kernel = SM90_PREFILL_KERNEL if kernel is None else kernel
    _require(kernel in ("ws", "v1"), f"kernel must be 'ws' or 'v1', got {kernel!r}")
    if kernel == "ws" and sm90_ws_supported(k_cache, v_cache, layout):
        _sm90_ws_launch(
            q,
            k_cache,
            v_cache,
            layout,
            block_table,
            query_start_loc,
            seq_lens,
            out,
            scale,
            seq_begin=seq_begin,
            nseq=nseq,
            max_query_len=max_query_len,
            group=group,
            hkv=Hkv,
            block_size=block_size,
            stages=SM90_WS_STAGES if ws_stages is None else ws_stages,
            vstages=SM90_WS_VSTAGES if ws_vstages is None else ws_vstages,
            qbuf=SM90_WS_QBUF if ws_qbuf is None else ws_qbuf,
            persistent=SM90_WS_PERSISTENT if persistent is None else persistent,
            dynamic=SM90_WS_DYNAMIC if dynamic is None else dynamic,
            max_ctas=max_ctas,
            prof=profile_buffer,
            dev=dev,
        )
        return
    defines = (
        ("GQA", group),
        ("KV_BF16", _DTYPES[q.dtype]),
        ("PIPELINE", int(pipelined)),
        ("STAGES", stages),
    )
    kern = load_kernel(
        "paged_prefill_sm90.cu", "paged_prefill_sm90", defines, _sm90_smem_bytes(stages), dev
    )
    n_qtiles = math.ceil(max_query_len * group / SM90_PREFILL_BM)
    kern.launch(
        (n_qtiles, Hkv, nseq),
        (256, 1, 1),
        [
            *_paged_args(
                q, k_cache, v_cache, layout, block_table, query_start_loc, seq_lens, out, seq_begin
            ),
            (block_size, I32),
            (block_size.bit_length() - 1, I32),
            (scale * _LOG2E, F32),
        ],
    )


def _sm90_ws_launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: str,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    *,
    seq_begin: int,
    nseq: int,
    max_query_len: int,
    group: int,
    hkv: int,
    block_size: int,
    stages: int,
    vstages: int,
    qbuf: int,
    persistent: bool,
    dynamic: bool,
    max_ctas: int | None,
    prof: torch.Tensor | None,
    dev: int,
) -> None:
    """One launch of paged_prefill_sm90_ws.cu (checks done by paged_prefill_sm90)."""
    from .tma import TmaDescArg, kv_tensor_map

    _require(
        stages in (2, 3) and vstages in (2, 3) and qbuf in (1, 2),
        f"ws stages {stages}/{vstages} / qbuf {qbuf} unsupported",
    )
    smem = _sm90_ws_smem_bytes(stages, vstages, qbuf)
    _require(smem <= 227 * 1024, f"ws stages {stages}+{vstages} + qbuf {qbuf} exceed shared memory")
    defines = (
        ("GQA", group),
        ("KV_BF16", _DTYPES[q.dtype]),
        ("PROF", int(prof is not None)),
        ("QBUF", qbuf),
        ("STAGES", stages),
        ("VSTAGES", vstages),
    )
    kern = load_kernel("paged_prefill_sm90_ws.cu", "paged_prefill_sm90_ws", defines, smem, dev)
    block_shift = block_size.bit_length() - 1
    box_shift = min(block_shift, 7)
    n_qtiles = math.ceil(max_query_len * group / SM90_PREFILL_BM)
    num_items = n_qtiles * hkv * nseq
    grid = min(num_items, _sm_count(dev)) if persistent else num_items
    if max_ctas is not None:
        grid = max(1, min(grid, max_ctas))
    bt_row = block_table.stride(0)
    sched = _sm90_ws_sched(dev) if dynamic and grid < num_items else None
    kern.launch(
        (grid, 1, 1),
        (384, 1, 1),
        [
            (kv_tensor_map(k_cache, layout, 1 << box_shift), TmaDescArg),
            (kv_tensor_map(v_cache, layout, 1 << box_shift), TmaDescArg),
            (q.data_ptr(), PTR),
            (q.stride(0), I64),
            (q.stride(1), I64),
            (block_table.data_ptr() + seq_begin * bt_row * 4, PTR),
            (bt_row, I32),
            (query_start_loc.data_ptr() + seq_begin * 4, PTR),
            (seq_lens.data_ptr() + seq_begin * 4, PTR),
            (out.data_ptr(), PTR),
            (out.stride(0), I64),
            (out.stride(1), I64),
            (block_shift, I32),
            (box_shift, I32),
            (int(layout == "NHD"), I32),
            (n_qtiles, I32),
            (hkv, I32),
            (num_items, I32),
            (scale * _LOG2E, F32),
            (sched.data_ptr() if sched is not None else 0, PTR),
            (prof.data_ptr() if prof is not None else 0, PTR),
        ],
    )
