"""Tune one (spec, shape, dtype): verify every candidate, time those that are right, choose, store.

For each pass (``fwd``, ``bwd``) and candidate (:mod:`.candidates`):

1. **Verify.** The candidate runs on the real shape, its outputs NaN-poisoned
   first where that is possible (a backend with a ``poison`` attribute fills
   its outputs with NaN, Triton's ``new_output`` hook is pointed at a NaN
   fill; on a GPU a freed NaN block of the outputs' size is also what the
   caching allocator hands out next), and is compared with the
   reference in float64 on the same inputs (``rel_error`` with a 0.1 floor,
   tolerance 1e-4 for fp32, 5e-2 for 16-bit, 1e-9 for fp64). Above
   ``verify_full_max`` elements the reference would be too slow, so it runs on
   a cropped problem instead: batch 1 and the first whole weight groups
   covering up to 8 channels, with full H and W. Scans of different images
   and channels are independent, so the candidate's real-shape result
   cropped the same way must equal it (the merge weights' gradient, a sum
   over everything, is then not compared). Every element of the full result
   must also be finite. A wrong candidate, or one that raises, is rejected
   with the reason and never timed; the tuning goes on.
2. **Time.** :func:`gspngen.tune.timing.time_calls` on the op exactly as
   ``gspngen bench`` times it (forward: ``gspngen::scan``; backward:
   ``gspngen::scan_backward`` fed the candidate backend's own saved tensor),
   inputs rotated over copies, the L2 flushed between repetitions on a GPU,
   warm-up then median and spread of the repetitions that fit the budget.
3. **Choose and store.** Each pass's entry keeps every candidate's timing or
   rejection and its winner (:mod:`.select` turns the two entries into the
   backend string an op runs), merged into the device's cache file.

Only one tuning runs at a time per device: an in-process lock and a file lock
(``<device id>.tuning.lock`` in the cache folder), since two timings on one
device at once both lie.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, Callable, Optional, Sequence

import torch

from ..spec import Spec
from .candidates import Candidate, dtype_name, enumerate_candidates
from .keys import PASSES, entry_key, key_parts

TOLERANCE = {"fp64": 1e-9, "fp32": 1e-4, "fp16": 5e-2, "bf16": 5e-2}
VERIFY_FULL_MAX = 1 << 20  # N*C*H*W above which the reference runs on a cropped problem
CROP_CHANNELS = 8

Progress = Callable[[str, dict], None]

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def device_lock(device_id: str):
    """One tuning per device: this process's lock, then the file lock other processes see."""
    from .cache import tune_dir, warn_unwritable

    with _DEVICE_LOCKS_GUARD:
        lock = _DEVICE_LOCKS.setdefault(device_id, threading.Lock())
    with lock:
        flock = None
        try:
            from filelock import FileLock

            tune_dir().mkdir(parents=True, exist_ok=True)
            flock = FileLock(str(tune_dir() / f"{device_id}.tuning.lock"))
            flock.acquire(timeout=3600)
        except OSError as exc:
            flock = None
            warn_unwritable(tune_dir(), exc)  # then only this process's lock serialises tunings
        try:
            yield
        finally:
            if flock is not None:
                flock.release()


# -- verification -------------------------------------------------------------------------------------------

def _channel_axis(spec: Spec, name: str, ndim: int) -> int:
    if spec.layout == "nhwc":
        return ndim - 1
    return {"x": 1, "w": 3}.get(name, 2) if name not in ("y", "gy") else (2 if ndim == 5 else 1)


