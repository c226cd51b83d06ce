"""CUDA kernels compiled at run time with NVRTC and launched through cuda-python.

Importing this package needs neither a GPU nor cuda-python: both are looked up on first use.
Modules: compiler (NVRTC + disk cache), launcher (load, launch, PDL, occupancy), validate
(argument checks), paged_kv (the cache description the attention kernels take), cache_write,
paged_attention (mma.sync), prefill_sm90 (Hopper wgmma/TMA prefill), tma (tensor maps),
decoder_kernels (the decoder's small ops). Launch functions are imported from their modules
(a re-export here would hide the module of the same name).
"""

from .compiler import KernelCompileError, NvrtcUnavailableError, compile_source
from .launcher import CudaUnavailableError, KernelLaunchError, cuda_unavailable_reason
from .paged_attention import DECODE_CONFIG, PREFILL_CONFIG, AttnConfig
from .paged_kv import LAYOUTS, PagedKV

__all__ = [
    "DECODE_CONFIG",
    "LAYOUTS",
    "PREFILL_CONFIG",
    "AttnConfig",
    "CudaUnavailableError",
    "KernelCompileError",
    "KernelLaunchError",
    "NvrtcUnavailableError",
    "PagedKV",
    "compile_source",
    "cuda_unavailable_reason",
]
