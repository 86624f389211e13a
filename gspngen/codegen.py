"""``gspngen compile``: render a spec into an importable package folder, atomically.

The folder holds the rendered kernel sources of every backend the spec asks
for, ``manifest.json`` (normalised spec, hash, gspngen version, file digests)
and ``__init__.py``. Same spec -> identical bytes. Everything is written into a
temporary sibling folder first and renamed into place, so a failure leaves
either the old folder or nothing, never a half-written one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .render.templates import render
from .spec import Spec


def rendered_sources(spec: Spec) -> dict[str, str]:
    """Kernel sources for every backend in ``spec.backends``: filename -> text."""
    files: dict[str, str] = {}
    for backend in spec.backends:
        module = importlib.import_module(f".render.{backend}", __package__)
        for name, text in module.render_files(spec).items():
            if name in files:
                raise RuntimeError(f"renderer {backend} produced {name}, which another renderer produced too")
            files[name] = text
    return files


def manifest_facts(spec: Spec) -> dict[str, dict]:
    """Per backend, what its host code needs from the lowering at run time (a renderer's
    ``manifest_facts``), so a compiled package launches without sympy."""
    facts = {}
    for backend in spec.backends:
        module = importlib.import_module(f".render.{backend}", __package__)
        if hasattr(module, "manifest_facts"):
            facts[backend] = module.manifest_facts(spec)
    return facts


def package_files(spec: Spec) -> dict[str, str]:
    """Every file of the generated package: filename -> text.

    The manifest lists the sha256 of every other file (``__init__.py`` included);
    importing the package checks them all (:mod:`gspngen.package`).
    """
    files = dict(sorted(rendered_sources(spec).items()))
    files["__init__.py"] = render("package/__init__.py.j2", version=__version__, name=spec.name, spec_hash=spec.hash)
    manifest = {
        "gspngen_version": __version__,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "facts": manifest_facts(spec),
        "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())},
    }
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return files


def check_replaceable(out: Path) -> None:
    """Raise FileExistsError unless ``out`` is absent, an empty folder or an earlier gspngen output.

    Replacing is a rename of the whole folder, so a folder holding anything else
    (``-o .``, ``-o ~/project``) or a file would be lost.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a folder; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no manifest.json, so it is not a gspngen output "
                              f"folder; refusing to replace it")


def write_package(spec: Spec, out_dir: str | Path) -> Path:
    """Render ``spec`` and atomically replace ``out_dir`` with the result. Returns the folder.

    ``out_dir`` must be absent, empty, or an earlier output (see :func:`check_replaceable`).
    """
    out = Path(os.path.abspath(out_dir))  # "." and ".." get a real name
    check_replaceable(out)
    files = package_files(spec)  # render everything before touching the disk
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        for name, text in files.items():
            (tmp / name).write_bytes(text.encode())
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
