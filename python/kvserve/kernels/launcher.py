"""Loading cubins into PyTorch's CUDA context and launching kernels on its current stream.

Shared by every launcher: load_kernel, Kernel.launch (plain, or with programmatic dependent
launch), and the device queries that size grids (sm_count, ctas_per_sm).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from .compiler import compile_source

# Launches that may use programmatic dependent launch (launch(..., pdl=True)) do so while
# this holds; tests turn it off to compare a chain of kernels against plain launches.
PDL = True


class KernelLaunchError(RuntimeError):
    """A CUDA driver call for a kernel failed."""


class CudaUnavailableError(RuntimeError):
    """No usable CUDA device or driver bindings: the cuda attention backend cannot run."""


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise CudaUnavailableError(
            f"cuda-bindings is not installed ({e}); install cuda-bindings to use the cuda backend"
        ) from e
    return driver


def _check(result, call: str, kernel: str) -> None:
    driver = _driver()
    if result != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(result)
        _, msg = driver.cuGetErrorString(result)
        raise KernelLaunchError(
            f"{call} failed for kernel {kernel!r}: "
            f"{name.decode() if name else result} ({msg.decode() if msg else ''})"
        )


def cuda_unavailable_reason() -> str | None:
    """None when the cuda kernels can run here, else a sentence saying why not."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    from .compiler import NvrtcUnavailableError, nvrtc_version

    try:
        _driver()
        nvrtc_version()
    except (CudaUnavailableError, NvrtcUnavailableError) as e:
        return str(e)
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"the kernels need compute capability >= 8.0 (mma.sync bf16); found {major}.x"
    return None


def device_arch(device: torch.device | int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    # sm_90a unlocks Hopper-only instructions (wgmma, setmaxnreg) for the exact chip.
    return f"sm_{major}{minor}a" if major == 9 else f"sm_{major}{minor}"


_tls = threading.local()


def _ensure_context(device_index: int) -> None:
    """Make torch's primary context current on this thread (torch may not have yet)."""
    driver = _driver()
    if getattr(_tls, "device", None) == device_index:
        return
    torch.cuda.init()
    with torch.cuda.device(device_index):
        torch.cuda.current_stream(device_index)  # forces torch to create the primary context
    err, ctx = driver.cuCtxGetCurrent()
    _check(err, "cuCtxGetCurrent", "<context>")
    err, dev = driver.cuDeviceGet(device_index)
    _check(err, "cuDeviceGet", "<context>")
    err, primary = driver.cuDevicePrimaryCtxRetain(dev)
    _check(err, "cuDevicePrimaryCtxRetain", "<context>")
    if int(ctx) != int(primary):
        (err,) = driver.cuCtxSetCurrent(primary)
        _check(err, "cuCtxSetCurrent", "<context>")
    _tls.device = device_index


@dataclass
class Kernel:
    """One loaded kernel function; launch() enqueues it on torch's current stream."""

    name: str
    function: object
    dynamic_smem: int
    device_index: int

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: list[tuple[object, type]],
        pdl: bool = False,
    ) -> None:
        """Enqueue on torch's current stream (read now, so launches join graph capture).

        pdl (and PDL): programmatic stream serialisation, so the kernel may start before its
        predecessor ends; it must griddepcontrol.wait before it reads that one's outputs
        (every thread, before any early return). Plain pointer/int/float arguments only.
        Works under CUDA-graph capture (the capture records a programmatic edge).
        """
        driver = _driver()
        _ensure_context(self.device_index)
        if min(grid) <= 0:
            return  # nothing to do (empty batch part)
        stream = driver.CUstream(torch.cuda.current_stream(self.device_index).cuda_stream)
        values = tuple(a for a, _ in args)
        types = tuple(t for _, t in args)
        if pdl and PDL:
            cfg = driver.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
            cfg.sharedMemBytes = self.dynamic_smem
            cfg.hStream = stream
            cfg.attrs = [_pdl_attribute()]
            cfg.numAttrs = 1
            (err,) = driver.cuLaunchKernelEx(cfg, self.function, (values, types), 0)
            _check(err, "cuLaunchKernelEx", self.name)
            return
        params: object = (values, types)
        if any(issubclass(t, ctypes.Structure) for t in types):
            # A struct passed by value (a 128-byte CUtensorMap): build the void** array
            # ourselves; the driver copies each argument at launch, so locals suffice.
            storage: list[Any] = []
            for v, t in args:
                ctype: Any = t
                storage.append(ctype.from_buffer_copy(v) if issubclass(t, ctypes.Structure)
                               else ctype(v))
            ptrs = (ctypes.c_void_p * len(storage))(*(ctypes.addressof(s) for s in storage))
            params = ctypes.addressof(ptrs)
        (err,) = driver.cuLaunchKernel(
            self.function, *grid, *block, self.dynamic_smem, stream, params, 0
        )
        _check(err, "cuLaunchKernel", self.name)


@cache
def _pdl_attribute():
    driver = _driver()
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    return attr


@cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_OCCUPANCY: dict[tuple[int, int], int] = {}


def ctas_per_sm(kernel: Kernel, threads: int) -> int:
    """Resident CTAs of ``kernel`` per SM at ``threads`` threads (its dynamic shared memory)."""
    key = (id(kernel), threads)
    if key not in _OCCUPANCY:
        err, n = _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            kernel.function, threads, kernel.dynamic_smem
        )
        _check(err, "cuOccupancyMaxActiveBlocksPerMultiprocessor", kernel.name)
        _OCCUPANCY[key] = max(int(n), 1)
    return _OCCUPANCY[key]


@cache
def load_kernel(
    source_name: str,
    kernel_name: str,
    defines: tuple[tuple[str, int], ...],
    dynamic_smem: int,
    device_index: int,
) -> Kernel:
    """Compile (or fetch from the disk cache), load into the device's context, configure."""
    driver = _driver()
    _ensure_context(device_index)
    arch = device_arch(device_index)
    compiled = compile_source(source_name, arch, dict(defines))
    err, module = driver.cuModuleLoadData(compiled.cubin)
    _check(err, "cuModuleLoadData", kernel_name)
    err, func = driver.cuModuleGetFunction(module, kernel_name.encode())
    _check(err, "cuModuleGetFunction", kernel_name)
    if dynamic_smem > 48 * 1024:
        # Above 48 KB a kernel must opt in to its dynamic shared memory.
        (err,) = driver.cuFuncSetAttribute(
            func,
            driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic_smem,
        )
        _check(err, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", kernel_name)
    _MODULES.append(module)  # keep modules alive for the process lifetime
    return Kernel(kernel_name, func, dynamic_smem, device_index)


_MODULES: list[object] = []

# ctypes types for kernel arguments.
PTR = ctypes.c_void_p
I32 = ctypes.c_int
I64 = ctypes.c_longlong
F32 = ctypes.c_float
