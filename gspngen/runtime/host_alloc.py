"""Large CPU output tensors on transparent huge pages.

A fresh CPU tensor of many megabytes comes from ``mmap`` (glibc hands
allocations above its threshold, at most 32 MB, straight to the kernel and
returns them on free), so the kernel that first writes it takes one page
fault per 4 KB page, each zeroing its page: for the backward of
``examples/gspn4.yaml`` at (2, 32, 128, 128) fp32, 54 MB of gradients, about
13,000 faults, measured at 72 ms against 51 ms for the same call with the
gradients on 2 MB pages (one thread; ``THP_MEM_ALLOC_ENABLE=1`` makes
PyTorch's own allocator do the same for every tensor). So the CPU backend
allocates its large outputs here: 2 MB more than needed, the view starting at
a 2 MB boundary, and ``madvise(MADV_HUGEPAGE)`` over it (the untouched slack
is never faulted in, so it costs address space, not memory). Where huge
pages are unavailable (not Linux, THP disabled, madvise refused), the tensor
is the same, on ordinary pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from functools import lru_cache
from typing import Optional

import torch

HUGE = 2 << 20  # the x86-64 and arm64 transparent huge page
MIN_BYTES = 2 * HUGE  # below this the faults are few and the slack would dominate
MADV_HUGEPAGE = 14


@lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, or None where there is none to call (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape, dtype: torch.dtype, fill: Optional[float] = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, on huge pages when it is large enough
    (contiguous, possibly with a storage offset); ``fill``: a value written over it."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise() if nbytes >= MIN_BYTES else None
    if madvise is None:
        out = torch.empty(shape, dtype=dtype)
    else:
        raw = torch.empty(nbytes + HUGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % HUGE
        madvise(raw.data_ptr() + start, nbytes // HUGE * HUGE, MADV_HUGEPAGE)  # advice: failure is harmless
        out = raw[start:start + nbytes].view(dtype).view(shape)
    if fill is not None:
        out.fill_(fill)
    return out
