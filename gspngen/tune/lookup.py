"""Use at run time: which tuned backend an ``auto`` op runs, without tuning in the hot path.

``GSPNGEN_AUTOTUNE`` sets the mode:

- unset, ``""`` or ``0``: use the cache; on a miss, the documented default
  (``gspngen.api.default_backend``). Nothing is timed.
- ``1`` (or ``on``): on a miss, tune on the first call for that key and store
  the result (also what ``gspngen.compile(spec, autotune=True)`` asks for).
- ``off``: deterministic: the documented defaults, the cache ignored.

Each (spec, device, dtype, shape bucket, training) is decided once per
process and remembered here (the cache file is read at most once per key).
With ``torch.distributed`` initialised (world size > 1) rank 0 decides
(reads the cache, or tunes) and broadcasts its choice; the other ranks never
tune, so every rank runs the same kernels. This is a collective: every rank
must make its first call for a key at the same point (as a model's ranks do).
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

_RESOLVED: dict[tuple, Optional[str]] = {}
_GENERATION = [0]  # bumped by forget(): ops drop their own memos of earlier decisions
_LOCK = threading.RLock()
MODES = {"": "cache", "0": "cache", "1": "tune", "on": "tune", "off": "off"}


def autotune_mode() -> str:
    """``"cache"``, ``"tune"`` or ``"off"`` from ``GSPNGEN_AUTOTUNE`` (ValueError naming it if unknown)."""
    raw = os.environ.get("GSPNGEN_AUTOTUNE", "")
    mode = MODES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(f"GSPNGEN_AUTOTUNE: expected 1, 0 or off (or unset), got {raw!r}")
    return mode


def forget() -> None:
    """Drop every remembered decision (after a tuning stored new results, or in tests)."""
    with _LOCK:
        _RESOLVED.clear()
        _GENERATION[0] += 1


def generation() -> int:
    return _GENERATION[0]


def _distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _usable(choice: Optional[str], device: torch.device) -> Optional[str]:
    """The cached choice if it can run here (a table may name a backend this install lacks), else None."""
    from ..backends import backend_available, split_backend_name

    if choice is None:
        return None
    try:
        split_backend_name(choice)
    except ValueError:
        return None
    return choice if backend_available(choice, device) else None


def decide(spec, device: torch.device, dname: str, shape: tuple, training: bool, tune_on_miss: bool) -> Optional[str]:
    """This process's choice: the cached winner, tuning missing passes first if asked; None on a miss."""
    from .cache import device_cache
    from .keys import entry_key, key_parts
    from .select import choose

    cache = device_cache(device)
    passes = ("fwd", "bwd") if training else ("fwd",)

    def entries():
        return {p: cache.get(entry_key(key_parts(spec, device.type, dname, p, shape))) for p in passes}

    found = entries()
    missing = [p for p in passes if found[p] is None]
    if missing and tune_on_miss and not torch.compiler.is_compiling():
        from .tuner import tune

        tune(spec, shape, dname, missing, device)
        found = entries()
    return _usable(choose(found.get("fwd"), found.get("bwd"), training), device)


def tuned_backend(spec, device: torch.device, dname: str, shape: tuple, training: bool,
                  autotune: bool = False) -> Optional[str]:
    """The tuned backend string for a call, or None (use the default); see the module docstring."""
    from .keys import shape_bucket

    mode = autotune_mode()
    if mode == "off":
        return None
    tune_on_miss = autotune or mode == "tune"
    memo = (spec.hash, str(device), dname, shape_bucket(shape), training, tune_on_miss)
    with _LOCK:
        if memo in _RESOLVED:
            return _RESOLVED[memo]
        if _distributed():
            import torch.distributed as dist

            box = [decide(spec, device, dname, shape, training, tune_on_miss) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        else:
            choice = decide(spec, device, dname, shape, training, tune_on_miss)
        _RESOLVED[memo] = choice
        return choice
