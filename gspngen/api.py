"""``gspngen.compile``: bind a spec to a backend and return a differentiable op."""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from . import ops  # noqa: F401  (registers torch.ops.gspngen.*)
from .backends import backend_available, get_backend, split_backend_name
from .spec import Spec, as_spec
from .tune import lookup as _lookup
from .validate import validate_inputs

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_BACKENDS = ("cuda", "triton", "cpu")


class GSPNOp:
    """A compiled spec: ``op(x, w, lam, u=None, s=None, m=None)`` (DESIGN §6).

    With ``backend="auto"`` the backend is chosen per (device, dtype, shape
    bucket, whether gradients are needed): the tuned winner from the cache
    (``gspngen.tune``) if there is one, else :func:`default_backend`. With
    ``autotune=True`` (or ``GSPNGEN_AUTOTUNE=1``) a miss is tuned on the first
    call for its key and stored; ``GSPNGEN_AUTOTUNE=off`` always takes the
    documented default.
    """

    def __init__(self, spec: Spec, backend: str = "auto", autotune: bool = False,
                 check_finite: Optional[bool] = None):
        base = split_backend_name(backend)[0] if backend != "auto" else backend
        if base in KERNEL_BACKENDS and base not in spec.backends:
            raise ValueError(f"backend: {base!r} is not generated for spec '{spec.name}' "
                             f"(its backends field lists {list(spec.backends)})")
        if not isinstance(autotune, bool):
            raise TypeError(f"autotune: expected True or False, got {autotune!r}")
        if autotune and backend != "auto":
            raise ValueError(f"autotune: tuning chooses among backends, so it needs backend='auto', got {backend!r}")
        from .finite import enabled

        self.spec = spec
        self.backend = backend
        self.autotune = autotune
        self.check_finite = enabled(check_finite)  # decided once: free when off
        self._spec_json = spec.to_json()
        # Hot-path memos (see __call__): input signatures already validated, and per signature the
        # backend string and instance, tagged with the lookup generation and GSPNGEN_AUTOTUNE they used.
        self._seen: dict[tuple, tuple] = {}

    def __repr__(self) -> str:
        return f"GSPNOp(spec={self.spec.name!r}, backend={self.backend!r}, hash={self.spec.hash[:12]})"

    def resolve_backend(self, x: torch.Tensor, training: Optional[bool] = None) -> str:
        """The backend that runs for inputs like x, or a TypeError/ValueError saying why none can.

        ``training``: whether the call needs gradients (default: x requires grad and grad mode is on);
        a tuned choice may differ between inference and training (see gspngen.tune.select).
        """
        if training is None:
            training = bool(x.requires_grad and torch.is_grad_enabled())
        return _resolve_backend(self._spec_json, self.backend, x.device.type, x.device.index, str(x.dtype),
                                _image_shape(self.spec, x), training, self.autotune)

    def __call__(self, x, w, lam, u=None, s=None, m=None) -> torch.Tensor:
        args = (x, w, lam, u, s, m)
        if self.check_finite:
            return self._checked_call(*args)
        if torch.compiler.is_compiling():
            # Traced: the plain path (validation and the lookup run once while tracing).
            validate_inputs(self.spec, *args)
            backend = self.resolve_backend(x)
            c = [None if t is None else t.contiguous() for t in args]
            y, _ = torch.ops.gspngen.scan(*c, self._spec_json, backend)
            return y
        # Eager hot path: validate each input signature once, resolve once per signature, and when no
        # autograd, subclass, functorch transform or dispatch mode is involved call the backend directly
        # (the custom op would only re-check what was checked and dispatch to the same function).
        try:
            sig = tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device, type(t), t.requires_grad)
                        for t in args)
        except (AttributeError, RuntimeError):  # not tensors, or sparse: let validation say what is wrong
            validate_inputs(self.spec, *args)
            sig = None
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        tag = (_lookup.generation(), os.environ.get("GSPNGEN_AUTOTUNE"))
        memo = self._seen.get((sig, training)) if sig is not None else None
        if memo is None or memo[0] != tag:
            validate_inputs(self.spec, *args)
            backend = self.resolve_backend(x, training)
            memo = (tag, backend, get_backend(backend))
            if sig is not None:
                if len(self._seen) > 256:
                    self._seen.clear()  # shapes that change every call: keep the memo bounded
                self._seen[(sig, training)] = memo
        _, backend, impl = memo
        c = [None if t is None else t.contiguous() for t in args]
        if not training and _plain(sig):
            if _accepts_need_saved(impl):  # no gradient: the kernels skip the saved-h store
                return impl.forward(self.spec, *c, need_saved=False)[0]
            return impl.forward(self.spec, *c)[0]
        y, _ = torch.ops.gspngen.scan(*c, self._spec_json, backend)
        return y


    def prebuild(self, shape, dtype: torch.dtype = torch.float32, device="cuda",
                 training: bool = True) -> str:
        """Build the kernels for inputs x of ``shape`` (the spec's layout), ``dtype`` and ``device`` now,
        ahead of the first call, so that no build (NVRTC: seconds) happens inside a training step or a
        CUDA-graph capture. Returns the backend that calls like that will run. A no-op for backends that
        build nothing (reference, lowered)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        N, a, b, c = (int(v) for v in shape)
        image = (N, c, a, b) if self.spec.layout == "nhwc" else (N, a, b, c)
        backend = _resolve_backend(self._spec_json, self.backend, device.type, device.index, str(dtype),
                                   image, training, self.autotune)
        impl = get_backend(backend)
        build = getattr(impl, "prebuild", None)
        if build is not None:
            build(self.spec, tuple(shape), dtype, device)
        return backend

    def _checked_call(self, *args) -> torch.Tensor:
        """Finite-check mode (gspngen.finite): inputs, result and, in the backward, every gradient."""
        from . import finite

        validate_inputs(self.spec, *args)
        where = f"gspngen op '{self.spec.name}'"
        finite.check(list(zip(_ARG_NAMES, args)), "came in", where)
        backend = self.resolve_backend(args[0])
        guarded = finite.guard_inputs(_ARG_NAMES, args, f"{where} (backend {backend})")
        c = [None if t is None else t.contiguous() for t in guarded]
        y, _ = torch.ops.gspngen.scan(*c, self._spec_json, backend)
        finite.check([("y", y)], "produced", f"{where} (backend {backend})")
        return finite.guard_output(y, f"{where} (backend {backend})")


_ARG_NAMES = ("x", "w", "lam", "u", "s", "m")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(sig) -> bool:
    """Plain tensors with no functorch transform or dispatch/function mode around: the direct call is exact."""
    if sig is None or any(t is not None and t[4] not in _PLAIN for t in sig):
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or _functorch_active())


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _image_shape(spec: Spec, x: torch.Tensor) -> Optional[tuple[int, int, int, int]]:
    """(N, C, H, W) of x in the spec's layout, or None for a tensor that is not 4-d (validation reports it)."""
    if x.dim() != 4 or torch.compiler.is_compiling():
        # Traced (torch.compile, torch.export): reading the sizes would specialise the graph to this
        # shape (and a tuple of them is no constant for the resolution), so the lookup takes no
        # bucket and auto runs the documented default inside compiled graphs.
        return None
    N, a, b, c = (int(v) for v in x.shape)
    return (N, c, a, b) if spec.layout == "nhwc" else (N, a, b, c)


