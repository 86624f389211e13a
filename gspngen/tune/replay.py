"""Replay: the tuner's selection, key and cache logic on recorded timings, running no kernel.

Like Kernel Tuner's simulation mode: a table of timings measured elsewhere
(a GPU, say) goes through exactly what a real tuning does after timing
(entry keys, merge with what the cache holds, winner), so selection can be
checked, and tables built, on a machine without that device.

TIMINGS.json::

    {"spec": "examples/gspn4.yaml",            # a path (relative to this file), or the spec as an object
     "device": "cpu",                          # "cpu" / "cuda" (this machine's), or an identity object
                                               #   as in a cache file's "device" (another machine's)
     "toolchain": {"torch": "2.9.0", ...},     # optional: the key's toolchain part (default: this process's)
     "runs": [
       {"shape": [N, C, H, W], "dtype": "fp32", "pass": "fwd",      # pass: fwd | bwd
        "default": "cuda",                                          # optional: the default's candidate id
        "candidates": {
          "cuda@v=1": {"median_ms": 0.12, "spread": 0.02, "reps": 30},   # timed (min/max optional)
          "triton@bc=4,nw=4,ns=2": {"median_ms": 0.15},
          "cuda@v=2": {"rejected": "too much shared memory"}}}]}         # rejected, with its reason

Candidate ids are ``backend`` or ``backend@config``. ``gspngen autotune
--json`` reports can be turned into this format by hand: each entry's
``candidates`` already has these fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .keys import PASSES


def _load(timings: "dict | str | Path") -> tuple[dict, Path]:
    if isinstance(timings, dict):
        return timings, Path.cwd()
    path = Path(timings)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"timings: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"timings: {str(path)!r} is not valid JSON ({exc})") from None
    return data, path.parent


def _candidate(cid: str, raw: Any, where: str) -> dict:
    backend, _, config = cid.partition("@")
    if not backend or not isinstance(raw, dict):
        raise ValueError(f"{where}: expected candidate id -> object, got {cid!r}: {raw!r}")
    if "rejected" in raw:
        return {"backend": backend, "config": config, "status": "rejected", "reason": str(raw["rejected"])}
    ms = raw.get("median_ms")
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not ms >= 0:
        raise ValueError(f"{where}: candidate {cid!r} needs median_ms >= 0 or a 'rejected' reason, got {raw!r}")
    rec = {"backend": backend, "config": config, "status": "ok", "median_ms": float(ms),
           "min_ms": float(raw.get("min_ms", ms)), "max_ms": float(raw.get("max_ms", ms)),
           "spread": float(raw.get("spread", 0.0)), "reps": int(raw.get("reps", 1)), "replayed": True}
    return rec


def replay(timings: "dict | str | Path", *, store: bool = True) -> dict[str, Any]:
    """Run selection, keys and cache on recorded timings (format: the module docstring); returns a report
    like :func:`gspngen.tune.tuner.tune`'s (entries keyed by entry key)."""
    from ..spec import Spec, as_spec
    from .cache import DeviceCache, now_iso
    from .device import device_id, identity
    from .keys import entry_key, key_parts
    from .lookup import forget
    from .select import winner

    data, base = _load(timings)
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError("timings: expected an object with a 'runs' list (see gspngen.tune.replay)")
    raw_spec = data.get("spec")
    if isinstance(raw_spec, str):
        p = Path(raw_spec)
        spec = as_spec(p if p.is_absolute() else base / p)
    elif isinstance(raw_spec, dict):
        spec = Spec.from_dict(raw_spec)
    else:
        raise ValueError(f"timings.spec: expected a path or a spec object, got {raw_spec!r}")
    dev = data.get("device", "cpu")
    if dev == "cuda" and not _cuda_here():
        raise ValueError("timings.device: 'cuda' means this machine's GPU and there is none here; "
                         "give the recorded device's identity object (a cache file's 'device')")
    if dev in ("cpu", "cuda"):
        ident = identity(dev)
    elif isinstance(dev, dict) and dev.get("type") in ("cpu", "cuda"):
        ident = dev
    else:
        raise ValueError(f"timings.device: expected 'cpu', 'cuda' or an identity object with a type, got {dev!r}")
    tc = data.get("toolchain")
    entries: dict[str, dict] = {}
    for i, run in enumerate(data["runs"]):
        where = f"timings.runs[{i}]"
        if not isinstance(run, dict):
            raise ValueError(f"{where}: expected an object, got {run!r}")
        shape, dtype, pass_ = run.get("shape"), run.get("dtype", "fp32"), run.get("pass", "fwd")
        if (not isinstance(shape, list) or len(shape) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ValueError(f"{where}.shape: expected [N, C, H, W] positive integers, got {shape!r}")
        if pass_ not in PASSES:
            raise ValueError(f"{where}.pass: expected fwd or bwd, got {pass_!r}")
        cands = run.get("candidates")
        if not isinstance(cands, dict) or not cands:
            raise ValueError(f"{where}.candidates: expected a non-empty object, got {cands!r}")
        results = {cid: _candidate(cid, raw, f"{where}.candidates") for cid, raw in cands.items()}
        parts = key_parts(spec, ident["type"], dtype, pass_, shape)
        if isinstance(tc, dict):
            parts["toolchain"] = dict(tc)
        key = entry_key(parts)
        new = {"key": parts, "shape": list(shape), "candidates": results, "default": run.get("default"),
               "winner": winner(results), "date": now_iso(), "replayed": True}
        if key in entries:  # several runs of one key in a file: later candidates join earlier ones
            from .cache import merge_entry

            new = merge_entry(entries[key], new)
        entries[key] = new
    did = device_id(ident)
    stored = None
    if store:
        cache = DeviceCache(ident, did)
        try:
            from .cache import device_cache

            if ident == identity("cpu") or (ident.get("type") == "cuda" and _is_this_gpu(ident)):
                cache = device_cache("cpu" if ident["type"] == "cpu" else "cuda")
        except Exception:
            pass
        stored = cache.put(entries)
        entries = {k: cache.entries.get(k, v) for k, v in entries.items()}
        forget()
    return {"device": ident, "device_id": did, "spec": spec.name, "spec_hash": spec.hash, "entries": entries,
            "keys": list(entries), "stored": stored, "replayed": True}


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_this_gpu(ident: dict) -> bool:
    import torch

    from .device import identity

    return torch.cuda.is_available() and identity("cuda") == ident
