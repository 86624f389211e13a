"""The per-device tuning cache: one JSON file per device, safe under concurrent writers.

Folder: ``$GSPNGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gspngen``, else
``~/.cache/gspngen`` (the folder the Triton runtime uses too); the tables live
in its ``autotune/`` subfolder, one ``<device id>.json`` per device
(:func:`gspngen.tune.device.device_id`). The file::

    {"kind": "gspngen-autotune", "schema": 1,
     "device_id": "cpu-amd-epyc-2c-1831e3b8", "device": {identity, see device.py},
     "entries": {"<entry key, see keys.py>": {
         "key": {spec, spec_name, gspngen, generator, toolchain, dtype, pass, bucket},
         "shape": [N, C, H, W],            # the shape it was tuned at
         "candidates": {"<backend>@<config>": {"backend", "config", "status": "ok",
                                              "median_ms", "min_ms", "max_ms", "spread", "reps"}
                        | {"backend", "config", "status": "rejected", "reason"}},
         "default": "<candidate id of the documented default>",
         "winner": "<candidate id>" | null,
         "date": "2026-12-04T01:30:00+00:00"}}}

Rules, and why:

- Writes take a lock on a separate ``<file>.lock`` (filelock), re-read the
  file, merge candidate by candidate (a new candidate keeps the others'
  timings), write a temporary file, fsync it and ``os.replace`` it: readers
  never see half a file, concurrent writers never lose each other's keys.
- A corrupt or truncated file is moved aside (``<file>.corrupt-<time>``) with
  one warning; a file of another schema or device is ignored with one
  warning (and replaced by the next write). Neither ever breaks an op call.
- A folder that cannot be written (read-only, full, not a folder): tuning
  still works, its results kept in memory, with one warning.
- Run-time lookups read the disk at most once per key and process.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

SCHEMA = 1
KIND = "gspngen-autotune"
SUBDIR = "autotune"


class CacheWarning(UserWarning):
    """Something about the tuning cache the user should know; never an error."""


_warned: set = set()
_warn_lock = threading.Lock()


def warn_once(tag: str, message: str) -> None:
    with _warn_lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(message, CacheWarning, stacklevel=3)


def warn_unwritable(folder: Path, exc: OSError) -> None:
    """One warning per folder, whichever write (table, lock file) found it unwritable first."""
    warn_once(f"write:{folder}", f"gspngen tuning cache {folder} cannot be written ({exc.strerror or exc}): "
                                 "tuning results are kept in memory only (this process)")


def cache_root() -> Path:
    """``$GSPNGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gspngen``, else ``~/.cache/gspngen`` (the runtime's folder)."""
    from ..runtime.cache_dir import cache_dir

    return cache_dir()


def tune_dir() -> Path:
    return cache_root() / SUBDIR


def path_for(device_id: str) -> Path:
    return tune_dir() / f"{device_id}.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def empty_table(ident: dict, device_id: str) -> dict[str, Any]:
    return {"kind": KIND, "schema": SCHEMA, "device_id": device_id, "device": dict(ident), "entries": {}}


def table_problem(data: Any) -> Optional[str]:
    """None for a structurally valid table of any schema, else what is wrong (one line)."""
    if not isinstance(data, dict) or data.get("kind") != KIND:
        return f"not a gspngen tuning table (expected an object with kind {KIND!r})"
    if not isinstance(data.get("schema"), int):
        return "no integer 'schema' field"
    if data["schema"] != SCHEMA:
        return None
    if not isinstance(data.get("device"), dict) or not isinstance(data.get("device_id"), str):
        return "no 'device' object or 'device_id' string"
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return "no 'entries' object"
    for key, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("candidates"), dict) and isinstance(e.get("key"), dict)
                and all(isinstance(c, dict) and c.get("status") in ("ok", "rejected")
                        for c in e["candidates"].values())):
            return f"entry {key[:80]!r} is malformed"
    return None


def _move_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
        where = f"moved aside to {aside}"
    except OSError as exc:
        where = f"could not move it aside ({exc.strerror or exc}); ignored"
    warn_once(f"corrupt:{path}", f"gspngen tuning cache {path} is unreadable ({why}): {where}; "
                                 "ops use their defaults until it is tuned again")


