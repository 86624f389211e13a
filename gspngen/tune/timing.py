"""The one timing module: ``gspngen bench`` and the autotuner measure with the same code.

- :func:`time_calls`: warm-up, then per-call times. On a GPU each call sits
  between CUDA events, the timed calls are queued behind a spin kernel so host
  overhead the GPU can hide does not count, and an optional ``flush`` runs
  between repetitions (outside the events) so the L2 cache does not flatter
  a candidate; on the CPU ``time.perf_counter`` is the clock. A time budget
  cuts warm-up and repetitions of slow calls.
- :func:`rotation_copies` / :func:`_prepare_copies`: several copies of the
  inputs, used in turn, so caches see a working set larger than themselves.
- :func:`summarize`: median, spread and count of a timing (what the tuner stores).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import torch

from ..spec import Spec

Shape = tuple[int, int, int, int]  # (N, C, H, W), whatever the layout
ARG_NAMES = ("x", "w", "lam", "u", "s", "m")
TILE = 32  # inputs are a make_inputs tile of at most TILE x TILE pixels, repeated (values don't change speed)
GIB = 1 << 30
MIB = 1 << 20



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int = 2, iters: int = 10) -> dict[str, Any]:
    """Median bandwidth of ``dst.copy_(src)`` over ``nbytes`` (read + write counted: 2 * nbytes)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = max(statistics.median(time_calls(lambda i: dst.copy_(src), device, warmup=warmup, iters=iters).ms), 1e-6)
    del src, dst
    return {"bytes": 2 * nbytes, "buffer_bytes": nbytes, "median_ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9,
            "iters": iters}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

@dataclass
class Timing:
    """Per-call milliseconds: ``ms`` on the device's clock, ``host_ms`` until the call returned on the host."""

    ms: list[float]
    host_ms: list[float]


@lru_cache(maxsize=None)
def _spin_cycles_per_ms(device_index: int) -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond, measured once per device."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # first launch outside the measurement
    begin.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize(device_index)
    return cycles / max(begin.elapsed_time(end), 1e-3)


def _queue_ahead(device: torch.device, ms: float) -> None:
    """Keep the GPU busy for about ``ms`` so the host can queue the timed calls ahead of it.

    Without it a call whose host work (Python, the dispatcher, argument
    packing) exceeds its GPU work would be timed as host time; with it the
    events measure the kernels, which is what the bandwidth is about.
    """
    if ms <= 0 or not hasattr(torch.cuda, "_sleep"):
        return
    with torch.cuda.device(device):
        torch.cuda._sleep(int(min(ms, 1000.0) * _spin_cycles_per_ms(torch.cuda.current_device())))


def time_calls(fn: Callable[[int], Any], device: torch.device, *, warmup: int, iters: int,
               max_seconds: Optional[float] = None, flush: Optional[Callable[[], Any]] = None) -> Timing:
    """Time up to ``iters`` calls ``fn(i)`` after ``warmup`` untimed ones.

    ``i`` counts every call, so a caller indexing copies with ``i % n``
    rotates through them without repeating the last warm-up copy.

    On a GPU each call sits between two CUDA events and the timed calls are
    queued behind a spin kernel as long as the host needs to issue them (from
    the last warm-up call, at most 1 s), so the events measure GPU time:
    kernels and the gaps between a call's own launches, not the Python
    overhead the GPU would hide. On CPU the wall clock is the measure. With
    ``max_seconds``, warm-up stops after two calls once it has used a quarter
    of it, and the last warm-up call decides whether ``iters`` calls fit; if
    not, fewer run (at least 3) and the caller sees it in the length of the
    result. ``flush`` (see :func:`l2_flusher`) runs between timed calls on a
    GPU, outside the events, so each call starts with a cold L2.
    """
    i = 0
    total = host = spent = 0.0
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        if flush is not None and device.type == "cuda":
            flush()  # part of each timed call's host work: the queue-ahead below must cover it too
        host = time.perf_counter() - t0
        _sync(device)
        total = time.perf_counter() - t0
        spent += total
        i += 1
        if max_seconds is not None and i >= 2 and spent > max_seconds / 4:
            break  # a slow baseline is warm after two calls; more would only spend the budget
    if max_seconds is not None and warmup and total * iters > max_seconds:
        iters = min(iters, max(3, int(max_seconds / max(total, 1e-9))))
    host_ms: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        _queue_ahead(device, 1.25 * host * 1e3 * iters + 0.1)
        for begin, end in events:
            t0 = time.perf_counter()
            begin.record()
            fn(i)
            end.record()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            i += 1
            if flush is not None:
                flush()
        torch.cuda.synchronize(device)
        return Timing([begin.elapsed_time(end) for begin, end in events], host_ms)
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(i)
        host_ms.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return Timing(list(host_ms), host_ms)


