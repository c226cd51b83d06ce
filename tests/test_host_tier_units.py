"""host_tier.py on its own: the size rule, its errors, and the copier against a per-block
reference copy on random block lists (runs, chunks larger than the staging limit, fp8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvserve.engine_args import EngineArgs
from kvserve.host_tier import (
    DEFAULT_CAP,
    HostCopier,
    HostPool,
    HostTierError,
    cache_byte_views,
    check_pinnable,
    host_tier_bytes,
    mem_available,
    resolve_host_tier,
    runs,
)

GiB = 2**30


def test_size_rule_defaults() -> None:
    assert host_tier_bytes(None, "cpu", 64 * GiB) == 0  # off on CPU unless asked
    assert host_tier_bytes(None, "cuda", 64 * GiB) == 16 * GiB  # a quarter of available
    assert host_tier_bytes(None, "cuda", 1024 * GiB) == DEFAULT_CAP  # capped
    assert host_tier_bytes(3 * GiB, "cpu", 64 * GiB) == 3 * GiB
    assert host_tier_bytes(0, "cuda", 64 * GiB) == 0  # 0 turns it off
    assert mem_available() > 0


def test_parse_host_kv_cache_sizes() -> None:
    assert EngineArgs(host_kv_cache="8GiB").host_kv_cache_bytes == 8 * GiB
    assert EngineArgs(host_kv_cache="1.5GB").host_kv_cache_bytes == 1_500_000_000
    assert EngineArgs(host_kv_cache=0).host_kv_cache_bytes == 0
    assert EngineArgs().host_kv_cache_bytes is None
    assert EngineArgs(host_kv_cache="auto").host_kv_cache_bytes is None
    with pytest.raises(ValueError, match="host_kv_cache: cannot parse size '8 parsecs'"):
        EngineArgs(host_kv_cache="8 parsecs")
    with pytest.raises(ValueError, match="host_kv_cache: must be >= 0"):
        EngineArgs(host_kv_cache=-1)
    with pytest.raises(ValueError, match="num_gpu_blocks_override: must be a positive"):
        EngineArgs(num_gpu_blocks_override=0)


def test_too_large_is_refused_naming_the_flag_and_what_is_available() -> None:
    check_pinnable(8 * GiB, 1 * GiB, 16 * GiB)
    with pytest.raises(HostTierError, match=r"--host-kv-cache: 15.00 GiB .*16.00 GiB available"):
        check_pinnable(15 * GiB, 1 * GiB, 16 * GiB)


def test_resolve_at_start() -> None:
    assert resolve_host_tier(None, 0, True, "cpu") == 0
    assert resolve_host_tier(2**20, 0, True, "cpu") == 2**20
    assert resolve_host_tier(None, 0, False, "cuda") == 0  # no prefix cache, no second tier
    with pytest.raises(HostTierError, match="--host-kv-cache: .* needs prefix caching"):
        resolve_host_tier(2**20, 0, False, "cpu")
    with pytest.raises(HostTierError, match="--host-kv-cache: .* more host memory than can "
                                            "be pinned"):
        resolve_host_tier(4 * mem_available(), 0, True, "cpu")


def test_runs() -> None:
    ids = np.array([4, 5, 6, 9, 3, 4, 10], dtype=np.int64)
    assert list(runs(ids)) == [(0, 4, 3), (3, 9, 1), (4, 3, 2), (6, 10, 1)]
    assert list(runs(np.zeros(0, dtype=np.int64))) == []


def _caches(num_blocks: int, layers: int, dtype: torch.dtype,
            gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, 4, 2, 8)  # [blocks, block_size, kv heads, head dim]

    def rand() -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype)

    return [(rand(), rand()) for _ in range(layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("staging_blocks", [1, 3, 64])
def test_copier_matches_per_block_copies(dtype: torch.dtype, staging_blocks: int) -> None:
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    gpu_blocks, host_blocks, layers = 24, 20, 3
    caches = _caches(gpu_blocks, layers, dtype, gen)
    ref_gpu = [(k.clone(), v.clone()) for k, v in caches]
    views = cache_byte_views(caches)
    pool = HostPool(host_blocks, len(views), views[0].shape[1], pin=False)
    assert pool.block_bytes == 2 * layers * 4 * 2 * 8 * torch.empty((), dtype=dtype).element_size()
    copier = HostCopier(caches, pool, torch.device("cpu"),
                        staging_bytes=staging_blocks * pool.block_bytes)
    ref_host: dict[int, list[torch.Tensor]] = {}
    for _ in range(30):
        n = int(rng.integers(1, 9))
        if rng.random() < 0.5 or not ref_host:
            # Out: distinct device blocks to distinct host blocks, often consecutive.
            gpu = rng.choice(gpu_blocks, n, replace=False)
            host = (np.arange(n) + rng.integers(0, host_blocks - n)) if rng.random() < 0.5 \
                else rng.choice(host_blocks, n, replace=False)
            pairs = np.stack([gpu, host], axis=1)
            copier.to_host(pairs, gate=bool(rng.random() < 0.5))
            for g, h in pairs.tolist():
                ref_host[h] = [t[g].clone() for pair in ref_gpu for t in pair]
        else:
            written = sorted(ref_host)
            host = rng.choice(written, min(n, len(written)), replace=False)
            gpu = rng.choice(gpu_blocks, len(host), replace=False)
            pairs = np.stack([host, gpu], axis=1)
            copier.to_device(pairs)
            for h, g in pairs.tolist():
                for j, (k, v) in enumerate(ref_gpu):
                    k[g] = ref_host[h][2 * j]
                    v[g] = ref_host[h][2 * j + 1]
        copier.wait_ready()
        for (k, v), (rk, rv) in zip(caches, ref_gpu):
            assert torch.equal(k.view(torch.uint8), rk.view(torch.uint8))
            assert torch.equal(v.view(torch.uint8), rv.view(torch.uint8))
    assert copier.wait_done() == []


def test_bandwidth_probe_reports_both_directions() -> None:
    gen = torch.Generator().manual_seed(1)
    caches = _caches(4, 2, torch.float32, gen)
    views = cache_byte_views(caches)
    pool = HostPool(8, len(views), views[0].shape[1], pin=False)
    d2h, h2d = HostCopier(caches, pool, torch.device("cpu")).measure_bandwidth(reps=2)
    assert d2h > 0 and h2d > 0
