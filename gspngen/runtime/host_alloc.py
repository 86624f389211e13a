"""Large CPU output tensors on transparent huge pages, kept for reuse once freed.

A fresh CPU tensor of many megabytes costs more than its kernel expects.
glibc hands allocations above its mmap threshold (dynamic, at most 32 MB)
straight to the kernel and unmaps them on free, so every call pays a page
fault per page it writes, and the kernel zeroes each page first:

- on 4 KB pages, the backward of ``examples/gspn4.yaml`` at (2, 32, 128, 128)
  fp32 (54 MB of gradients, about 13,000 faults) took 72 ms against 51 ms
  with the gradients on 2 MB pages (one thread);
- on 2 MB pages the faults are few but the zeroing stays: the same backward
  spent 16 ms of system time per call (2 threads, 114 faults, measured with
  getrusage around the call) of about 28 ms wall, because its 48 MB weight
  gradient is above glibc's threshold and is unmapped after every step.

So the CPU backend takes its large outputs from here: anonymous private
mappings, the view starting on a 2 MB boundary, ``madvise(MADV_HUGEPAGE)``
over them, and, when the last tensor viewing a mapping dies, the mapping goes
back to a small free list instead of to the kernel, for the next call of the
same size class (a training loop allocates the same gradients every step),
as PyTorch's CUDA caching allocator does on the GPU. The free list holds at
most ``GSPNGEN_HOST_CACHE_MB`` megabytes (default 1024; 0 disables reuse);
:func:`empty_cache` releases it, :func:`cached_bytes` reports it. Where
huge pages are unavailable (not Linux, THP disabled, madvise refused) the
mappings are the same on ordinary pages.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import torch

HUGE = 2 << 20  # the x86-64 and arm64 transparent huge page
MIN_BYTES = 2 * HUGE  # below this the faults are few and the slack would dominate

_lock = threading.RLock()  # reentrant: a release may run from a collection inside empty()
_free: "OrderedDict[int, list[_Mapping]]" = OrderedDict()  # size class -> free mappings, oldest class first
_free_bytes = 0


class _Mapping:
    """One anonymous private mapping; ``start``: offset of its first 2 MB boundary; ``size``: usable bytes."""

    __slots__ = ("mm", "start", "size")

    def __init__(self, size: int):
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        # private, never shared: a forked child must not write into the parent's tensors
        self.mm = mmap.mmap(-1, size + HUGE, flags=flags) if flags else mmap.mmap(-1, size + HUGE)
        probe = ctypes.c_char.from_buffer(self.mm)
        address = ctypes.addressof(probe)
        del probe  # the export would keep the mapping from closing
        self.start = (-address) % HUGE
        self.size = size
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                self.mm.madvise(advice, self.start, size)
            except (OSError, ValueError):  # advice only: ordinary pages then
                pass


def _limit() -> int:
    raw = os.environ.get("GSPNGEN_HOST_CACHE_MB", "1024")
    try:
        return max(0, int(raw)) << 20
    except ValueError:
        raise ValueError(f"GSPNGEN_HOST_CACHE_MB: expected a whole number of megabytes, got {raw!r}") from None


def _release(mapping: _Mapping) -> None:
    """Called when the last tensor viewing ``mapping`` dies: keep it for reuse, within the limit."""
    global _free_bytes
    with _lock:
        try:
            limit = _limit()
        except ValueError:  # reported by empty(); a finalizer cannot raise usefully
            limit = 0
        if mapping.size > limit:
            return  # dropped: the mapping is unmapped when collected
        _free.setdefault(mapping.size, []).append(mapping)
        _free.move_to_end(mapping.size)
        _free_bytes += mapping.size
        while _free_bytes > limit:  # evict the least recently freed size classes first
            size, maps = next(iter(_free.items()))
            maps.pop(0)
            _free_bytes -= size
            if not maps:
                del _free[size]


def _take(size: int) -> _Mapping:
    global _free_bytes
    with _lock:
        maps = _free.get(size)
        if maps:
            _free_bytes -= size
            mapping = maps.pop()
            if not maps:
                del _free[size]
            return mapping
    return _Mapping(size)


def cached_bytes() -> int:
    """Bytes of freed output mappings held for reuse."""
    with _lock:
        return _free_bytes


def empty_cache() -> None:
    """Return every freed output mapping to the operating system."""
    global _free_bytes
    with _lock:
        _free.clear()
        _free_bytes = 0


def empty(shape, dtype: torch.dtype, fill: Optional[float] = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU; when large, on huge pages and from the free list
    (contiguous, starting on a 2 MB boundary). ``fill``: a value written over it."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES:
        out = torch.empty(shape, dtype=dtype)
    else:
        _limit()  # GSPNGEN_HOST_CACHE_MB checked here, where its error can be seen
        mapping = _take(-(-nbytes // HUGE) * HUGE)
        view = memoryview(mapping.mm)[mapping.start:mapping.start + nbytes]
        raw = torch.frombuffer(view, dtype=torch.uint8)  # holds `view` until its storage dies
        weakref.finalize(view, _release, mapping).atexit = False
        del view
        out = raw.view(dtype).view(shape)
    if fill is not None:
        out.fill_(fill)
    return out
