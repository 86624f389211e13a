"""Backend registry. Backends are imported lazily: triton and cupy are optional.

A backend *name* may carry a tuning (see the config protocol in
:mod:`gspngen.backends.base`): ``"cpu"`` is the backend with its documented
default configurations, ``"cpu@<fwd key>|<bwd key>"`` the same backend with the
forward and backward configurations the keys name (``"cpu@<key>"``: that key
for the forward, the default for the backward). This full string is what the
custom op ``gspngen::scan`` receives, so a tuned choice reaches the kernel
without a second registration and survives ``torch.compile``.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from .base import Backend, check_config_key

# name -> "module:Class", relative to this package
_REGISTRY = {
    "reference": "reference:ReferenceBackend",
    "lowered": "lowered:LoweredBackend",
    "triton": "triton:TritonBackend",
    "cuda": "cuda:CudaBackend",
    "cpu": "cpu:CpuBackend",
    # GSPN-1's launch structure (one launch per step), for benchmarks only
    "cuda_per_step": "cuda:CudaPerStepBackend",
}
BACKEND_NAMES = tuple(_REGISTRY)


def split_backend_name(name: str) -> tuple[str, str, str]:
    """``"cpu@F|B"`` -> ``("cpu", "F", "B")``; a bare name has empty keys (the defaults).

    Raises ValueError naming ``backend`` for an unknown base name or a key with
    characters outside ``[a-z0-9_=,.-]``.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string, got {type(name).__name__}")
    base, _, keys = name.partition("@")
    if base not in _REGISTRY:
        raise ValueError(f"backend: expected auto or one of {', '.join(BACKEND_NAMES)}, got {base!r}")
    fwd, _, bwd = keys.partition("|")
    return base, check_config_key(fwd, "backend"), check_config_key(bwd, "backend")


def join_backend_name(base: str, fwd: str = "", bwd: str = "") -> str:
    """Inverse of :func:`split_backend_name`: the shortest string naming that tuning."""
    if not fwd and not bwd:
        return base
    return f"{base}@{fwd}|{bwd}" if bwd else f"{base}@{fwd}"


@lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    """The backend instance for ``name`` (a base name, or one with ``@keys``; cached per string)."""
    base, fwd, bwd = split_backend_name(name)
    if fwd or bwd:
        return get_backend(base).with_config(fwd, bwd)
    module, cls = _REGISTRY[base].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


def backend_available(name: str, device: torch.device) -> bool:
    """True if the backend can run on tensors of this device here (dependencies present)."""
    try:
        return get_backend(name).available(device)
    except ImportError:
        return False
