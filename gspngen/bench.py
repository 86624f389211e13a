"""Benchmark harness: how far each backend is from the memory-bandwidth limit.

For each shape, dtype and backend it times the forward op (``gspngen::scan``,
no autograd: the training forward, which stores h), the forward as a module
runs it under ``torch.no_grad()`` (no h store), and exactly the backward op (``gspngen::scan_backward`` with the
backend's own saved tensor and a fixed gy), counts the *minimal* bytes the
pass must move, and divides: effective bandwidth = minimal bytes / median
time. The bandwidth of a large copy (``dst.copy_(src)``, read + write) is
measured in the same run on the same device, so "fraction of copy" is the
distance to the practical limit. Speedups are reported against the reference
backend and against ``cuda_per_step`` (GSPN-1's launch structure).

Caches must not flatter: every timed call uses the next of several copies of
the inputs (and of gy), enough copies that together they exceed twice the L2
cache when memory allows. Inputs are a ``make_inputs`` tile repeated up to the
shape (values do not change a scan's speed; drawing billions on the host would).

GPU timings use CUDA events around each call, with the timed calls queued
behind a spin kernel so that host overhead the GPU can hide does not count
(see :func:`time_calls`); CPU timings use ``time.perf_counter`` (CPU ops are
synchronous). On a machine without a GPU only the reference backend runs, on
CPU, with the suite scaled down, so this harness is exercised in CI.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .spec import Spec
from .validate import expected_shapes
from .tune.timing import (  # noqa: F401  (the one timing module; re-exported for callers)
    GIB, MIB, TILE, Timing, _device_budget, _free, _prepare_copies, _queue_ahead, _spin_cycles_per_ms, _sync,
    _tile, base_inputs, measure_copy_bandwidth, rotation_copies, time_calls,
)

Shape = tuple[int, int, int, int]  # (N, C, H, W), whatever the layout

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARG_NAMES = ("x", "w", "lam", "u", "s", "m")
BASELINES = ("reference", "cuda_per_step")
GPU_BACKENDS = ("cuda", "triton", "cuda_per_step", "reference")
STATIC_BACKENDS = ("cuda",)  # backends the static performance model (gspngen/perfmodel.py) describes

# (shape, why it is in the suite)
PAPER_SUITE: tuple[tuple[Shape, str], ...] = (
    ((16, 8, 1024, 1024), "GSPN-2's benchmark"),
    ((1, 1152, 64, 64), "GSPN-2 bandwidth table"),
    ((1, 32, 128, 128), "GSPN-2 bandwidth table"),
    ((1, 128, 512, 512), "GSPN-2 bandwidth table"),
    ((64, 144, 56, 56), "an ImageNet stage"),
    ((1, 16, 2048, 2048), "large global scan"),
)
SUITES = {"paper": PAPER_SUITE}

MIN_GPU_ITERS = 20
TIMING_GPU = ("CUDA events around each call; the timed calls are queued behind a spin kernel so host "
              "overhead the GPU can hide does not count (host_median_ms shows it)")
TIMING_CPU = "time.perf_counter around each call"


# ---------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------

def dtype_size(dtype: "torch.dtype | str") -> int:
    """Bytes per element of a torch dtype or of a name in DTYPES."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)} or a torch dtype, got {dtype!r}")
        dtype = DTYPES[dtype]
    return torch.empty((), dtype=dtype).element_size()


