"""NVRTC compilation of the kernel sources to cubins, cached on disk.

Needs only the NVRTC library (no GPU), so compilation can be tested on CPU machines.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kvserve import env

SOURCE_DIR = Path(__file__).parent / "cuda"


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds the full compile log."""


class NvrtcUnavailableError(RuntimeError):
    """The NVRTC library (cuda-bindings + nvidia-cuda-nvrtc) cannot be loaded."""


@dataclass(frozen=True)
class CompiledKernel:
    source_name: str
    arch: str
    options: tuple[str, ...]
    cubin: bytes
    log: str = field(repr=False)  # ptxas resource report (registers, smem, spills)


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, err, "nvrtcVersion", "<none>")
    return int(major), int(minor)


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NvrtcUnavailableError(f"cuda-bindings is not installed: {e}") from e
    try:
        nvrtc.nvrtcVersion()
    except Exception as e:  # the Python module loads the shared library lazily
        raise NvrtcUnavailableError(f"the NVRTC library cannot be loaded: {e}") from e
    return nvrtc


def _check(nvrtc, result, call: str, kernel: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(result)
        raise KernelCompileError(f"{call} failed for kernel source {kernel!r}: {msg.decode()}")


@lru_cache(maxsize=1)
def include_dirs() -> tuple[str, ...]:
    """CUDA runtime headers (cuda_bf16.h ...) and CCCL, from the installed CUDA wheels."""
    from cuda.pathfinder import find_nvidia_header_directory

    dirs = []
    for lib in ("cudart", "cccl"):
        d = find_nvidia_header_directory(lib)
        if d is None:
            raise NvrtcUnavailableError(
                f"CUDA headers for {lib!r} not found (install the CUDA wheels)"
            )
        dirs.append(str(d))
    return tuple(dirs)


def cache_dir() -> Path:
    return env.kernel_cache_dir()


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"$', re.MULTILINE)


def read_source(source_name: str) -> str:
    """The kernel source with its local headers (``#include "x.cuh"`` from cuda/) inlined,
    so the text NVRTC sees, and the cache key hashes, covers them too."""
    path = SOURCE_DIR / source_name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {source_name!r} not found in {SOURCE_DIR}")
    return _LOCAL_INCLUDE.sub(lambda m: read_source(m.group(1)), path.read_text())


def compile_source(
    source_name: str, arch: str, defines: dict[str, int] | None = None, use_cache: bool = True
) -> CompiledKernel:
    """Compile ``cuda/<source_name>`` for ``arch`` (e.g. "sm_90a") with ``-D`` defines.

    The cubin is cached on disk under a key of (source text, arch, options, NVRTC version).
    """
    source = read_source(source_name)
    options = [
        f"--gpu-architecture={arch}",
        "-std=c++17",
        "--use_fast_math",
        "--ptxas-options=--verbose",  # the resource report ends up in the log
        *(f"-D{k}={v}" for k, v in sorted((defines or {}).items())),
    ]
    key_options = tuple(options)
    version = nvrtc_version()
    key = hashlib.sha256(
        "\0".join([source, arch, *key_options, f"nvrtc{version}"]).encode()
    ).hexdigest()[:32]
    stem = f"{Path(source_name).stem}-{arch}-{key}"
    cdir = cache_dir()
    cubin_path, log_path = cdir / f"{stem}.cubin", cdir / f"{stem}.log"
    if use_cache and cubin_path.is_file():
        log = log_path.read_text() if log_path.is_file() else ""
        return CompiledKernel(source_name, arch, key_options, cubin_path.read_bytes(), log)

    cubin, log = _nvrtc_compile(source, source_name, options)
    if use_cache:
        _atomic_write(cubin_path, cubin)
        _atomic_write(log_path, log.encode())
    return CompiledKernel(source_name, arch, key_options, cubin, log)


def _nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[bytes, str]:
    nvrtc = _nvrtc()
    opts = [o.encode() for o in options] + [f"-I{d}".encode() for d in include_dirs()]
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram", name)
    try:
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(nvrtc, err, "nvrtcGetProgramLogSize", name)
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
        _check(nvrtc, err, "nvrtcGetProgramLog", name)
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(
                f"NVRTC failed to compile kernel source {name!r} with options {options}:\n{log}"
            )
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, "nvrtcGetCUBINSize", name)
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(nvrtc, err, "nvrtcGetCUBIN", name)
        return cubin, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _atomic_write(path: Path, data: bytes) -> None:
    # Several processes may compile the same kernel at once: write aside, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
