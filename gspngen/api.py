"""``gspngen.compile``: bind a spec to a backend and return a differentiable op."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from . import ops  # noqa: F401  (registers torch.ops.gspngen.*)
from .backends import backend_available, get_backend, split_backend_name
from .spec import Spec, as_spec
from .validate import validate_inputs

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_BACKENDS = ("cuda", "triton", "cpu")


class GSPNOp:
    """A compiled spec: ``op(x, w, lam, u=None, s=None, m=None)`` (DESIGN §6).

    With ``backend="auto"`` the backend is chosen per call from the tensors'
    device and dtype: the generated CUDA kernels, then Triton, on a GPU when the
    spec generates them for this dtype; on the CPU the generated C++ kernels when
    the spec lists ``cpu`` and a compiler is there (fp64, fp32 and the spec's
    16-bit precisions); the reference backend otherwise.
    """

    def __init__(self, spec: Spec, backend: str = "auto"):
        base = split_backend_name(backend)[0] if backend != "auto" else backend
        if base in KERNEL_BACKENDS and base not in spec.backends:
            raise ValueError(f"backend: {base!r} is not generated for spec '{spec.name}' "
                             f"(its backends field lists {list(spec.backends)})")
        self.spec = spec
        self.backend = backend
        self._spec_json = spec.to_json()

    def __repr__(self) -> str:
        return f"GSPNOp(spec={self.spec.name!r}, backend={self.backend!r}, hash={self.spec.hash[:12]})"

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend that runs for inputs like x, or a TypeError/ValueError saying why none can."""
        return _resolve_backend(self._spec_json, self.backend, x.device.type, x.device.index, str(x.dtype))

    def __call__(self, x, w, lam, u=None, s=None, m=None) -> torch.Tensor:
        validate_inputs(self.spec, x, w, lam, u, s, m)
        backend = self.resolve_backend(x)
        c = [None if t is None else t.contiguous() for t in (x, w, lam, u, s, m)]
        y, _ = torch.ops.gspngen.scan(*c, self._spec_json, backend)
        return y


def _resolve_backend(spec_json: str, backend: str, device_type: str, device_index, dtype_name: str) -> str:
    # Pure Python decision on constants: torch.compile evaluates it once while tracing.
    from .ops import spec_from_json

    spec = spec_from_json(spec_json)
    device = torch.device(device_type, device_index)
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    dname = DTYPE_NAMES.get(dtype)
    if backend == "auto":
        if device.type == "cuda" and dname in spec.precision:
            for name in ("cuda", "triton"):
                if name in spec.backends and backend_available(name, device):
                    return name
        if device.type == "cpu" and "cpu" in spec.backends:
            from .render.cpu import dtypes as cpu_dtypes

            if ("fp64" if dtype == torch.float64 else dname) in cpu_dtypes(spec) and backend_available("cpu", device):
                return "cpu"
        return "reference"
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


def compile(spec: "Spec | Mapping[str, Any] | str | Path", backend: str = "auto") -> GSPNOp:  # noqa: A001
    """Compile a spec (a Spec, a mapping, or a YAML path) into a differentiable op."""
    return GSPNOp(as_spec(spec), backend)
