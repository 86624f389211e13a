"""Run the generated CUDA kernels on the CPU through the fiber emulator in emu.h (tests only).

:class:`EmuRunner` has the runner interface of gspngen/runtime/cuda_build.py,
so the real CUDA backends (planning, argument packing, launch sequence) run
unchanged on CPU tensors: the rendered source is compiled with g++ together
with one small C wrapper per kernel instantiation. Every launch registers the
tensors it was given; any global access outside them, misaligned vector
access, barrier or warp-operation misuse, or two blocks storing to one
element raises :class:`EmuError`. Floating point follows the GPU build
(flush-to-zero, contracted multiply-adds); the schedule is the runner's
``order`` (see ORDERS).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

from gspngen.render.cuda import PARAMS
from gspngen.runtime.cuda_build import BASE_OPTIONS, FTZ

HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++") or shutil.which("c++")
_C_TYPES = {"in": "const gs_t*", "out": "gs_t*", "f32": "float*", "vptr": "void*", "i32": "int"}
_FAMILY = re.compile(r"gspn_(fwd_oc|fwd_ml_cl|bwd_ml_cl|fwd_ml|bwd_ml|fwd_cl|bwd_cl|fwd|bwd|ps_fwd|ps_merge|ps_bwd_out|"
                     r"ps_bwd_step|tr)<")


FMAD = "-fmad=true" in BASE_OPTIONS  # the GPU build contracts a * b + c into one rounding


def host_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


class EmuError(AssertionError):
    pass


def _wrapper(i: int, name: str) -> str:
    m = _FAMILY.match(name)
    if not m:
        raise ValueError(f"unknown kernel {name!r}")
    params = PARAMS[m.group(1)]
    args = ", ".join(f"*({_C_TYPES[kind]}*)a[{j}]" for j, (kind, _) in enumerate(params))
    # cluster kernels fix their cluster size at compile time (__cluster_dims__): the last template argument
    # (the one-launch entries: the first, before the per-direction structs)
    family = m.group(1)
    if family.endswith("_ml_cl"):
        cluster = int(name[m.end():].split(",", 1)[0])
    else:  # the plain cluster entries: the 11th (RING, a defaulted flag, may follow)
        cluster = int(name[m.end():].rstrip(" >").split(",")[10]) if family.endswith("_cl") else 1
    return (f'extern "C" int emu_k{i}(unsigned grid, unsigned block, unsigned smem, int order, void** a)\n'
            f"{{\n    return emu::launch(grid, block, smem, order, [=] {{ {name}({args}); }}, {cluster});\n}}\n")


class _Lib:
    def __init__(self, path: Path, names: Sequence[str]):
        self.dll = ctypes.CDLL(str(path))
        self.dll.emu_error.restype = ctypes.c_char_p
        self.dll.emu_checks.restype = ctypes.c_longlong
        self.dll.emu_bytes.restype = ctypes.c_longlong
        self.dll.emu_bytes.argtypes = [ctypes.c_int]
        self.dll.emu_reset_bytes.argtypes = [ctypes.c_int]
        self.dll.emu_set_ftz.argtypes = [ctypes.c_int]
        self.dll.emu_set_ranges.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong),
                                            ctypes.POINTER(ctypes.c_ulonglong)]
        self.index = {n: i for i, n in enumerate(names)}


class EmuKernel:
    def __init__(self, lib: _Lib, name: str):
        self.lib, self.name = lib, name
        self.fn = getattr(lib.dll, f"emu_k{lib.index[name]}")
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]


# Schedules (emu.h, ORDER_*): lockstep first to last / last to first, the lowest / highest warp
# running ahead through its __syncwarp's, and seeded random (any order >= RANDOM).
RR, RR_REV, AHEAD, AHEAD_LAST, RANDOM = 0, 1, 2, 3, 16
ORDERS = (RR, RR_REV, AHEAD, AHEAD_LAST, RANDOM, RANDOM + 1)


class EmuRunner:
    """order: the schedule of threads, warps and blocks (RR, RR_REV, AHEAD, AHEAD_LAST, RANDOM + seed);
    a correct kernel gives bit-identical results under every one (atomics aside)."""

    def __init__(self, order: int = 0, sm_count: int = 2, smem_limit: int = 227 * 1024, opt: str = "-O1",
                 ftz: bool = FTZ, fma: bool = FMAD):
        if CXX is None:
            raise RuntimeError("the CUDA emulator needs a C++ compiler (g++)")
        self.order = order
        self.ftz = ftz  # fp32 subnormals flushed as the GPU build compiles them (cuda_build.FTZ)
        # multiply-adds contracted as the GPU build's -fmad=true does (the same policy, not necessarily the
        # same pairs as NVCC picks); g++ contracts only with -fexpensive-optimizations, so -O0 becomes -O1
        self.fma = fma and host_has_fma()
        self.sm_count, self.smem_limit = sm_count, smem_limit
        self.opt = opt
        self._libs: dict[str, list[_Lib]] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="gspn_emu_"))
        self.launches: list[tuple[str, int, int, int]] = []
        # global-memory bytes of the checked accesses, per kernel name: [loaded, stored, atomically added];
        # with count_distinct, three more: the same counting each byte once per launch
        self.bytes: dict[str, list[int]] = {}
        self.count_distinct = False

    def flags(self) -> list[str]:
        flags = self.opt.split()
        if self.fma:
            flags = [f for f in flags if not f.startswith("-O")]
            flags += ["-O1", "-fexpensive-optimizations", "-mfma", "-ffp-contract=fast"]
        return flags

    def _paths(self, source: str, names: list[str]) -> tuple[Path, Path]:
        key = hashlib.sha256((source + "\0" + "\0".join(names + self.flags())).encode()).hexdigest()[:16]
        return self._dir / f"k{key}.cpp", self._dir / f"k{key}.so"

    def _command(self, src: Path, lib: Path) -> list[str]:
        return [CXX, "-std=c++17", *self.flags(), "-shared", "-fPIC", "-w", "-include", str(HERE / "emu.h"),
                f"-I{HERE}", str(src), "-o", str(lib)]

    def build_many(self, jobs: Sequence[tuple[str, Sequence[str]]], parallel: int = 2) -> list[_Lib]:
        """Build several (source, kernel names) libraries, `parallel` compilers at a time."""
        todo, out = [], []
        for source, names in jobs:
            names = list(dict.fromkeys(names))
            src, lib = self._paths(source, names)
            if not lib.exists():
                src.write_text(source + "\n" + "\n".join(_wrapper(i, n) for i, n in enumerate(names)))
                todo.append((src, lib))
            out.append((source, names, lib))
        running: list[subprocess.Popen] = []
        for src, lib in todo:
            while len(running) >= parallel:
                self._finish(running.pop(0))
            running.append(subprocess.Popen(self._command(src, lib), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True))
        for proc in running:
            self._finish(proc)
        built = []
        for source, names, lib in out:
            b = _Lib(lib, names)
            self._libs.setdefault(hashlib.sha256(source.encode()).hexdigest(), []).append(b)
            built.append(b)
        return built

    @staticmethod
    def _finish(proc: subprocess.Popen) -> None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("emulator build failed:\n" + err[-6000:])

    def build(self, source: str, names: Sequence[str]) -> _Lib:
        return self.build_many([(source, names)])[0]

    def kernel(self, device, source: str, name: str, names: Sequence[str]) -> EmuKernel:
        for lib in self._libs.get(hashlib.sha256(source.encode()).hexdigest(), []):
            if name in lib.index:
                return EmuKernel(lib, name)
        return EmuKernel(self.build(source, list(names) + [name]), name)

    def launch(self, kernel: EmuKernel, device, grid: int, block: int, smem: int,
               args: Sequence[tuple[str, Any]]) -> None:
        import torch

        holders, ptrs, lo, hi = [], [], [], []
        for kind, value in args:
            if kind == "i32":
                h = ctypes.c_int(int(value))
            else:
                if value is not None:
                    assert isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.is_contiguous()
                    lo.append(value.data_ptr())
                    hi.append(value.data_ptr() + value.numel() * value.element_size())
                h = ctypes.c_void_p(None if value is None else value.data_ptr())
            holders.append(h)
            ptrs.append(ctypes.cast(ctypes.pointer(h), ctypes.c_void_p))
        arr = (ctypes.c_void_p * len(ptrs))(*[p.value for p in ptrs])
        n = len(lo)
        lib = kernel.lib.dll
        lib.emu_set_ranges(n, (ctypes.c_ulonglong * n)(*lo), (ctypes.c_ulonglong * n)(*hi))
        self.launches.append((kernel.name, grid, block, smem))
        lib.emu_reset_bytes(int(self.count_distinct))
        lib.emu_set_ftz(int(self.ftz))
        rc = kernel.fn(grid, block, smem, self.order, arr)
        moved = self.bytes.setdefault(kernel.name, [0] * 6)
        for i in range(6):
            moved[i] += lib.emu_bytes(i)
        if rc != 0:
            raise EmuError(f"{kernel.name}: {lib.emu_error().decode()}")

    def limits(self, device) -> tuple[int, int]:
        return self.sm_count, self.smem_limit

    clusters_ok = True  # the emulator runs thread block clusters (emu.h)

    def clusters(self, device) -> bool:
        return self.clusters_ok

    def with_order(self, order: int) -> "EmuRunner":
        """A runner with another schedule sharing this one's builds (g++ builds dominate the time);
        closing it leaves the builds to this one."""
        other = copy.copy(self)
        other.order = order
        other.launches, other.bytes = [], {}
        other._owner = False
        return other

    def close(self) -> None:
        if getattr(self, "_owner", True):
            shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