def crop_plan(spec: Spec, shape: Sequence[int], full_max: int = VERIFY_FULL_MAX) -> Optional[tuple[int, int, int]]:
    """None to verify the whole problem, else (images, channels, groups) kept: batch 1, whole groups."""
    N, C, H, W = shape
    if N * C * H * W <= full_max:
        return None
    G = spec.groups(C)
    cg = C // G
    gk = max(1, min(G, CROP_CHANNELS // cg))
    return 1, cg * gk, gk


def _crop(spec: Spec, name: str, t: Optional[torch.Tensor], plan) -> Optional[torch.Tensor]:
    if t is None or plan is None or name == "m":
        return t
    n, c, g = plan
    axis = _channel_axis(spec, name, t.dim())
    return t.narrow(0, 0, n).narrow(axis, 0, g if name == "w" else c)


def _poisoned(impl):
    """The backend with NaN-filled outputs, where it offers that: a ``poison`` attribute (cuda; the
    convention for new backends), or Triton's ``new_output`` allocation hook (see :func:`_poison_hooks`)."""
    if hasattr(impl, "poison"):
        impl = copy.copy(impl)
        impl.poison = True
    return impl


@contextlib.contextmanager
def _poison_hooks(impl):
    """While verifying, route a backend's output allocation through NaN fill where it has such a hook."""
    launch = getattr(impl, "_launch", None)
    original = getattr(launch, "new_output", None)
    if original is None:
        yield
        return

    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    launch.new_output = nan_output
    try:
        yield
    finally:
        launch.new_output = original


def _poison_allocator(device: torch.device, nbytes: int) -> None:
    """On a GPU, leave a freed NaN block in the caching allocator: fresh outputs likely start as NaN."""
    if device.type == "cuda" and nbytes > 0:
        torch.full((nbytes // 4 + 1,), float("nan"), dtype=torch.float32, device=device)  # freed at once


def _mismatch(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> Optional[str]:
    from ..testing import rel_error

    err = rel_error(got, want, floor=0.1)
    if not err <= tol:
        return f"wrong result: {what} differs from the reference by {err:.3g} (relative, tolerance {tol:g})"
    return None


class _Trusted:
    """The reference in float64 on (possibly cropped) inputs, computed once per tuning."""

    def __init__(self, spec: Spec, args: list, gy: torch.Tensor, plan):
        self.spec, self.plan = spec, plan
        names = ("x", "w", "lam", "u", "s", "m")
        self.args64 = [None if t is None else _crop(spec, n, t, plan).double() for n, t in zip(names, args)]
        self.gy64 = _crop(spec, "gy", gy, plan).double()
        self._y = self._grads = None

    @property
    def y(self) -> torch.Tensor:
        if self._y is None:
            from ..backends.reference import forward

            with torch.no_grad():
                self._y = forward(self.spec, *self.args64)
        return self._y

    @property
    def grads(self):
        if self._grads is None:
            from ..backends.reference import ReferenceBackend

            self._grads = ReferenceBackend().backward(self.spec, self.gy64, *self.args64, None)
        return self._grads


def verify(spec: Spec, cand: Candidate, pass_: str, args: list, gy: torch.Tensor, trusted: _Trusted,
           dname: str) -> Optional[str]:
    """None if the candidate's result on the real inputs matches the trusted one, else why not."""
    from ..backends import get_backend, join_backend_name

    device = args[0].device
    tol = TOLERANCE[dname]
    plan = trusted.plan
    with torch.no_grad():
        if pass_ == "fwd":
            impl = _poisoned(get_backend(join_backend_name(cand.backend, cand.config)))
            _poison_allocator(device, 4 * gy.numel() * gy.element_size())
            with _poison_hooks(impl):
                y, _ = impl.forward(spec, *args)
            want = trusted.y
            if torch.isfinite(want).all() and not torch.isfinite(y).all():
                return "wrong result: non-finite values in the output (elements left unwritten?)"
            return _mismatch(_crop(spec, "y", y, plan), want, tol, "y")
        impl_f = get_backend(cand.backend)  # the backward's saved tensor comes from the same backend's forward
        _, saved = impl_f.forward(spec, *args)
        impl = _poisoned(get_backend(join_backend_name(cand.backend, "", cand.config)))
        _poison_allocator(device, 4 * sum(t.numel() * t.element_size() for t in args if t is not None))
        with _poison_hooks(impl):
            grads = impl.backward(spec, gy, *args, saved)
    for name, got, want, inp in zip(("x", "w", "lam", "u", "s", "m"), grads, trusted.grads, args):
        if inp is None:
            continue
        if got is None or tuple(got.shape) != tuple(inp.shape):
            return f"wrong result: gradient of {name} has shape {None if got is None else tuple(got.shape)}"
        if torch.isfinite(want).all() and not torch.isfinite(got).all():
            return f"wrong result: non-finite values in the gradient of {name} (elements left unwritten?)"
        if name == "m" and plan is not None:
            continue  # a sum over every image and channel: not comparable on a crop
        why = _mismatch(_crop(spec, name, got, plan), want, tol, f"the gradient of {name}")
        if why:
            return why
    return None


# -- timing ---------------------------------------------------------------------------------------------------

def measure(spec: Spec, cand: Candidate, pass_: str, copies: list[dict], gys: list[torch.Tensor],
            device: torch.device, budget_s: float) -> dict[str, Any]:
    """Time one candidate's pass as ``gspngen bench`` does; the summary the cache stores."""
    from .. import ops  # noqa: F401  (registers torch.ops.gspngen.*)
    from ..backends import join_backend_name
    from .timing import ARG_NAMES, l2_flusher, summarize, time_calls

    on_gpu = device.type == "cuda"
    warmup, iters = (3, 30) if on_gpu else (1, 10)
    spec_json = spec.to_json()
    n = len(copies)
    args = [[c[a] for a in ARG_NAMES] for c in copies]
    scan, scan_backward = torch.ops.gspngen.scan, torch.ops.gspngen.scan_backward
    flush = l2_flusher(device)
    with torch.no_grad():
        if pass_ == "fwd":
            name = join_backend_name(cand.backend, cand.config)
            t = time_calls(lambda i: scan(*args[i % n], spec_json, name), device, warmup=warmup, iters=iters,
                           max_seconds=budget_s, flush=flush)
        else:
            name = join_backend_name(cand.backend, "", cand.config)
            saved = [scan(*a, spec_json, cand.backend)[1] for a in args]
            t = time_calls(lambda i: scan_backward(gys[i % n], *args[i % n], saved[i % n], spec_json, name),
                           device, warmup=warmup, iters=iters, max_seconds=budget_s, flush=flush)
            del saved
    out = summarize(t.ms)
    out["host_median_ms"] = sorted(t.host_ms)[len(t.host_ms) // 2]
    return out


# -- the tuning -----------------------------------------------------------------------------------------------

def _check_shape(spec: Spec, shape: Sequence[int]) -> tuple[int, int, int, int]:
    try:
        N, C, H, W = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape: expected four positive integers (N, C, H, W), got {shape!r}") from None
    if min(N, C, H, W) < 1:
        raise ValueError(f"shape: expected four positive integers (N, C, H, W), got {tuple(shape)}")
    if C % spec.groups(C):
        raise ValueError(f"shape: C={C} must be divisible by the spec's weight_groups={spec.groups(C)}")
    return N, C, H, W


def default_candidate_id(spec: Spec, device: torch.device, dtype: str) -> str:
    from ..api import default_backend

    return default_backend(spec, device, dtype)


def tune(spec, shape: Sequence[int], dtype: "str | torch.dtype" = "fp32", passes: Sequence[str] = PASSES,
         device: "str | torch.device | None" = None, *, budget_s: Optional[float] = None,
         backends: Optional[Sequence[str]] = None, max_per_backend: Optional[int] = None, store: bool = True,
         progress: Optional[Progress] = None, seed: int = 0, verify_full_max: int = VERIFY_FULL_MAX,
         max_copies: Optional[int] = None) -> dict[str, Any]:
    """Tune ``spec`` at ``shape`` (N, C, H, W) in ``dtype`` for ``passes`` on ``device``; see the module docstring.

    ``budget_s``: timing budget per candidate and pass (default 1 s on a GPU,
    0.25 s on the CPU). ``backends``: only these (default: every candidate of
    the registry). ``store=False`` leaves the cache alone. ``progress(event,
    info)`` is told ``"start"`` (info: total) and ``"candidate"`` (info: pass,
    id, status, reason, median_ms) as it goes. Returns a report: for each pass its entry key and
    entry (as stored), plus device and shape; never raises for a candidate.
    """
    from ..bench import resolve_device
    from ..spec import as_spec
    from .cache import device_cache, now_iso
    from .device import device_id, identity
    from .select import candidate_id, winner
    from .timing import _device_budget, _free, _prepare_copies, base_inputs, rotation_copies

    spec = as_spec(spec)
    shape = _check_shape(spec, shape)
    dname = dtype_name(dtype)
    passes = list(dict.fromkeys(passes))
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"passes: expected fwd and/or bwd, got {p!r}")
    device = resolve_device(None if device is None else str(device))
    on_gpu = device.type == "cuda"
    budget_s = budget_s if budget_s is not None else (1.0 if on_gpu else 0.25)
    if not budget_s > 0:
        raise ValueError(f"budget_s: expected seconds > 0, got {budget_s!r}")
    progress = progress or (lambda event, info: None)
    ident = identity(device)
    did = device_id(ident)
    cand_lists = {p: enumerate_candidates(spec, device, dname, p, shape, backends, max_per_backend) for p in passes}
    progress("start", {"total": sum(len(c) for c in cand_lists.values())})

    entries: dict[str, dict] = {}
    keys: dict[str, str] = {}
    with device_lock(did):
        cache_bytes, mem_budget = _device_budget(device)
        base = base_inputs(spec, shape, seed)
        from ..bench import byte_breakdown

        set_bytes = sum(byte_breakdown(spec, *shape, "fp32" if dname == "fp64" else dname,
                                       "backward")["read"].values())
        n_copies = rotation_copies(set_bytes, cache_bytes, mem_budget,
                                   max_copies if max_copies is not None else (128 if on_gpu else 4))
        copies, gys = _prepare_copies(spec, shape, torch.float64 if dname == "fp64" else
                                      {"fp32": torch.float32, "fp16": torch.float16,
                                       "bf16": torch.bfloat16}[dname], device, base, n_copies, seed)
        from .timing import ARG_NAMES

        args0 = [copies[0][a] for a in ARG_NAMES]
        trusted = _Trusted(spec, args0, gys[0], crop_plan(spec, shape, verify_full_max))
        default_id = default_candidate_id(spec, device, dname)
        for p in passes:
            results: dict[str, dict] = {}
            for cand in cand_lists[p]:
                rec: dict[str, Any] = {"backend": cand.backend, "config": cand.config}
                if cand.rejected is not None:
                    rec.update(status="rejected", reason=cand.rejected)
                else:
                    try:
                        why = verify(spec, cand, p, args0, gys[0], trusted, dname)
                        if why is None:
                            rec.update(status="ok", **measure(spec, cand, p, copies, gys, device, budget_s))
                        else:
                            rec.update(status="rejected", reason=why)
                    except torch.cuda.OutOfMemoryError:
                        rec.update(status="rejected", reason="out of memory")
                    except Exception as exc:  # a candidate that raises is rejected; the tuning goes on
                        from .candidates import _one_line

                        rec.update(status="rejected", reason=_one_line(exc))
                    finally:
                        _free(device)
                results[candidate_id(cand.backend, cand.config)] = rec
                progress("candidate", {"pass": p, "id": candidate_id(cand.backend, cand.config),
                                       "status": rec["status"], "reason": rec.get("reason"),
                                       "median_ms": rec.get("median_ms")})
            parts = key_parts(spec, device.type, dname, p, shape)
            keys[p] = entry_key(parts)
            entries[keys[p]] = {"key": parts, "shape": list(shape), "candidates": results, "default": default_id,
                                "winner": winner(results), "date": now_iso()}
        del copies, gys, trusted
        _free(device)
        stored = None
        if store:
            cache = device_cache(device)
            stored = cache.put(entries)
            entries = {k: cache.entries.get(k, v) for k, v in entries.items()}  # merged with earlier candidates
            from .lookup import forget

            forget()
    return {"device": ident, "device_id": did, "spec": spec.name, "spec_hash": spec.hash, "shape": list(shape),
            "dtype": dname, "passes": passes, "keys": keys, "entries": entries, "stored": stored,
            "budget_s": budget_s}
