"""Compiled packages: what ``gspngen compile`` writes is what runs.

A package folder holds the rendered kernel sources, ``manifest.json`` (the
normalised spec, its hash, the gspngen version, each file's sha256) and an
``__init__.py`` that calls :func:`bind`. Binding

1. reads the manifest and refuses one written by another gspngen version
   (sources and the host code that launches them change together),
2. checks every listed file against its sha256 (an edited or missing file is
   an ImportError naming it and saying how to regenerate),
3. registers the verified sources (:mod:`gspngen.runtime.sources`), so the
   backends launch these files and render nothing, and
4. returns the spec and its compiled op.

:func:`load_package` imports a package folder from anywhere by path; a
folder on ``sys.path`` can also be imported by its name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
REGENERATE = "regenerate it with `gspngen compile SPEC -o DIR` (the spec is in its manifest.json)"


@dataclass(frozen=True)
class Bound:
    """What a package's ``__init__`` exports."""

    spec: Any  # gspngen.Spec
    op: Any  # gspngen.GSPNOp
    manifest: dict
    sources: tuple[str, ...]


def _fail(folder: Path, what: str) -> ImportError:
    return ImportError(f"gspngen package {folder}: {what}; {REGENERATE}")


def read_manifest(folder: "str | Path") -> dict:
    """The parsed manifest of a package folder (ImportError saying what is wrong)."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _fail(folder, f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as exc:
        raise _fail(folder, f"{MANIFEST} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or not isinstance(data.get("spec"), dict):
        raise _fail(folder, f"{MANIFEST} is not a gspngen manifest")
    return data


def verify_files(folder: "str | Path", manifest: dict) -> dict[str, str]:
    """{file name: text} of every file the manifest lists, each checked against its sha256."""
    from . import __version__

    folder = Path(folder)
    made_by = manifest.get("gspngen_version")
    if made_by != __version__:
        raise _fail(folder, f"it was compiled by gspngen {made_by}, this is gspngen {__version__}")
    files: dict[str, str] = {}
    for name, digest in sorted(manifest["files"].items()):
        # names come from our own writer; anything else (a path, '..') is a tampered manifest
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.]*", name):
            raise _fail(folder, f"{MANIFEST} lists a bad file name {name!r}")
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            raise _fail(folder, f"{name} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise _fail(folder, f"{name} was modified (its sha256 does not match {MANIFEST})")
        files[name] = data.decode()
    return files


def bind(init_file: str) -> Bound:
    """Called by a package's ``__init__.py``: verify, register the sources, compile the op."""
    from .api import compile as compile_op
    from .runtime import sources
    from .errors import SpecError
    from .spec import Spec

    folder = Path(init_file).resolve().parent
    manifest = read_manifest(folder)
    try:
        spec = Spec.from_dict(manifest["spec"])
    except SpecError as exc:
        raise _fail(folder, f"its spec is invalid ({exc})") from None
    if spec.hash != manifest.get("spec_hash"):
        raise _fail(folder, f"{MANIFEST}'s spec does not match its spec_hash")
    files = verify_files(folder, manifest)
    facts = manifest.get("facts") if isinstance(manifest.get("facts"), dict) else {}
    sources.register(spec.hash, folder, files, facts)
    op = compile_op(spec, backend="auto")
    return Bound(spec=spec, op=op, manifest=manifest, sources=tuple(files))


def load_package(path: "str | Path"):
    """Import the compiled package in folder ``path`` (its module: ``spec``, ``op``, ``MANIFEST``).

    Works for a folder anywhere, on ``sys.path`` or not; loading the same
    folder twice returns the same module.
    """
    folder = Path(path).resolve()
    init = folder / "__init__.py"
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {str(path)!r} is not a folder (expected a `gspngen compile` output)")
    if not init.is_file() or not (folder / MANIFEST).is_file():
        raise ImportError(f"gspngen package {folder}: no __init__.py and {MANIFEST} here; {REGENERATE}")
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    name = f"gspngen_package_{re.sub(r'[^A-Za-z0-9_]', '_', folder.name)}_{digest}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    module_spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
