"""Build rendered CUDA sources with CuPy's NVRTC and launch them on PyTorch tensors.

Kernels compile at first use through ``cupy.RawModule`` (NVRTC, ``-std=c++17``;
CuPy adds the current device's architecture and keeps its on-disk kernel
cache, keyed by source, options and name expressions). Launches run on
``torch.cuda.current_stream()`` and take the tensors' device pointers as
they are: no copies, no host synchronisation.

A *runner* is what the CUDA backends talk to: ``kernel(device, source, name,
names)`` returns a launchable kernel (``names`` are every instantiation the
caller will need from this source, compiled together), ``launch(kernel,
device, grid, block, smem, args)`` runs it, ``limits(device)`` gives the
multiprocessor count and the opt-in shared memory per block. The tests swap
in a CPU emulator with the same interface.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

BASE_OPTIONS = ("-std=c++17",)


def cuda_include_dirs() -> list[str]:
    """CUDA header folders, first found first: $CUDA_PATH / $CUDA_HOME, /usr/local/cuda, the nvidia wheels.

    The generated sources include no CUDA header (16-bit types are raw bits),
    so none of these is required; they are passed so that NVRTC finds the
    toolkit's headers wherever they are installed.
    """
    seen: list[str] = []

    def add(p: Path) -> None:
        if p.is_dir() and ((p / "cuda_runtime.h").exists() or (p / "cuda_fp16.h").exists()):
            s = str(p.resolve())
            if s not in seen:
                seen.append(s)

    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root:
            add(Path(root) / "include")
    add(Path("/usr/local/cuda/include"))
    for site in sys.path:
        base = Path(site) / "nvidia"
        if not base.is_dir():
            continue
        for inc in sorted(base.glob("*/include")):
            add(inc)
    return seen


def build_options() -> tuple[str, ...]:
    return BASE_OPTIONS + tuple(f"-I{d}" for d in cuda_include_dirs())


def pack_args(args: Sequence[tuple[str, Any]]) -> tuple:
    """Kernel arguments as CuPy takes them: pointers as 64-bit integers, ints as int32."""
    out = []
    for kind, value in args:
        if kind == "i32":
            if not -(2**31) <= int(value) < 2**31:
                raise ValueError(f"kernel argument {value} does not fit a 32-bit int")
            out.append(np.int32(value))
        else:
            out.append(np.uint64(0 if value is None else value.data_ptr()))
    return tuple(out)


class CupyRunner:
    """Compile with CuPy/NVRTC, launch on the current PyTorch stream."""

    def __init__(self) -> None:
        self._modules: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _cupy():
        import cupy

        return cupy

    def kernel(self, device: torch.device, source: str, name: str, names: Sequence[str]):
        cupy = self._cupy()
        names = tuple(sorted(set(names) | {name}))
        key = (device.index, hashlib.sha256(source.encode()).hexdigest(), names)
        with self._lock:
            mod = self._modules.get(key)
            if mod is None:
                with cupy.cuda.Device(device.index):
                    mod = cupy.RawModule(code=source, options=build_options(), name_expressions=names)
                self._modules[key] = mod
        with cupy.cuda.Device(device.index):
            return mod.get_function(name)

    def launch(self, kernel, device: torch.device, grid: int, block: int, smem: int,
               args: Sequence[tuple[str, Any]]) -> None:
        cupy = self._cupy()
        with cupy.cuda.Device(device.index):
            if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
                kernel.max_dynamic_shared_size_bytes = smem  # opt in beyond the 48 KB default
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
            with stream:
                kernel((grid,), (block,), pack_args(args), shared_mem=smem)

    def limits(self, device: torch.device) -> tuple[int, int]:
        cupy = self._cupy()
        attrs = cupy.cuda.Device(device.index).attributes
        return int(attrs["MultiProcessorCount"]), int(attrs["MaxSharedMemoryPerBlockOptin"])


_DEFAULT: CupyRunner | None = None


def default_runner() -> CupyRunner:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CupyRunner()
    return _DEFAULT


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library that fails to load
        return False
    return True
