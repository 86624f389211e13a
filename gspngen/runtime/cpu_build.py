"""Build rendered CPU sources with the system C++ compiler and load them with ctypes.

The compiler is ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on
``$PATH``. A library is built with ``-O3 -march=native -fopenmp -shared
-fPIC`` (``GSPNGEN_CPU_SANITIZE=1`` adds AddressSanitizer and UBSan, for the
tests) and cached on disk under ``<gspngen cache>/cpu/``, keyed by the
source's hash, the compiler's path and version, the flags and the host CPU
(``-march=native`` code is only valid on the CPU that built it). Builds are
written to a temporary file and moved into place with ``os.replace``, under
a file lock, so several processes building the same key at once neither
collide nor build twice. No PyTorch header is involved: a build takes about
a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .cache_dir import cache_dir

# -ffp-contract=off: multiply-adds are fused where the printed code writes fmaf and nowhere else, so
# the 16-lane and scalar line loops (and any compiler) round alike; GCC contracts by default in C++.
BASE_FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")
ABI_VERSION = 1  # must match gspn_abi_version() in templates/cpu/gspn.cpp.j2


class CpuBuildError(RuntimeError):
    """The C++ compiler rejected a rendered source (the message names the spec and the command)."""


def find_compiler() -> tuple[Optional[str], str]:
    """(path, "") of the C++ compiler to use, or (None, why there is none)."""
    cxx = os.environ.get("CXX")
    if cxx:
        path = shutil.which(cxx)
        return (path, "") if path else (None, f"$CXX={cxx!r} is not an executable on $PATH")
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path, ""
    return None, "no C++ compiler found ($CXX unset; none of c++, g++, clang++ on $PATH)"


def flags() -> tuple[str, ...]:
    sanitize = os.environ.get("GSPNGEN_CPU_SANITIZE", "") not in ("", "0")
    if not sanitize:
        return BASE_FLAGS
    # -O1: an instrumented -O3 build takes many times longer to compile, and finds the same bugs
    return tuple("-O1" if f == "-O3" else f for f in BASE_FLAGS) + SANITIZE_FLAGS


@lru_cache(maxsize=None)
def compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


@lru_cache(maxsize=1)
def host_cpu() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += "\n" + line.strip()
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


_PROBE = """
#include <omp.h>
extern "C" int gs_probe() { int n = 0;
#pragma omp parallel num_threads(2)
{
#pragma omp atomic
n += 1;
}
return n + omp_get_max_threads() * 0; }
"""


@lru_cache(maxsize=8)
def _probe(path: str, flag_text: str) -> Optional[str]:
    """None if ``path`` builds and loads an OpenMP library with these flags, else why not."""
    with tempfile.TemporaryDirectory(prefix="gspngen-cpu-probe-") as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(_PROBE)
        cmd = [path, *flag_text.split(), str(src), "-o", str(lib)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the C++ compiler {path} cannot run: {exc}"
        if out.returncode != 0:
            msg = (out.stderr or out.stdout).strip().splitlines()
            return (f"the C++ compiler {path} cannot build an OpenMP library ({' '.join(cmd[:1] + cmd[1:-3])}): "
                    f"{msg[-1] if msg else 'exit ' + str(out.returncode)}")
        try:
            n = ctypes.CDLL(str(lib)).gs_probe()
        except OSError as exc:
            return f"a library built by {path} cannot be loaded: {exc}"
        return None if n >= 1 else "the OpenMP runtime did not run"


def unavailable_reason() -> Optional[str]:
    """None when libraries can be built and loaded here, else one line saying why not."""
    path, why = find_compiler()
    if path is None:
        return why
    return _probe(path, " ".join(flags()))


_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL] = {}
_FAST: dict[tuple, ctypes.CDLL] = {}  # (source, $CXX, $PATH, flags) -> the library _LOADED holds


def build_key(source: str, path: str, flag_list: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (source, path, compiler_version(path), " ".join(flag_list), host_cpu(), str(ABI_VERSION)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _lib_dirs() -> list[Path]:
    return [cache_dir() / "cpu", Path(tempfile.gettempdir()) / f"gspngen-cpu-{os.getuid()}"]


def _compile(path: str, flag_list: tuple[str, ...], source: str, out: Path, what: str) -> None:
    """Compile into a temporary file beside ``out`` and move it into place."""
    fd, tmp_src = tempfile.mkstemp(prefix=out.stem + ".", suffix=".cpp", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        f.write(source)
    tmp_lib = tmp_src[:-4] + ".so"
    cmd = [path, *flag_list, tmp_src, "-o", tmp_lib]
    try:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CpuBuildError(f"cpu backend: building {what} failed: {' '.join(cmd)}: {exc}") from None
        if res.returncode != 0:
            log = (res.stderr or res.stdout).strip().splitlines()
            tail = "\n".join(log[-20:])
            raise CpuBuildError(f"cpu backend: building {what} failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")
        os.replace(tmp_lib, out)
    finally:
        for p in (tmp_src, tmp_lib):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def load_library(source: str, what: str = "a CPU source") -> ctypes.CDLL:
    """The loaded library for ``source`` (built on first use, then from the disk cache).

    ``what`` names the source in error messages (e.g. "spec 'gspn4'").
    """
    # Every kernel call comes here: a hit on the same source text (the renderer's cached string, whose
    # hash Python keeps) under the same compiler settings skips the compiler lookup and the source's
    # sha256 (about 0.1 ms a call, 1-2 % of a gspn4 forward at 2 x 32 x 128^2). (A compiler put on or
    # taken off $PATH's folders while the process runs is not noticed: the library stays the one built.)
    fast = (source, os.environ.get("CXX"), os.environ.get("PATH"), flags())
    lib = _FAST.get(fast)
    if lib is not None:
        return lib
    lib = _load_library(source, what)
    with _LOCK:
        _FAST[fast] = lib
    return lib


def _load_library(source: str, what: str) -> ctypes.CDLL:
    path, why = find_compiler()
    if path is None:
        raise CpuBuildError(f"cpu backend: cannot build {what}: {why}")
    flag_list = flags()
    key = build_key(source, path, flag_list)
    with _LOCK:
        lib = _LOADED.get(key)
        if lib is not None:
            return lib
        from filelock import FileLock

        last: Optional[OSError] = None
        for folder in _lib_dirs():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"gspn_{key}.so"
                with FileLock(str(target) + ".lock", timeout=900):
                    if not target.is_file():
                        _compile(path, flag_list, source, target, what)
                lib = ctypes.CDLL(str(target))
                break
            except CpuBuildError:
                raise
            except OSError as exc:  # the cache folder is not writable: try the next one
                last = exc
                continue
        else:
            raise CpuBuildError(f"cpu backend: no writable folder for the built library of {what}: {last}")
        if lib.gspn_abi_version() != ABI_VERSION:
            raise CpuBuildError(f"cpu backend: the library of {what} has ABI {lib.gspn_abi_version()}, "
                                f"expected {ABI_VERSION}")
        _LOADED[key] = lib
        return lib