_FLUSH_BUFFERS: dict[int, torch.Tensor] = {}


def l2_flusher(device: torch.device) -> Optional[Callable[[], Any]]:
    """A GPU call that evicts the L2 cache (writes a buffer twice its size), or None on the CPU.

    Rotating input copies keeps *inputs* cold; the flush also evicts the
    outputs and the saved tensor the previous repetition left in L2.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _FLUSH_BUFFERS.get(index)
    if buf is None:
        l2 = int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 50 * MIB)
        buf = _FLUSH_BUFFERS[index] = torch.empty(2 * l2, dtype=torch.uint8, device=torch.device("cuda", index))
    return buf.zero_


def summarize(ms: list[float]) -> dict[str, Any]:
    """What the tuner stores of a timing: median, spread (max - min over the median) and repetitions."""
    med = max(statistics.median(ms), 1e-6)  # a clock tick, never a division by zero
    return {"median_ms": med, "min_ms": min(ms), "max_ms": max(ms),
            "spread": (max(ms) - min(ms)) / med, "reps": len(ms)}


def rotation_copies(set_bytes: int, cache_bytes: int, budget_bytes: int, max_copies: int = 128) -> int:
    """How many copies of a working set to rotate so caches don't flatter.

    A set at least twice the cache flushes it by itself (1 copy); a smaller one
    is copied until the copies together exceed twice the cache, within the
    memory budget and ``max_copies``.
    """
    set_bytes = max(int(set_bytes), 1)
    want = 1 if set_bytes >= 2 * cache_bytes else 1 + math.ceil(2 * cache_bytes / set_bytes)
    fit = max(1, int(budget_bytes) // set_bytes)
    return max(1, min(want, fit, max_copies))



def _device_budget(device: torch.device) -> tuple[int, int]:
    """(cache bytes to defeat, memory bytes the rotated copies may use)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * MIB)
        free, _ = torch.cuda.mem_get_info(device)
        return l2, int(free * 0.3)  # the rest: outputs, saved tensors, gradients
    return 32 * MIB, 1 * GIB  # a typical last-level cache; CPU runs exercise the harness


def _free(device: torch.device) -> None:
    """Return cached GPU memory between rows; best effort (a crashed kernel may have broken the context)."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:
            pass


def base_inputs(spec: Spec, shape: Shape, seed: int = 0) -> dict[str, Optional[torch.Tensor]]:
    """One tile of inputs from ``make_inputs``: batch 1, at most TILE x TILE pixels, fp32, on the host.

    ``make_inputs`` draws in float64 on the host, far too slow for the large
    suite shapes (billions of elements); the values do not change the speed
    of a scan, so :func:`_prepare_copies` tiles this one on the device.
    """
    from ..testing import make_inputs

    _, C, H, W = shape
    return make_inputs(spec, 1, C, min(H, TILE), min(W, TILE), dtype=torch.float32, device="cpu", seed=seed)


def _tile(t: torch.Tensor, spec: Spec, shape: Shape) -> torch.Tensor:
    """Repeat a batch-1 tile along the batch and the image axes up to ``shape`` (layout-aware), contiguous."""
    N, _, H, W = shape
    h_axis = t.dim() - (3 if spec.layout == "nhwc" else 2)  # (..., H, W, C) or (..., H, W)
    reps = [1] * t.dim()
    reps[0] = N
    reps[h_axis] = -(-H // t.shape[h_axis])
    reps[h_axis + 1] = -(-W // t.shape[h_axis + 1])
    return t.repeat(*reps).narrow(h_axis, 0, H).narrow(h_axis + 1, 0, W).contiguous()


def _prepare_copies(spec: Spec, shape: Shape, dtype: torch.dtype, device: torch.device, base: dict,
                    n_copies: int, seed: int) -> tuple[list[dict], list[torch.Tensor]]:
    """``n_copies`` distinct input sets and gy tensors for ``shape`` in ``dtype`` on the device.

    The inputs are ``base`` (see :func:`base_inputs`) tiled up to ``shape``;
    gy is drawn on the device.
    """
    from ..backends.base import result_shape
    from ..validate import validate_inputs

    first = {}
    for name in ARG_NAMES:
        t = base[name]
        if t is not None:
            t = t.to(device=device, dtype=dtype)
            t = t if name == "m" else _tile(t, spec, shape)
        first[name] = t
    validate_inputs(spec, *(first[a] for a in ARG_NAMES))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    gy = torch.randn(result_shape(spec, first["x"]), generator=gen, device=device).to(dtype)
    copies = [first] + [{a: None if t is None else t.clone() for a, t in first.items()} for _ in range(n_copies - 1)]
    gys = [gy] + [gy.clone() for _ in range(n_copies - 1)]
    return copies, gys
