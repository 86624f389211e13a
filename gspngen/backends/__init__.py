"""Backend registry. Backends are imported lazily: triton and cupy are optional."""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from .base import Backend

# name -> "module:Class", relative to this package
_REGISTRY = {
    "reference": "reference:ReferenceBackend",
    "lowered": "lowered:LoweredBackend",
    "triton": "triton:TritonBackend",
    "cuda": "cuda:CudaBackend",
    # GSPN-1's launch structure (one launch per step), for benchmarks only
    "cuda_per_step": "cuda:CudaPerStepBackend",
}
BACKEND_NAMES = tuple(_REGISTRY)


@lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)} or auto, got {name!r}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


def backend_available(name: str, device: torch.device) -> bool:
    """True if the backend can run on tensors of this device here (dependencies present)."""
    try:
        return get_backend(name).available(device)
    except ImportError:
        return False
