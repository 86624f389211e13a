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
from typing import Callable, Union

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
BACKEND_NAMES = tuple(_REGISTRY)  # the built-in names; backend_names() adds registered plug-ins


def register_backend(name: str, factory: "Union[str, Callable[[], Backend]]") -> None:
    """Add (or replace) a backend: ``factory`` is ``"package.module:Class"`` or a callable returning one.

    The hook for plug-ins and tests; the autotuner enumerates every registered
    backend, so a registered one becomes a tuning candidate with no other change.
    """
    if not isinstance(name, str) or not name or "@" in name or "|" in name or name == "auto":
        raise ValueError(f"name: expected a backend name without '@' or '|' (not 'auto'), got {name!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError(f"factory: expected 'module:Class' or a callable, got {factory!r}")
    _REGISTRY[name] = factory
    get_backend.cache_clear()


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (built-ins cannot be removed)."""
    if name in BACKEND_NAMES:
        raise ValueError(f"name: {name!r} is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)
    get_backend.cache_clear()


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, built-ins first."""
    return tuple(_REGISTRY)


def split_backend_name(name: str) -> tuple[str, str, str]:
    """``"cpu@F|B"`` -> ``("cpu", "F", "B")``; a bare name has empty keys (the defaults).

    Raises ValueError naming ``backend`` for an unknown base name or a key with
    characters outside ``[a-z0-9_=,.-]``.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string, got {type(name).__name__}")
    base, _, keys = name.partition("@")
    if base not in _REGISTRY:
        raise ValueError(f"backend: expected auto or one of {', '.join(_REGISTRY)}, got {base!r}")
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
    factory = _REGISTRY[base]
    if callable(factory):
        return factory()
    module, cls = factory.split(":")
    package = __name__ if "." not in module else None  # built-ins are relative to this package
    return getattr(importlib.import_module(f".{module}" if package else module, package), cls)()


def backend_available(name: str, device: torch.device) -> bool:
    """True if the backend can run on tensors of this device here (dependencies present)."""
    try:
        return get_backend(name).available(device)
    except ImportError:
        return False