def read_table(path: Path, ident: dict, device_id: str, *, repair: bool = True) -> dict[str, Any]:
    """The table at ``path`` for this device, or an empty one (see the module docstring for the rules)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return empty_table(ident, device_id)
    except OSError as exc:
        warn_once(f"read:{path}", f"gspngen tuning cache {path} cannot be read ({exc.strerror or exc}); ignored")
        return empty_table(ident, device_id)
    try:
        data = json.loads(raw.decode("utf-8"))
        problem = table_problem(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"not valid JSON: {exc}"
    if problem is not None:
        if repair:
            _move_aside(path, problem)
        return empty_table(ident, device_id)
    if data["schema"] != SCHEMA:
        warn_once(f"schema:{path}", f"gspngen tuning cache {path} has schema {data['schema']}, this gspngen "
                                    f"reads schema {SCHEMA}: ignored (the next tuning replaces it)")
        return empty_table(ident, device_id)
    if data["device"] != ident:
        warn_once(f"device:{path}", f"gspngen tuning cache {path} is for another device "
                                    f"({data['device'].get('name')}): ignored")
        return empty_table(ident, device_id)
    return data


def merge_entry(old: Optional[dict], new: dict) -> dict:
    """``new`` with the candidates of ``old`` it does not re-measure; the winner re-chosen over all."""
    from .select import winner

    if old is None:
        merged = dict(new)
        merged["candidates"] = dict(new["candidates"])
    else:
        merged = {**old, **new, "candidates": {**old.get("candidates", {}), **new["candidates"]}}
    merged["winner"] = winner(merged["candidates"])
    return merged


def _dumps(table: dict) -> bytes:
    return (json.dumps(table, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def write_entries(path: Path, ident: dict, device_id: str, entries: dict[str, dict]) -> dict[str, Any]:
    """Merge ``entries`` into the file under its lock; returns the merged table. Raises OSError if it cannot."""
    from filelock import FileLock, Timeout

    from ..atomic import write_file_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=120):
            table = read_table(path, ident, device_id)
            for key, entry in entries.items():
                table["entries"][key] = merge_entry(table["entries"].get(key), entry)
            write_file_atomically(path, _dumps(table))
    except Timeout as exc:
        raise OSError(f"lock {exc.lock_file} held by another process for 120 s") from None
    return table


class DeviceCache:
    """The in-memory view of one device's table: lookups hit the disk at most once per key."""

    def __init__(self, ident: dict, device_id: str):
        self.ident, self.device_id = ident, device_id
        self.path = path_for(device_id)
        self.entries: dict[str, dict] = {}
        self._checked: set = set()
        self._stamp: Optional[tuple] = None
        self._lock = threading.Lock()

    def _stat(self) -> Optional[tuple]:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            entry = self.entries.get(key)
            if entry is not None or key in self._checked:
                return entry
            self._checked.add(key)
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                disk = read_table(self.path, self.ident, self.device_id)["entries"]
                self.entries = {**disk, **{k: v for k, v in self.entries.items() if k not in disk}}
            return self.entries.get(key)

    def put(self, entries: dict[str, dict]) -> bool:
        """Store entries (merged); True if they reached the disk, False if kept in memory only (one warning)."""
        with self._lock:
            try:
                table = write_entries(self.path, self.ident, self.device_id, entries)
            except OSError as exc:
                warn_unwritable(self.path.parent, exc)
                for key, entry in entries.items():
                    self.entries[key] = merge_entry(self.entries.get(key), entry)
                return False
            self.entries.update(table["entries"])
            self._stamp = self._stat()
            return True


_CACHES: dict[tuple, DeviceCache] = {}
_CACHES_LOCK = threading.Lock()


def device_cache(device) -> DeviceCache:
    """The cache of ``device`` (a torch.device or name) in the current cache folder (one object per process)."""
    from .device import device_id, identity

    ident = identity(device)
    did = device_id(ident)
    key = (str(tune_dir()), did)
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = DeviceCache(ident, did)
        return cache


def reset_memory() -> None:
    """Forget every in-memory table and warning (tests; a process that changed its cache folder)."""
    with _CACHES_LOCK:
        _CACHES.clear()
    with _warn_lock:
        _warned.clear()
