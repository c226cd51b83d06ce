"""CUDA kernels compiled at run time with NVRTC and launched through cuda-python.

Importing this package needs neither a GPU nor cuda-python: both are looked up on first use.
"""

from .compiler import KernelCompileError, NvrtcUnavailableError, compile_source
from .launcher import CudaUnavailableError, KernelLaunchError, cuda_unavailable_reason
from .ops import DECODE_CONFIG, LAYOUTS, PREFILL_CONFIG, AttnConfig, cache_write, paged_attention

__all__ = [
    "DECODE_CONFIG",
    "LAYOUTS",
    "PREFILL_CONFIG",
    "AttnConfig",
    "CudaUnavailableError",
    "KernelCompileError",
    "KernelLaunchError",
    "NvrtcUnavailableError",
    "cache_write",
    "compile_source",
    "cuda_unavailable_reason",
    "paged_attention",
]
