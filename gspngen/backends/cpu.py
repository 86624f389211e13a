"""The CPU backend: generated C++ (gspngen/render/cpu.py) with OpenMP threads and SIMD loops.

The source is built by the system C++ compiler at first use (and cached on
disk, see gspngen/runtime/cpu_build.py) and called through ctypes with the
data pointers of contiguous tensors. Storage fp64 and fp32, plus the spec's
16-bit precisions (fp16/bf16 storage, fp32 math). The forward saves h in the
storage dtype with the shape of lam, whatever the configuration.

Every shape is checked here before the call; the kernels use 64-bit
offsets. The thread count is ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..geometry import image_dims
from ..render import cpu as rc
from ..runtime import host_alloc
from ..spec import Spec
from ..validate import check_whole_groups
from .base import Grads, result_shape

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dims(spec: Spec, x: torch.Tensor) -> tuple[int, int, int, int]:
    return image_dims(x.shape, spec.layout)


def saved_shape(spec: Spec, x: torch.Tensor) -> tuple[int, ...]:
    """The stored h: the shape of lam, (N, D, C, H, W) or (N, D, H, W, C)."""
    N, C, H, W = _dims(spec, x)
    D = spec.num_directions
    return (N, D, H, W, C) if spec.layout == "nhwc" else (N, D, C, H, W)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


class CpuBackend:
    """The generated C++ kernels. ``poison``: tests NaN-fill every output the kernels must write."""

    name = "cpu"

    def __init__(self, fwd: str = "", bwd: str = "", poison: bool = False):
        self.fwd_key, self.bwd_key = fwd, bwd
        self.poison = poison

    # -- the config protocol ---------------------------------------------------
    def candidates(self, spec: Spec, dtype: str, pass_: str, shape) -> list[str]:
        if pass_ not in ("fwd", "bwd"):
            raise ValueError(f"pass_: expected 'fwd' or 'bwd', got {pass_!r}")
        keys = [cfg.key(spec) for cfg in rc.candidate_configs(spec, int(torch.get_num_threads()))]
        # the default first, as "" (the protocol's name for it): the tuner's default is then the
        # bare "cpu" that auto runs when nothing is tuned
        return [""] + [k for k in dict.fromkeys(keys[1:]) if k != keys[0]]

    def with_config(self, fwd: str = "", bwd: str = "") -> "CpuBackend":
        # Keys are checked against a spec when a pass runs (nhwc specs have a cb field); here,
        # against the union of the fields, so that a malformed key fails at once.
        from .base import parse_config_key

        for key in (fwd, bwd):
            for name, value in parse_config_key(key, "backend").items():
                choices = rc.CHOICES.get(name)
                if choices is None or not value.isdigit() or int(value) not in choices:
                    raise ValueError(f"backend: {key!r} is not a cpu config (fields tile in {list(rc.TILES)}, "
                                     f"threads in {list(rc.THREADS)}, cb in {list(rc.CBS)} for nhwc specs)")
        return CpuBackend(fwd, bwd, self.poison)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cpu":
            return f"cpu runs on CPU tensors, not {device.type}"
        from ..runtime.cpu_build import unavailable_reason

        return unavailable_reason()

    def available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) is None

    def saved_shape(self, spec: Spec, x: torch.Tensor):
        return saved_shape(spec, x), x.dtype

    # -- helpers ---------------------------------------------------------------
    def _out(self, shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        # large outputs on huge pages: first-touch page faults were a third of the backward
        return host_alloc.empty(shape, dtype or like.dtype, fill=float("nan") if self.poison else None)

    def _entry(self, spec: Spec, x: torch.Tensor, kind: str):
        if x.device.type != "cpu":
            raise ValueError(f"x: the cpu backend runs on CPU tensors, got device {x.device}")
        dname = DTYPE_NAMES.get(x.dtype)
        supported = rc.dtypes(spec)
        if dname not in supported:
            raise TypeError(f"x: the cpu backend has kernels for dtypes {list(supported)} for spec "
                            f"'{spec.name}' (fp64, fp32 and its 16-bit precisions), got {x.dtype}")
        from ..runtime.cpu_build import load_library

        lib = load_library(rc.kernel_source(spec), f"spec '{spec.name}'")
        fn = getattr(lib, f"gspn_{kind}_{dname}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        return fn

    def _args(self, spec: Spec, x: torch.Tensor, key: str) -> ctypes.Array:
        cfg = rc.parse_config(spec, key, "backend")
        N, C, H, W = _dims(spec, x)
        check_whole_groups(spec, C)  # the public API checked it; a direct call must not reach C / G
        threads = cfg.thread_count(int(torch.get_num_threads()))
        chunk = int(spec.chunk) if spec.chunk is not None else 0
        return (ctypes.c_int64 * 9)(N, C, spec.groups(C), H, W, chunk, threads, cfg.tile, cfg.cb)

    @staticmethod
    def _call(fn, ptrs: list[Optional[int]], args) -> None:
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        rc_ = fn(arr, args)
        if rc_ == 1:
            raise MemoryError("cpu backend: could not allocate the kernels' scratch buffers")
        if rc_ != 0:
            raise RuntimeError(f"cpu backend: kernel refused its arguments (code {rc_})")

    # -- passes ----------------------------------------------------------------
    skips_saved = True  # forward(..., need_saved=False) writes no h

    def forward(self, spec: Spec, x, w, lam, u, s, m, need_saved: bool = True):
        """``need_saved=False``: h is not stored (a plane of writes per direction less); saved is empty."""
        fn = self._entry(spec, x, "fwd")
        x, w, lam, u, s, m = (None if t is None else t.contiguous() for t in (x, w, lam, u, s, m))
        y = self._out(result_shape(spec, x), x)
        saved = self._out(saved_shape(spec, x), x) if need_saved else x.new_empty((0,))
        if x.numel() == 0:
            return y.zero_(), saved.zero_()
        args = self._args(spec, x, self.fwd_key)
        self._call(fn, [_ptr(t) for t in (x, w, lam, u, s, m, y, saved)], args)
        return y, saved

    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved) -> Grads:
        fn = self._entry(spec, x, "bwd")
        want = saved_shape(spec, x)
        if saved is None or tuple(saved.shape) != want or saved.dtype != x.dtype:
            got = None if saved is None else (tuple(saved.shape), saved.dtype)
            raise ValueError(f"saved: expected the stored h of shape {want} and dtype {x.dtype} from the cpu "
                             f"forward, got {got}")
        if tuple(gy.shape) != result_shape(spec, x) or gy.dtype != x.dtype:
            raise ValueError(f"gy: expected shape {result_shape(spec, x)} and dtype {x.dtype}, "
                             f"got {tuple(gy.shape)} and {gy.dtype}")
        gy, x, w, lam, u, s, m, saved = (None if t is None else t.contiguous()
                                         for t in (gy, x, w, lam, u, s, m, saved))
        N, C, H, W = _dims(spec, x)
        check_whole_groups(spec, C)  # the public API checked it; a direct call must not reach C / G
        G = spec.groups(C)
        gx = self._out(x.shape, x)
        glam = self._out(lam.shape, lam)
        gu = self._out(u.shape, u) if u is not None else None
        gs = self._out(s.shape, s) if s is not None else None
        gw = self._out(w.shape, w)
        gm = self._out(m.shape, m) if m is not None else None
        if x.numel() == 0:
            return tuple(None if t is None else t.zero_() for t in (gx, gw, glam, gu, gs, gm))
        gwide = None
        cfg = rc.parse_config(spec, self.bwd_key, "backend")
        whole_groups = spec.layout == "nhwc" and min(cfg.cb, C) % (C // G) == 0  # summed inside each item
        if G != C and not whole_groups:
            # per-channel weight gradients in the math dtype; the kernel sums each group's channels
            wide = list(w.shape)
            wide[-1 if spec.layout == "nhwc" else 3] = C
            gwide = self._out(wide, x, torch.float64 if x.dtype == torch.float64 else torch.float32)
        args = self._args(spec, x, self.bwd_key)
        self._call(fn, [_ptr(t) for t in (gy, x, w, lam, u, s, m, saved, gx, gw, gwide, glam, gu, gs, gm)], args)
        return gx, gw, glam, gu, gs, gm
