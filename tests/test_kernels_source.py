"""Kernel sources as NVRTC sees them: local headers inlined (no NVRTC needed)."""

from __future__ import annotations

from kvserve.kernels import compiler


def test_local_headers_are_inlined_where_included() -> None:
    header = (compiler.SOURCE_DIR / "sm90_wgmma.cuh").read_text()
    for name in ("paged_prefill_sm90.cu", "paged_prefill_sm90_ws.cu"):
        raw = (compiler.SOURCE_DIR / name).read_text()
        directive = '#include "sm90_wgmma.cuh"'
        assert directive in raw.splitlines()
        text = compiler.read_source(name)
        assert directive not in text.splitlines()
        assert header in text  # so the cubin cache key changes when the header does
        assert text.count("__device__ __forceinline__ void wgmma_ss(") == 1


def test_sources_without_local_headers_are_read_as_they_are() -> None:
    for name in ("cache_write.cu", "paged_attention.cu"):
        assert compiler.read_source(name) == (compiler.SOURCE_DIR / name).read_text()
