"""Which (backend, config) pairs the tuner may time for a spec, dtype, pass and shape on a device.

Generic over the registry (``gspngen.backends``): every registered backend is
asked through the config protocol (``unavailable_reason``, ``candidates``),
so a new backend (the CPU one, a plug-in added with ``register_backend``) is a
candidate with no change here. Rules:

- generated kernel backends (``cuda``, ``triton``, ``cpu``: the targets a
  spec's ``backends`` field names) must be listed in it and the spec's
  ``precision`` must list the dtype; ``reference``, ``lowered`` and plug-ins
  registered with ``register_backend`` are allowed for every spec (a plug-in
  says what it cannot run through ``unavailable_reason`` / ``candidates``);
- ``cuda_per_step`` is a benchmark baseline, never a candidate;
- Triton through its CPU interpreter is a test device, never fast: not tuned;
- ``reference`` is always a candidate: the floor. On a GPU, above
  ``SLOW_MAX`` elements, ``reference`` and ``lowered`` (a Python loop over the
  steps) are rejected as too slow to time, as ``gspngen bench`` skips them;
  ``auto`` still falls back to the reference where nothing else runs.

A backend that cannot run here yields one rejected candidate (its config
``""``) saying why, so the table shows it; a backend whose ``candidates``
raises yields the same with the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..spec import Spec

ALWAYS = ("reference", "lowered")  # pure PyTorch: allowed for every spec and dtype
GENERATED = ("cuda", "triton", "cpu")  # rendered from the spec: only where its backends field lists them
SLOW_MAX = 1 << 23  # N*C*H*W above which the pure-PyTorch backends are not timed on a GPU
NEVER = ("cuda_per_step",)  # a benchmark baseline (GSPN-1's launch structure)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass(frozen=True)
class Candidate:
    backend: str
    config: str = ""
    rejected: Optional[str] = None  # why it cannot run here (never timed)

    @property
    def id(self) -> str:
        return f"{self.backend}@{self.config}" if self.config else self.backend


def dtype_name(dtype: "torch.dtype | str") -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__)[:300]


def _generated() -> set:
    from ..spec import BACKENDS

    return set(GENERATED) | set(BACKENDS)


def backend_problem(spec: Spec, name: str, device: torch.device, dtype: str) -> Optional[str]:
    """None if ``name`` may be tuned for this spec, device and dtype, else one line saying why not."""
    from ..backends import get_backend

    if name in NEVER:
        return "a benchmark baseline, never a tuning candidate"
    if name in _generated():
        if name not in spec.backends:
            return f"not generated for this spec (backends: {', '.join(spec.backends)})"
        if dtype not in spec.precision:
            return f"no {dtype} kernels (spec precision: {', '.join(spec.precision)})"
    try:
        impl = get_backend(name)
    except ImportError as exc:
        return f"not installed ({exc.name or exc})"
    except Exception as exc:  # a half-built plug-in must not stop the tuning
        return _one_line(exc)
    if name == "triton" and device.type == "cpu":
        return "Triton's CPU interpreter is a test device, never fast: not tuned"
    reason_fn = getattr(impl, "unavailable_reason", None)
    try:
        if reason_fn is not None:
            return reason_fn(device)
        return None if impl.available(device) else f"cannot run on {device.type} here"
    except Exception as exc:
        return _one_line(exc)


def enumerate_candidates(spec: Spec, device: torch.device, dtype: str, pass_: str, shape: Sequence[int],
                         backends: Optional[Sequence[str]] = None,
                         max_per_backend: Optional[int] = None) -> list[Candidate]:
    """Every candidate, rejected ones included (see the module docstring); defaults first per backend.

    ``backends`` restricts the names (default: the whole registry, where
    backends that are not candidates by rule are left out silently);
    ``max_per_backend`` keeps the first configs of each (the default among them).
    """
    from ..backends import backend_names, get_backend

    explicit = backends is not None
    names = list(backends) if explicit else list(backend_names())
    out: list[Candidate] = []
    N, C, H, W = shape
    for name in names:
        problem = backend_problem(spec, name, device, dtype)
        if problem is None and name in ALWAYS and device.type == "cuda" and N * C * H * W > SLOW_MAX:
            problem = f"too slow to time on a GPU at N*C*H*W = {N * C * H * W} > {SLOW_MAX}"
        if problem is not None:
            if explicit or name not in NEVER and (name not in _generated() or name in spec.backends):
                out.append(Candidate(name, "", problem))
            continue
        try:
            keys = list(dict.fromkeys(get_backend(name).candidates(spec, dtype, pass_, tuple(shape))))
        except Exception as exc:
            out.append(Candidate(name, "", f"listing its configs failed: {_one_line(exc)}"))
            continue
        if max_per_backend is not None:
            keys = keys[:max(1, max_per_backend)]
        out += [Candidate(name, key) for key in keys]
    return out
