"""Build the real CUDA prelude of a rendered source for the host (tests only).

The emulator swaps the prelude's primitives for checked ones, so the vector loads and stores and
the fp16/bf16 conversions that run on a GPU never ran in a test. Here the prelude is cut out of
the rendered source as it is, its inline PTX rewritten into calls of prelude_host.h (each PTX
instruction implemented per the ISA; an instruction it does not know fails the build), and it is
compiled with g++ together with extern "C" entry points for its functions.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import tempfile
from pathlib import Path

from cuda_emu.emulator import CXX, HERE

_ASM = re.compile(r'asm\("([a-z0-9.]+) %0, %1;"\s*:\s*"=[a-z]"\((\w+)\)\s*:\s*"[a-z]"\((\w+)\)\);')
# vector widths the prelude serves: V elements of sizeof(gs_t) bytes, V * sizeof up to 64
WIDTHS = (1, 2, 4, 8, 16)


def host_prelude(source: str) -> str:
    """The prelude of a rendered source (from its banner to gs_fmod), PTX asm made host calls."""
    start = source.index("// ---------------------------------------------------------------------------\n// Prelude:")
    end = source.index("\n", source.index("GS_DEV constexpr int gs_fmod"))
    text = source[start:end]
    # cp.async and its group waits: the host shims of prelude_host.h, which copy at once (the emulator gives
    # them their deferred semantics; the PTX is pinned by tests/test_cuda_ring.py)
    a, b = text.find("// Asynchronous copies, global -> shared"), text.find("// NW 32-bit words of shared memory")
    if a >= 0 and b > a:
        text = text[:a] + text[b:]
    text = _ASM.sub(lambda m: f"{m.group(2)} = gs_ptx::{m.group(1).replace('.', '_')}({m.group(3)});",
                    text)
    if "asm(" in text:
        raise ValueError("inline asm the host shims cannot run:\n"
                         + "\n".join(line for line in text.splitlines() if "asm(" in line))
    return text + "\n"


# The cp.async ring's run, through a 16-byte aligned buffer standing for shared memory and back by
# gs_lds_run; 0 where the run is not 4, 8 or 16 bytes (no such ring).
_CP = """
template <int V>
int cp_round_trip(gs_t* d, const gs_t* p, int valid)
{
    if constexpr (V * sizeof(gs_t) == 4 || V * sizeof(gs_t) == 8 || V * sizeof(gs_t) == 16) {
        alignas(16) gs_t buf[V];
        gs_cp_run<V>(buf, p, valid != 0);
        gs_cp_commit();
        gs_cp_wait<0>();
        gs_lds_run<V>(d, buf);
        return 1;
    } else {
        return 0;
    }
}
"""


def _entries(vectors: bool) -> str:
    out = ([_CP] if vectors else []) + ['extern "C" {',
           "void t_f(const gs_t* a, float* b, int n) { for (int i = 0; i < n; ++i) b[i] = gs_f(a[i]); }",
           "void t_s(const float* a, gs_t* b, int n) { for (int i = 0; i < n; ++i) b[i] = gs_s(a[i]); }"]
    for v in WIDTHS if vectors else ():
        out += [f"void t_ldv{v}(gs_t* d, const gs_t* p, int nc) "
                f"{{ nc ? gs_ldv<{v}, true>(d, p) : gs_ldv<{v}, false>(d, p); }}",
                f"void t_stv{v}(gs_t* p, const gs_t* d) {{ gs_stv<{v}>(p, d); }}",
                f"void t_ldrun{v}(gs_t* d, const gs_t* p, unsigned m, int vec) "
                f"{{ vec ? gs_ld_run<{v}, true, true>(d, p, m) : gs_ld_run<{v}, false, false>(d, p, m); }}",
                f"void t_strun{v}(gs_t* p, const gs_t* d, unsigned m, int vec) "
                f"{{ vec ? gs_st_run<{v}, true>(p, d, m) : gs_st_run<{v}, false>(p, d, m); }}",
                f"int t_cprun{v}(gs_t* d, const gs_t* p, int valid) {{ return cp_round_trip<{v}>(d, p, valid); }}"]
    return "\n".join(out + ["}"]) + "\n"


def build_prelude(source: str, directory: Path | None = None, emulated: bool = False) -> ctypes.CDLL:
    """Compile the prelude of `source` with entry points t_f, t_s, t_ldv{V}, t_stv{V}, t_ldrun{V}, t_strun{V};
    emulated: the emulator's replacements instead (conversions only: its accesses need a launch)."""
    if CXX is None:
        raise RuntimeError("the host prelude needs a C++ compiler (g++)")
    d = Path(directory or tempfile.mkdtemp(prefix="gspn_prelude_"))
    src, lib = d / "prelude.cpp", d / "prelude.so"
    head = '#include "emu.h"\n' if emulated else '#include "prelude_host.h"\n'
    src.write_text(head + host_prelude(source) + _entries(not emulated))
    proc = subprocess.run([CXX, "-std=c++17", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", f"-I{HERE}", str(src),
                           "-o", str(lib)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("host prelude build failed:\n" + proc.stderr[-4000:])
    return ctypes.CDLL(str(lib))
