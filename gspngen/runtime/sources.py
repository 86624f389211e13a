"""Kernel sources a backend runs: a compiled package's files when one is loaded, else rendered now.

``gspngen compile`` writes every rendered source into a package folder.
Importing that package (see :mod:`gspngen.package`) verifies the files and
registers them here under the spec's hash; from then on a backend asking for
a source gets the package's bytes (the ones that were verified, held in
memory, so an edit after import cannot slip in), and nothing is rendered:
sympy and Jinja are never imported on that path.

Without a package, ``source`` calls the renderer it is given. Same spec, same
gspngen version: same text either way (``gspngen compile`` is deterministic).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

_LOCK = threading.Lock()
# spec hash -> (package folder, {file name: verified text})
_PACKAGED: dict[str, tuple[Path, dict[str, str]]] = {}
# spec hash -> {backend: facts the host derives from the lowering} (the manifest's "facts")
_FACTS: dict[str, dict[str, dict]] = {}


def register(spec_hash: str, folder: Path, files: dict[str, str], facts: Optional[dict] = None) -> None:
    """Make ``files`` (verified package contents) the sources of the spec with this hash."""
    with _LOCK:
        _PACKAGED[spec_hash] = (Path(folder), dict(files))
        _FACTS[spec_hash] = dict(facts or {})


def facts(spec, backend: str, derive: Callable[[], dict]) -> dict:
    """Host-side facts of the lowering for ``backend``: the loaded package's, else ``derive()`` (cached)."""
    per_spec = _FACTS.setdefault(spec.hash, {})
    hit = per_spec.get(backend)
    if hit is None:
        hit = per_spec[backend] = derive()
    return hit


def packaged(spec_hash: str, file_name: str) -> Optional[tuple[Path, str]]:
    """(package folder, text) of a registered file, or None."""
    entry = _PACKAGED.get(spec_hash)
    if entry is None or file_name not in entry[1]:
        return None
    return entry[0], entry[1][file_name]


def source(spec, file_name: str, render: Callable[[], str]) -> str:
    """The text of ``file_name`` for ``spec``: the loaded package's, else ``render()``."""
    hit = packaged(spec.hash, file_name)
    return hit[1] if hit is not None else render()


def forget(spec_hash: str) -> None:
    """Drop a registration (tests)."""
    with _LOCK:
        _PACKAGED.pop(spec_hash, None)
        _FACTS.pop(spec_hash, None)
