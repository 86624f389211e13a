"""Choosing from timings: the winner of one entry, and the backend string an op runs.

The saved tensor differs between backends, so a backward must run on the
backend that ran its forward. Hence, for a call that needs gradients the
*backend* is chosen by its best forward time plus its best backward time,
and then each pass gets that backend's fastest config: ``"name@F|B"``. A
call without gradients only runs the forward: the fastest forward
candidate wins, ``"name@F"``. Ties go to the candidate id that sorts first,
so every process and rank reads the same choice from the same table.
"""

from __future__ import annotations

from typing import Optional


def candidate_id(backend: str, config: str = "") -> str:
    return f"{backend}@{config}" if config else backend


def _ok(candidates: dict) -> list[tuple[float, str, dict]]:
    out = []
    for cid, c in candidates.items():
        ms = c.get("median_ms")
        if c.get("status") == "ok" and isinstance(ms, (int, float)) and ms == ms and ms >= 0:
            out.append((float(ms), cid, c))
    return sorted(out, key=lambda t: (t[0], t[1]))


def winner(candidates: dict) -> Optional[str]:
    """The id of the fastest candidate that verified and was timed; None if none did."""
    ok = _ok(candidates)
    return ok[0][1] if ok else None


def best_per_backend(entry: Optional[dict]) -> dict[str, tuple[float, str]]:
    """backend -> (median ms, config key) of its fastest ok candidate in an entry."""
    best: dict[str, tuple[float, str]] = {}
    if entry:
        for ms, _, c in _ok(entry.get("candidates", {})):
            best.setdefault(c["backend"], (ms, c.get("config", "")))
    return best


def choose(fwd: Optional[dict], bwd: Optional[dict], training: bool) -> Optional[str]:
    """The backend string for a call (see the module docstring); None when nothing usable was tuned."""
    from ..backends import join_backend_name

    f, b = best_per_backend(fwd), best_per_backend(bwd)
    if training and f and b:
        common = sorted(set(f) & set(b), key=lambda n: (f[n][0] + b[n][0], n))
        if common:
            name = common[0]
            return join_backend_name(name, f[name][1], b[name][1])
    if f:
        name = min(f, key=lambda n: (f[n][0], n))
        return join_backend_name(name, f[name][1])
    if training and b:
        name = min(b, key=lambda n: (b[n][0], n))
        return join_backend_name(name, "", b[name][1])
    return None
