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
multiprocessor count and the opt-in shared memory per block, ``clusters(device)``
whether the GPU has thread block clusters (the cl=N kernels). The tests swap
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

# NVRTC options, every floating-point choice explicit. Flush-to-zero is ON: CuPy appends -ftz=true to
# whatever it is given (NVRTC honours the last occurrence), and Triton flushes fp32 denormals too, so both
# GPU backends agree; saying it here makes the option tuple what NVRTC actually receives. It cannot move a
# stability threshold: the normalisation (gspngen/lower/derive.py, scaled_sigmoid) is exact for every
# finite logit, so flushing touches only results below 2**-126, where CPU backends (no flush) differ
# from GPU ones by less than the smallest normal fp32. Divides and square roots are IEEE-rounded and
# multiply-adds contract, NVRTC's defaults, also made explicit.
FTZ = True
BASE_OPTIONS = ("-std=c++17", f"-ftz={str(FTZ).lower()}", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")


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
        # (device index, source hash) -> [(names, module)]: a kernel compiled once (by a prebuild, say)
        # serves every later request for it, whatever set of names that request brings.
        self._modules: dict[tuple, list[tuple[frozenset, Any]]] = {}
        self._lock = threading.Lock()
        self.builds = 0  # NVRTC builds so far (each is seconds: see prebuild)

    @staticmethod
    def _cupy():
        import cupy

        return cupy

    def kernel(self, device: torch.device, source: str, name: str, names: Sequence[str]):
        cupy = self._cupy()
        key = (device.index, hashlib.sha256(source.encode()).hexdigest())
        with self._lock:
            built = self._modules.setdefault(key, [])
            mod = next((m for have, m in built if name in have), None)
            if mod is None:
                names = tuple(sorted(set(names) | {name}))
                with cupy.cuda.Device(device.index):
                    mod = cupy.RawModule(code=source, options=build_options(), name_expressions=names)
                built.append((frozenset(names), mod))
                self.builds += 1
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

    @staticmethod
    def clusters(device: torch.device) -> bool:
        """Thread block clusters and distributed shared memory (the cl=N kernels): compute capability 9.0+."""
        return torch.cuda.get_device_capability(device)[0] >= 9

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


def probe_versions() -> tuple[int, int, int]:
    """(driver, cuda runtime, nvrtc) versions as 1000 * major + 10 * minor (12040 for 12.4): the CUDA
    version the installed driver supports, and the ones CuPy's runtime and NVRTC were built for.
    Raises if CuPy is missing or cannot load CUDA. (Tests monkeypatch this.)"""
    import cupy

    driver = int(cupy.cuda.runtime.driverGetVersion())
    runtime = int(cupy.cuda.runtime.runtimeGetVersion())
    major, minor = cupy.cuda.nvrtc.getVersion()
    return driver, runtime, 1000 * int(major) + 10 * int(minor)


def _v(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def cuda_unavailable_reason() -> str | None:
    """None when CuPy loads and the driver can run what its runtime and NVRTC produce, else why not.

    A driver runs code built by a CUDA runtime / NVRTC of its own major version or older (minor-version
    compatibility within a major); a CuPy wheel for CUDA 13 on a 12.x driver loads but fails at the first
    launch, so this is checked before ``auto`` picks ``cuda``.
    """
    try:
        driver, runtime, nvrtc = probe_versions()
    except Exception as e:  # ImportError, a CUDA library that fails to load, no driver
        return f"cupy is not installed or cannot load CUDA ({type(e).__name__}: {e})"[:300]
    if driver <= 0:
        return "no CUDA driver found"
    need = max(runtime, nvrtc)
    if driver // 1000 < need // 1000:
        which = "runtime" if runtime >= nvrtc else "NVRTC"
        return (f"the CUDA driver supports CUDA {_v(driver)}, but cupy's {which} is CUDA {_v(need)}; "
                f"update the driver or install the cupy wheel for CUDA {driver // 1000} (cupy-cuda{driver // 1000}x)")
    return None


def cupy_available() -> bool:
    return cuda_unavailable_reason() is None
