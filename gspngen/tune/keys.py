"""The cache entry key: everything that can change which candidate is fastest, or what it computes.

A key is one string (a JSON object key) joined from these parts; the parts
are also stored readable in the entry (``gspngen cache show``):

- ``spec``: the spec's hash (its normalised JSON);
- ``gen``: the gspngen version and a digest of the templates and the
  lowering/printing/rendering code (a new template is a new kernel);
- ``tc``: a digest of the toolchain versions that change generated code:
  torch, triton, cupy and NVRTC on a GPU, the C++ compiler on the CPU;
- ``dtype``: the storage dtype; ``pass``: ``fwd`` or ``bwd``;
- ``bucket``: the shape bucket, ``nc<N*C>-h<H'>-w<W'>`` where N*C is exact
  (the number of independent scans) and H', W' are H, W rounded up to a power
  of two (line length and step count decide the launch shape; nearby sizes
  share a winner). A tuned winner is a config *key*, which every backend
  re-plans for the actual shape, so a bucket never hands a shape a config
  that does not fit it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

PASSES = ("fwd", "bwd")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_bucket(shape: "tuple[int, int, int, int]") -> str:
    """(N, C, H, W) -> ``"nc<N*C>-h<pow2 H>-w<pow2 W>"`` (see the module docstring)."""
    N, C, H, W = (int(v) for v in shape)
    return f"nc{N * C}-h{next_pow2(H)}-w{next_pow2(W)}"


@lru_cache(maxsize=None)
def generator_hash() -> str:
    """Digest of the templates and the code that lowers, prints, renders and plans kernels (once per process)."""
    from ..render.templates import template_dir

    pkg = Path(__file__).resolve().parents[1]
    files = sorted(p for p in template_dir().rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for folder in ("lower", "render", "runtime", "backends"):
        files += sorted((pkg / folder).glob("*.py"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _dist_version(name: str) -> "str | None":
    # importlib.metadata reads the installed version without importing the package (triton, cupy are slow).
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def cxx_version() -> "str | None":
    """First line of ``$CXX --version`` (default ``c++``): the CPU backend's compiler, None if absent."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


@lru_cache(maxsize=None)
def _nvrtc_version() -> "str | None":
    try:
        from cupy.cuda import nvrtc

        return ".".join(str(v) for v in nvrtc.getVersion())
    except Exception:  # no cupy, or no CUDA libraries: the cuda backend is not a candidate then
        return None


@lru_cache(maxsize=None)
def toolchain(device_type: str) -> tuple[tuple[str, Any], ...]:
    import torch

    tc: dict[str, Any] = {"torch": torch.__version__, "triton": _dist_version("triton")}
    if device_type == "cuda":
        tc.update(cuda=torch.version.cuda,
                  cupy=next(filter(None, (_dist_version(n) for n in ("cupy-cuda12x", "cupy-cuda13x", "cupy"))),
                            None),
                  nvrtc=_nvrtc_version())
    else:
        tc["cxx"] = cxx_version()
    return tuple(sorted(tc.items()))


def key_parts(spec, device_type: str, dtype: str, pass_: str, shape) -> dict[str, Any]:
    """The readable parts of an entry key (stored in the entry)."""
    from .. import __version__

    if pass_ not in PASSES:
        raise ValueError(f"pass: expected one of {', '.join(PASSES)}, got {pass_!r}")
    tc = dict(toolchain(device_type))
    return {"spec": spec.hash, "spec_name": spec.name, "gspngen": __version__, "generator": generator_hash(),
            "toolchain": tc, "dtype": dtype, "pass": pass_, "bucket": shape_bucket(shape)}


def entry_key(parts: dict[str, Any]) -> str:
    """The key string of :func:`key_parts`."""
    tc = hashlib.sha256(json.dumps(parts["toolchain"], sort_keys=True).encode()).hexdigest()[:12]
    return (f"spec={parts['spec'][:16]}|gen={parts['gspngen']}+{parts['generator']}|tc={tc}"
            f"|dtype={parts['dtype']}|pass={parts['pass']}|bucket={parts['bucket']}")