def default_backend(spec: Spec, device: "torch.device | str", dtype: "torch.dtype | str") -> str:
    """The documented default of ``auto`` when nothing is tuned (and always with ``GSPNGEN_AUTOTUNE=off``).

    On a GPU: the generated CUDA kernels, then Triton, the first the spec
    generates for this dtype and that can run here. On the CPU: the generated
    C++ kernels when the spec lists ``cpu`` and a compiler is there (fp64,
    fp32 and the spec's 16-bit precisions). The reference otherwise.
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        dname = dtype
    else:
        dname = "fp64" if dtype == torch.float64 else DTYPE_NAMES.get(dtype)
    if device.type == "cuda" and dname in spec.precision:
        for name in ("cuda", "triton"):
            if name in spec.backends:
                if backend_available(name, device):
                    return name
                _fallback_warning(name, device)
    if device.type == "cpu" and "cpu" in spec.backends:
        from .render.cpu import dtypes as cpu_dtypes  # light: no rendering

        if dname in cpu_dtypes(spec) and backend_available("cpu", device):
            return "cpu"
    return "reference"


_WARNED: set = set()
_NEED_SAVED: dict = {}


def _accepts_need_saved(impl) -> bool:
    """Whether ``impl.forward`` takes ``need_saved`` (a subclass may override forward without it)."""
    kind = type(impl)
    ok = _NEED_SAVED.get(kind)
    if ok is None:
        try:
            ok = "need_saved" in inspect.signature(impl.forward).parameters
        except (TypeError, ValueError):
            ok = False
        _NEED_SAVED[kind] = ok
    return ok


def _fallback_warning(name: str, device: torch.device) -> None:
    """``auto`` skips a GPU backend the spec lists: say why, once per (backend, reason) and process."""
    try:
        reason = get_backend(name).unavailable_reason(device)
    except ImportError as exc:
        reason = str(exc)
    key = (name, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"gspngen: backend='auto' does not use {name!r} on {device}: {reason or 'unavailable'}",
                      RuntimeWarning, stacklevel=3)


def _resolve_backend(spec_json: str, backend: str, device_type: str, device_index, dtype_name: str,
                     shape: Optional[tuple] = None, training: bool = False, autotune: bool = False) -> str:
    # Pure Python decision on constants: torch.compile evaluates it once while tracing (never traced).
    from .ops import spec_from_json

    spec = spec_from_json(spec_json)
    device = torch.device(device_type, device_index)
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    dname = DTYPE_NAMES.get(dtype)
    if backend == "auto":
        if shape is not None and dtype in _TUNE_DTYPES:
            choice = _lookup.tuned_backend(spec, device, _TUNE_DTYPES[dtype], shape, training, autotune)
            if choice is not None:
                return choice
        return default_backend(spec, device, dtype)
    base = split_backend_name(backend)[0]
    if base in KERNEL_BACKENDS and base != "cpu" and dname not in spec.precision:  # cpu: checks its own
        raise TypeError(f"x: backend {backend!r} has kernels for dtypes {list(spec.precision)} "
                        f"(spec precision), got {dtype}")
    try:
        impl = get_backend(backend)
    except ImportError as exc:
        raise ValueError(f"backend: {backend!r} is not available here ({exc})") from None
    if not impl.available(device):
        reason = getattr(impl, "unavailable_reason", lambda d: None)(device)
        raise ValueError(f"x: backend {backend!r} cannot run on device {device} here"
                         + (f": {reason}" if reason else ""))
    return backend


# torch.compile evaluates the resolution once while tracing, as a constant. This is what
# torch.compiler.assume_constant_result does, but that function imports torch._dynamo
# (1.5 s, plus sympy and triton) when gspngen is imported; the marker attribute alone is free.
_resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]

_TUNE_DTYPES = {**DTYPE_NAMES, torch.float64: "fp64"}


def compile(spec: "Spec | Mapping[str, Any] | str | Path", backend: str = "auto",  # noqa: A001
            autotune: bool = False, check_finite: Optional[bool] = None) -> GSPNOp:
    """Compile a spec (a Spec, a mapping, or a YAML path) into a differentiable op.

    ``autotune=True`` (with ``backend="auto"``): the first call for each key
    (device, dtype, shape bucket, pass) that the cache does not hold tunes it
    and stores the result; see ``gspngen.tune``. ``check_finite=True`` (or
    ``GSPNGEN_CHECK_FINITE=1`` when compiling): every call checks its inputs, result
    and gradients for NaN/inf and names the first (a debugging mode; see ``gspngen.finite``).
    """
    return GSPNOp(as_spec(spec), backend, autotune, check_finite)