def byte_breakdown(spec: Spec, N: int, C: int, H: int, W: int, dtype: "torch.dtype | str",
                   pass_: str = "forward") -> dict[str, dict[str, int]]:
    """Minimal bytes of one pass, per tensor: ``{"read": {name: bytes}, "write": {name: bytes}}``.

    The minimum is what any implementation must move: every input read once and
    every output written once, in the storage dtype.

    - forward reads x (C per pixel), w (k*G per pixel per direction), lam, and
      u / s / m where the spec uses them (C per pixel per direction; m is D
      scalars); it writes y (C per pixel, D*C for ``merge: stack``).
    - backward reads gy (the size of y) and every forward input — each
      gradient depends on them — and writes one gradient per input (gx, gw,
      glam, gu, gs, gm), each the size of its input.

    Intermediates count against the backend: the ``saved`` tensor a backend
    keeps between forward and backward (h, say), or the forward output it
    re-reads, is its own choice and is *not* in the minimum, so storing it
    lowers the effective bandwidth rather than raising the limit. The layout
    does not change the counts.
    """
    if pass_ not in ("forward", "backward"):
        raise ValueError(f"pass_: expected 'forward' or 'backward', got {pass_!r}")
    size = dtype_size(dtype)
    inputs = {name: math.prod(shape) * size for name, shape in expected_shapes(spec, N, C, H, W).items()}
    y = N * C * H * W * size * (spec.num_directions if spec.merge == "stack" else 1)
    if pass_ == "forward":
        return {"read": dict(inputs), "write": {"y": y}}
    return {"read": {"gy": y, **inputs}, "write": {"g" + name: b for name, b in inputs.items()}}


def minimal_bytes(spec: Spec, N: int, C: int, H: int, W: int, dtype: "torch.dtype | str",
                  pass_: str = "forward") -> int:
    """Total of :func:`byte_breakdown`: the bytes a roofline implementation moves in one pass."""
    parts = byte_breakdown(spec, N, C, H, W, dtype, pass_)
    return sum(parts["read"].values()) + sum(parts["write"].values())


# ---------------------------------------------------------------------------
# Environment and the copy-bandwidth limit
# ---------------------------------------------------------------------------

def _module_version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except Exception:  # absent, or present but broken (e.g. CUDA libraries missing): report None
        return None
    return str(getattr(module, "__version__", None) or "") or None


def environment(device: torch.device) -> dict[str, Any]:
    """The device and the versions that decide the numbers (None where absent)."""
    from . import __version__

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cupy": _module_version("cupy"),
        "triton": _module_version("triton"),
        "python": platform.python_version(),
        "gspngen": __version__,
    }




# ---------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------

@dataclass
class BenchConfig:
    """What to run. ``None`` fields take the device's default (chosen in :func:`run_bench`)."""

    shapes: Sequence[Shape] = ()
    suite: Optional[str] = None
    dtypes: Sequence[str] = ("fp32",)
    backends: Optional[Sequence[str]] = None
    device: Optional[str] = None  # "cuda" | "cpu" | None (cuda when available)
    warmup: Optional[int] = None
    iters: Optional[int] = None
    copy_bytes: Optional[int] = None
    reference_max_elements: int = 1 << 23  # N*C*H*W above which the reference is skipped on a GPU
    reference_iters: int = 5  # the reference is slow: few timed runs on a GPU
    cpu_suite_max_elements: int = 1 << 12  # suite shapes are scaled down to about this on CPU
    max_seconds: float = 30.0  # per measured pass; slow baselines get fewer timed runs (noted)
    max_copies: int = 128
    seed: int = 0
    gpu: str = "h100"  # the GPU the static model predicts for (gspngen.perfmodel.GPUS)
    static: bool = True  # add the static model's figures to the rows of STATIC_BACKENDS
    notes: list[str] = field(default_factory=list)


def resolve_device(name: Optional[str]) -> torch.device:
    """cuda (with its index) when available and not told otherwise, else cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected cuda or cpu, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} requested but no CUDA device is available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def default_backends(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return GPU_BACKENDS
    from .backends import backend_available

    return ("cpu", "reference") if backend_available("cpu", device) else ("reference",)


def cpu_scaled(spec: Spec, shape: Shape, max_elements: int, max_side: int = 8) -> Shape:
    """A suite shape shrunk for a CPU run: batch 1, sides capped, C halved while too big.

    C stays divisible by an integer ``weight_groups`` so the scaled shape is valid for the spec.
    """
    N, C, H, W = shape
    H, W = min(H, max_side), min(W, max_side)
    g = spec.weight_groups if isinstance(spec.weight_groups, int) else 1
    while C * H * W > max_elements and C % 2 == 0 and (C // 2) % g == 0:
        C //= 2
    return (1, C, H, W)


def select_shapes(config: BenchConfig, spec: Spec,
                  device: torch.device) -> tuple[list[tuple[Shape, Optional[Shape], str]], list[str]]:
    """(shape to run, suite shape it stands for or None, label) triples, and notes.

    Explicit shapes come first, then the suite's. Without a GPU the suite is
    scaled down (:func:`cpu_scaled`) so CI can run it in seconds; the note says so.
    """
    chosen: list[tuple[Shape, Optional[Shape], str]] = [(tuple(s), None, "") for s in config.shapes]
    notes: list[str] = []
    if config.suite is not None:
        if config.suite not in SUITES:
            raise ValueError(f"suite: expected one of {', '.join(SUITES)}, got {config.suite!r}")
        scaled = []
        for shape, label in SUITES[config.suite]:
            run = shape if device.type == "cuda" else cpu_scaled(spec, shape, config.cpu_suite_max_elements)
            scaled.append((run, shape))
            if any(run == c[0] for c in chosen):
                continue  # two suite shapes scaled to the same one (or a --shape): time it once
            chosen.append((run, shape, label))
        if device.type != "cuda":
            notes.append(f"no GPU: suite '{config.suite}' scaled down for CPU (batch 1, sides <= 8, C halved "
                         f"to N*C*H*W <= {config.cpu_suite_max_elements}; each scaled shape runs once): "
                         + "; ".join(f"{shape_label(orig)} -> {shape_label(run)}" for run, orig in scaled))
    return chosen, notes


def shape_label(shape: Shape) -> str:
    return ",".join(str(v) for v in shape)


# ---------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------

def _pass_result(timing: Timing, nbytes: int, breakdown: dict, copy_gbps: float) -> dict[str, Any]:
    times = timing.ms
    ms = max(statistics.median(times), 1e-6)  # a clock tick, never a division by zero
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {
        "median_ms": ms,
        "min_ms": min(times),
        "max_ms": max(times),
        "host_median_ms": statistics.median(timing.host_ms),  # above median_ms: host-bound without queueing
        "iters": len(times),
        "bytes": nbytes,
        "bytes_breakdown": breakdown,
        "gbps": gbps,
        "fraction_of_copy": gbps / copy_gbps if copy_gbps > 0 else None,
        "speedup_vs_reference": None,
        "speedup_vs_cuda_per_step": None,
    }


class _Skip(Exception):
    """A row that cannot run here; the message is its note."""


def _check_backend(spec: Spec, name: str, x: torch.Tensor) -> None:
    """Raise _Skip saying why ``name`` cannot run on inputs like x (not built, not installed, wrong dtype)."""
    from .api import compile as compile_op

    try:
        compile_op(spec, backend=name).resolve_backend(x)
    except ImportError as exc:
        raise _Skip(f"not available here (cannot import {exc.name or exc})") from None
    except (TypeError, ValueError) as exc:
        raise _Skip(f"not available: {exc}") from None
    except Exception as exc:  # a backend module half-written elsewhere must not stop the run
        raise _Skip(f"not available: {type(exc).__name__}: {exc}") from None


def _measure_backend(spec: Spec, name: str, copies: list[dict], gys: list[torch.Tensor], device: torch.device,
                     warmup: int, iters: int, max_seconds: float) -> tuple[Timing, Timing, Timing]:
    """Forward, no-gradient forward and backward timings of one backend over the rotated copies.

    Forward is ``gspngen::scan`` under no_grad: the training forward, which also stores h for the
    backward. The no-gradient forward is the call a module makes under ``torch.no_grad()``
    (inference): the backend's forward with ``need_saved=False``, no h stored, and none of the
    op's dispatch (the op parses the spec and checks its inputs: microseconds, which show only on
    tiny shapes). Backward is exactly ``gspngen::scan_backward`` fed the backend's own ``saved``
    tensor of the same copy. None includes autograd bookkeeping.
    """
    from . import ops  # noqa: F401  (registers torch.ops.gspngen.*)
    from .api import _accepts_need_saved
    from .backends import get_backend

    spec_json = spec.to_json()
    n = len(copies)
    args = [[c[a] for a in ARG_NAMES] for c in copies]
    scan, scan_backward = torch.ops.gspngen.scan, torch.ops.gspngen.scan_backward
    impl = get_backend(name)
    if _accepts_need_saved(impl):
        def no_grad_forward(i):
            return impl.forward(spec, *args[i % n], need_saved=False)
    else:  # a backend that always stores h: its inference forward is the op
        def no_grad_forward(i):
            return scan(*args[i % n], spec_json, name)
    with torch.no_grad():
        fwd_times = time_calls(lambda i: scan(*args[i % n], spec_json, name), device,
                               warmup=warmup, iters=iters, max_seconds=max_seconds)
        fwd0_times = time_calls(no_grad_forward, device, warmup=warmup, iters=iters, max_seconds=max_seconds)
        saved = [scan(*a, spec_json, name)[1] for a in args]
        bwd_times = time_calls(lambda i: scan_backward(gys[i % n], *args[i % n], saved[i % n], spec_json, name),
                               device, warmup=warmup, iters=iters, max_seconds=max_seconds)
        del saved
    return fwd_times, fwd0_times, bwd_times


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__)[:300]


def run_bench(spec: Spec, config: BenchConfig, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report, a JSON-ready dict (see :func:`format_table`, :func:`write_json`).

    Every (shape, dtype, backend) gives one row: status "ok" with forward and
    backward results, "skipped" with a note (backend not available here,
    reference too large on a GPU, out of memory) or "error" with the
    exception's first line — one failing backend does not hide the others.
    """
    log = log or (lambda msg: None)
    device = resolve_device(config.device)
    on_gpu = device.type == "cuda"
    warmup = max(1, config.warmup if config.warmup is not None else (5 if on_gpu else 1))
    iters = config.iters if config.iters is not None else (MIN_GPU_ITERS if on_gpu else 3)
    notes = list(config.notes)
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    if on_gpu and iters < MIN_GPU_ITERS:
        notes.append(f"iters {iters} raised to {MIN_GPU_ITERS} timed runs on a GPU")
        iters = MIN_GPU_ITERS
    backends = list(config.backends) if config.backends else list(default_backends(device))
    shapes, shape_notes = select_shapes(config, spec, device)
    notes += shape_notes
    # Backends the static model describes but that cannot run here get figures, not timings: no inputs
    # are built for them (the paper shapes would not fit a CPU's memory).
    static_only = [b for b in backends if config.static and b in STATIC_BACKENDS and not _runs_here(spec, b, device)]
    measured = [b for b in backends if b not in static_only]
    if static_only:
        notes.append(f"not measured: {', '.join(static_only)} cannot run here; its rows hold the static model's "
                     f"figures, predicted for GPU {config.gpu} at the full shapes")
    if not shapes:
        notes.append("no shape to run")

    env = environment(device)
    copy_bytes = config.copy_bytes or (GIB if on_gpu else 64 * MIB)
    if on_gpu:
        copy_bytes = min(copy_bytes, int(torch.cuda.mem_get_info(device)[0] * 0.4))
    log(f"copy bandwidth: {copy_bytes / MIB:.0f} MiB on {device}")
    copy = measure_copy_bandwidth(device, copy_bytes, warmup=2, iters=10 if on_gpu else 5)
    cache_bytes, budget = _device_budget(device)

    rows: list[dict[str, Any]] = []
    for shape, suite_shape, label in shapes:
        N, C, H, W = shape
        base = None  # the input tile, shared by every dtype of this shape
        for dname in config.dtypes:
            dtype = DTYPES[dname]
            parts = {p: byte_breakdown(spec, N, C, H, W, dtype, p) for p in ("forward", "backward")}
            nbytes = {p: minimal_bytes(spec, N, C, H, W, dtype, p) for p in ("forward", "backward")}
            group: list[dict[str, Any]] = []

            def add(backend: str, status: str, note: Optional[str], **extra) -> None:
                group.append({"shape": list(shape), "dtype": dname, "backend": backend, "status": status,
                              "note": note, "copies": None, "forward": None, "forward_no_grad": None,
                              "backward": None, "bytes": dict(nbytes), "label": label,
                              "suite_shape": None if suite_shape is None else list(suite_shape), **extra})

            G = spec.groups(C)
            if C % G:
                for b in measured:
                    add(b, "skipped", f"weight_groups={G} does not divide C={C}")
                rows += group
                continue
            if not measured:
                continue
            copies: list[dict] = []
            gys: list[torch.Tensor] = []
            try:
                if base is None:
                    log(f"inputs {shape_label(shape)}")
                    base = base_inputs(spec, shape, config.seed)
                set_bytes = sum(parts["backward"]["read"].values())  # what one call may read: inputs + gy
                n_copies = rotation_copies(set_bytes, cache_bytes, budget, config.max_copies)
                copies, gys = _prepare_copies(spec, shape, dtype, device, base, n_copies, config.seed)
            except Exception as exc:  # out of memory, or a device already broken by an earlier row
                copies, gys = [], []
                _free(device)
                oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                for b in measured:
                    add(b, "skipped" if oom else "error",
                        "out of memory building the inputs" if oom else "building the inputs: " + _one_line(exc))
                rows += group
                continue

            for b in measured:
                if on_gpu and b == "reference" and N * C * H * W > config.reference_max_elements:
                    add(b, "skipped", f"N*C*H*W = {N * C * H * W} > {config.reference_max_elements}: "
                                      "the reference is too slow here")
                    continue
                try:
                    _check_backend(spec, b, copies[0]["x"])
                except _Skip as exc:
                    add(b, "skipped", str(exc))
                    continue
                b_warmup, b_iters = warmup, iters
                if on_gpu and b == "reference":  # slow: few runs
                    b_warmup, b_iters = 2, min(iters, config.reference_iters)
                log(f"{shape_label(shape)} {dname} {b}")
                try:
                    fwd_t, fwd0_t, bwd_t = _measure_backend(spec, b, copies, gys, device, b_warmup, b_iters,
                                                            config.max_seconds)
                except torch.cuda.OutOfMemoryError:
                    _free(device)
                    add(b, "skipped", "out of memory")
                    continue
                except Exception as exc:  # a failing backend must not hide the others' numbers
                    _free(device)
                    add(b, "error", _one_line(exc))
                    continue
                runs = {len(fwd_t.ms), len(fwd0_t.ms), len(bwd_t.ms)}
                note = None
                if runs != {iters}:
                    note = f"{'/'.join(str(r) for r in sorted(runs))} timed runs"
                    if min(runs) < b_iters:
                        note += f" (time cap {config.max_seconds:g} s)"
                add(b, "ok", note, copies=len(copies),
                    forward=_pass_result(fwd_t, nbytes["forward"], parts["forward"], copy["gbps"]),
                    forward_no_grad=_pass_result(fwd0_t, nbytes["forward"], parts["forward"], copy["gbps"]),
                    backward=_pass_result(bwd_t, nbytes["backward"], parts["backward"], copy["gbps"]))
            _add_speedups(group)
            rows += group
            del copies, gys
            _free(device)

    if config.static:
        rows += _add_static(spec, config, rows, static_only, log)

    return {
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "environment": env,
        "copy_bandwidth": copy,
        "config": {"device": str(device), "warmup": warmup, "iters": iters, "dtypes": list(config.dtypes),
                   "backends": backends, "suite": config.suite, "cache_bytes": cache_bytes,
                   "static_gpu": config.gpu if config.static else None,
                   "reference_max_elements": config.reference_max_elements, "max_seconds": config.max_seconds,
                   "timing": TIMING_GPU if on_gpu else TIMING_CPU},
        "notes": notes,
        "results": rows,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _runs_here(spec: Spec, name: str, device: torch.device) -> bool:
    try:
        _check_backend(spec, name, torch.empty((1, 1, 1, 1), device=device))
    except _Skip:
        return False
    return True


def _static(spec: Spec, dname: str, shape: Shape, gpu: str) -> tuple[Optional[dict], Optional[str]]:
    """The static model's figures, or None and why not (a missing compiler, a shape it cannot plan)."""
    from .perfmodel import static_figures

    try:
        return static_figures(spec, dname, shape, gpu), None
    except Exception as exc:  # noqa: BLE001 (the timings, if any, must still be reported)
        return None, "static model unavailable: " + _one_line(exc)


def _add_static(spec: Spec, config: BenchConfig, rows: list[dict[str, Any]], static_only: Sequence[str],
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Put the static figures on the measured rows of STATIC_BACKENDS, and return rows "not_measured"
    (figures, no timings) for the static-only backends at the full shapes the run stands for."""
    for r in rows:
        if r["backend"] in STATIC_BACKENDS and r["backend"] not in static_only:
            log(f"static model {shape_label(r['shape'])} {r['dtype']} {r['backend']}")
            r["static"], why = _static(spec, r["dtype"], tuple(r["shape"]), config.gpu)
            if why:
                r["note"] = "; ".join(filter(None, [r["note"], why]))
    out: list[dict[str, Any]] = []
    suite = SUITES.get(config.suite, ()) if config.suite else ()
    labels = {tuple(shape): label for shape, label in suite}
    full = list(dict.fromkeys([tuple(s) for s in config.shapes] + [tuple(s) for s, _ in suite]))
    for shape in full:
        N, C, H, W = shape
        for dname in config.dtypes:
            for b in static_only:
                log(f"static model {shape_label(shape)} {dname} {b}")
                row = {"shape": list(shape), "dtype": dname, "backend": b, "status": "not_measured",
                       "note": "no GPU here: static model only (below)", "copies": None, "forward": None,
                       "forward_no_grad": None, "backward": None,
                       "bytes": {p: minimal_bytes(spec, N, C, H, W, dname, p) for p in ("forward", "backward")},
                       "label": labels.get(shape, ""), "suite_shape": None}
                if C % spec.groups(C):
                    row["status"], row["note"] = "skipped", f"weight_groups={spec.groups(C)} does not divide C={C}"
                else:
                    row["static"], why = _static(spec, dname, shape, config.gpu)
                    if why:
                        row["status"], row["note"] = "skipped", f"no GPU here, and the {why}"
                out.append(row)
    return out


def _add_speedups(group: list[dict[str, Any]]) -> None:
    """Fill speedup_vs_<baseline> = baseline median / row median within one (shape, dtype) group."""
    by_backend = {r["backend"]: r for r in group if r["status"] == "ok"}
    for r in by_backend.values():
        for base in BASELINES:
            ref = by_backend.get(base)
            if ref is None:
                continue
            for pass_ in ("forward", "forward_no_grad", "backward"):
                if r.get(pass_) and ref.get(pass_):
                    r[pass_][f"speedup_vs_{base}"] = ref[pass_]["median_ms"] / r[pass_]["median_ms"]


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _num(v: float) -> str:
    """About three significant digits without exponents for the usual ranges (0.0123, 4.56, 2834)."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(result: Optional[dict], key: str, scale: float = 1.0, suffix: str = "") -> str:
    v = None if result is None else result.get(key)
    return "-" if v is None else _num(v * scale) + suffix


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table for people (JSON is for machines)."""
    env, copy, cfg = report["environment"], report["copy_bandwidth"], report["config"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "cupy", "triton", "python"))
    lines = [
        f"gspngen bench: spec '{report['spec']['name']}' (sha256 {report['spec_hash'][:12]})",
        f"device: {env['gpu'] or 'CPU ' + (env['cpu'] or '')} ({env['device']})",
        f"versions: {versions}",
        f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['buffer_bytes'] / MIB:.0f} MiB dst.copy_(src), "
        f"read + write, median of {copy['iters']})",
        f"timing: median of {cfg['iters']} runs after {cfg['warmup']} warm-up, {cfg['timing']}; "
        "inputs rotated over 'copies' sets",
        "GB/s = minimal bytes / median time; %copy = GB/s / copy bandwidth; xref, xper_step = speedup fwd/bwd",
        "fwd: the training forward (h stored for the backward); fwd0: no gradient (inference, no h store), "
        "on the same minimal bytes",
        "",
    ]
    head = ["N,C,H,W", "dtype", "backend", "copies", "fwd ms", "fwd GB/s", "fwd %copy", "fwd0 ms", "fwd0 %copy",
            "bwd ms", "bwd GB/s", "bwd %copy", "xref", "xper_step", "note"]
    table = [head]
    for r in report["results"]:
        f, f0, b = r["forward"], r.get("forward_no_grad"), r["backward"]

        def speedup(base: str) -> str:
            key = f"speedup_vs_{base}"
            return "-" if f is None or f[key] is None else f"{_num(f[key])}/{_num(b[key])}"

        note = r["note"] or ""
        if r["status"] not in ("ok", "not_measured"):
            note = f"{r['status']}: {note}"
        nm = "not measured" if r["status"] == "not_measured" else None
        table.append([
            shape_label(r["shape"]), r["dtype"], r["backend"], "-" if r["copies"] is None else str(r["copies"]),
            nm or _cell(f, "median_ms"), _cell(f, "gbps"), _cell(f, "fraction_of_copy", 100, "%"),
            nm or _cell(f0, "median_ms"), _cell(f0, "fraction_of_copy", 100, "%"),
            nm or _cell(b, "median_ms"), _cell(b, "gbps"), _cell(b, "fraction_of_copy", 100, "%"),
            speedup("reference"), speedup("cuda_per_step"), note,
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    numeric = range(3, len(head) - 1)
    for i, row in enumerate(table):
        cells = [c.rjust(widths[j]) if j in numeric else c.ljust(widths[j]) for j, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"note: {n}" for n in report["notes"]]
    static = format_static(report)
    if static:
        lines += ["", static]
    return "\n".join(lines)


_STATIC_PASSES = (("forward", "fwd"), ("forward_no_grad", "fwd0"), ("backward", "bwd"))


def format_static(report: dict[str, Any]) -> str:
    """The static model's figures of every row that has them, one line per kernel and one per pass
    ("all"), beside the measured median where the row was timed; "" when no row has them."""
    rows = [r for r in report["results"] if r.get("static")]
    if not rows:
        return ""
    from .perfmodel import COPY_EFFICIENCY, GPUS, PREDICTED

    g = GPUS[rows[0]["static"]["gpu"]]
    lines = [
        f"static model: {PREDICTED}; GPU {rows[0]['static']['gpu']} ({g.name}, {g.arch}, {g.sms} SMs, "
        f"{g.hbm_gbps:.0f} GB/s peak, a copy at {COPY_EFFICIENCY:g} of it); method: gspngen/perfmodel.py",
        "B/min = bytes moved / minimal bytes; inst/el = SASS tile-loop instructions per element per thread; "
        "fwd0 = forward without the h store (no gradient)",
        "",
    ]
    head = ["N,C,H,W", "dtype", "backend", "pass", "kernel", "MB moved", "B/min", "inst/el", "regs", "smem", "spill",
            "warps/SM", "CTAs/SMs", "pred ms", "pred %copy", "%copy moved", "measured ms"]
    table = [head]
    for r in rows:
        st = r["static"]
        for key, short in _STATIC_PASSES:
            ps = st[key]
            measured = r.get(key)
            for k in [*ps["kernels"], None]:
                f = ps if k is None else k
                table.append([
                    shape_label(r["shape"]), r["dtype"], r["backend"], short,
                    "all" if k is None else k["direction"], _num(f["bytes_moved"] / 1e6),
                    _num(ps["bytes_moved_over_minimal"]) if k is None else "",
                    _num(f["instructions_per_element"]), str(f["registers"]), str(f["shared_bytes"]),
                    str(f["spill_bytes"]), str(f["warps_per_sm"]), f"{f['ctas']}/{f['sms']}",
                    _num(f["predicted_ms"]),
                    _num(ps["predicted_pct_copy"]) + "%" if k is None else "",
                    _num(ps["predicted_pct_copy_moved"]) + "%" if k is None else "",
                    _cell(measured, "median_ms") if k is None else "",
                ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        cells = [c.rjust(widths[j]) if j >= 5 else c.ljust(widths[j]) for j, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: "str | Path") -> None:
    """Write the report as strict JSON (no NaN), atomically: a temp file in the same folder, then rename."""
    from .atomic import write_file_atomically

    write_file_atomically(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
