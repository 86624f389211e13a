"""Static facts of the rendered Triton kernels, compiled offline (no GPU): registers and spills.

:func:`triton_static_figures` plans the launches exactly as
:mod:`gspngen.runtime.triton_launch` does for a shape (launch groups, the
tile each config gets, the integer arguments and constexprs), compiles each
distinct kernel for a CUDA target with ``triton.compile`` (the
specialisation a launch gets: 16-byte aligned pointers, integers divisible
by 16 marked so, integers equal to 1 made constants) and reads the ptxas
report (``-v``, with the flags Triton's own ``make_cubin`` passes) of the
resulting PTX through :func:`gspngen.perfmodel.parse_ptxas`. Nothing of the
shape's size is allocated; only planning code runs.

The compile runs in a child process without ``TRITON_INTERPRET``: a process
that imported Triton under the interpreter holds interpreted versions of
Triton's own library functions (``tl.sum``'s combine, ``cdiv``), which
cannot be compiled. ``python -m gspngen.perfmodel_triton`` is that child.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from typing import Any

from .spec import Spec

TRITON_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
_INT_ARGS = ("dmap", "ND", "C", "H", "W", "G", "NCHUNK", "NCB")


@dataclass(frozen=True)
class TritonKernelFacts:
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    stack_bytes: int
    shared_bytes: int  # Triton's shared memory (gather exchange, reductions)
    vector_loads: int  # 128-bit ld.global in the PTX (.v4 of 32-bit words, .v2 of 64-bit)
    scalar_loads: int  # every other ld.global (one element, or a narrower vector)


def _pointer_types(dname: str, accumulate: bool, gx_atomic: bool, gw_atomic: bool) -> dict[str, str]:
    """Element type of every pointer argument, as the launcher passes them (fp32 accumulators)."""
    t = TRITON_DTYPES[dname]
    types = {n: t for n in ("x_ptr", "w_ptr", "lam_ptr", "u_ptr", "s_ptr", "m_ptr", "gy_ptr",
                            "glam_ptr", "gu_ptr", "gs_ptr")}
    types["hs_ptr"] = "fp32"  # SAVED_DTYPE
    types["y_ptr"] = "fp32" if accumulate else t
    types["gx_ptr"] = "fp32" if gx_atomic else t
    types["gw_ptr"] = "fp32" if gw_atomic else t
    types["gm_ptr"] = "fp32"
    return types


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v of ``ptx`` with the flags Triton's make_cubin passes (same registers, same spills)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    return r.stderr + r.stdout


def _compile_here(spec: Spec, job: dict) -> dict:
    """Compile one job in this process (Triton's interpreter must be off: see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .perfmodel import parse_ptxas
    from .runtime import triton_launch

    fn = getattr(triton_launch.kernel_module(spec), job["kernel"])
    ints, constexprs, ptr_types = job["ints"], job["constexprs"], job["ptr_types"]
    sig: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    cx: dict[str, Any] = {}
    for i, a in enumerate(fn.arg_names):
        if a.endswith("_ptr"):
            sig[a] = "*" + ptr_types[a]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif a in constexprs:
            sig[a] = "constexpr"
            cx[a] = constexprs[a]
        elif ints[a] == 1:  # the JIT makes an integer 1 a constant
            sig[a] = "constexpr"
            cx[a] = 1
        else:
            sig[a] = "i32"
            if ints[a] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", job["arch"], 32),
                              options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    ptx = compiled.asm["ptx"]
    report = parse_ptxas(_ptxas_log(ptx, job["arch"]))
    if len(report) != 1:
        raise RuntimeError(f"expected one kernel in the ptxas report, got {list(report)}")
    regs, spill, stack, _ = next(iter(report.values()))
    loads = re.findall(r"\bld\.global\S*", ptx)
    vec = sum(1 for w in loads if re.search(r"\.(v4\.[bfsu]32|v2\.[bfsu]64)\b", w))
    return asdict(TritonKernelFacts(regs, spill, stack, int(compiled.metadata.shared), vec, len(loads) - vec))


_MEMO: dict[str, TritonKernelFacts] = {}
_LOCK = threading.Lock()


def compile_facts(spec: Spec, jobs: list[dict]) -> list[TritonKernelFacts]:
    """Facts of each job (kernel, ints, constexprs, num_warps, num_stages, ptr_types, arch), memoised
    per process; the ones not known yet are compiled together in one child process."""
    keys = [json.dumps([spec.hash, j], sort_keys=True) for j in jobs]
    with _LOCK:
        todo = [j for j, k in zip(jobs, keys) if k not in _MEMO]
        if todo:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
            r = subprocess.run([sys.executable, "-m", __name__], input=json.dumps({"spec": spec.to_dict(),
                               "jobs": todo}), capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"offline Triton compile failed:\n{r.stderr[-4000:]}")
            for j, facts in zip(todo, json.loads(r.stdout.strip().splitlines()[-1])):
                _MEMO[json.dumps([spec.hash, j], sort_keys=True)] = TritonKernelFacts(**facts)
        return [_MEMO[k] for k in keys]


def triton_static_figures(spec: Spec, dname: str, shape: tuple[int, int, int, int], config=None,
                          bwd_config=None, arch: int = 90, sms: int = 132,
                          passes: tuple[str, ...] = ("forward", "backward")) -> dict[str, list[dict]]:
    """Per pass (``forward``, ``backward``), one entry per launch the triton backend makes at ``shape``:
    the launch's tile (BLOCK_C, BLOCK_L, num_warps, elements per thread, DIR) and the compiled kernel's
    facts. ``sms`` is the GPU's SM count, which decides whether directions share a launch."""
    from .runtime import triton_launch as tl_

    N, C, H, W = (int(v) for v in shape)
    config = config or tl_.DEFAULT_CONFIG
    bwd_config = bwd_config or config
    G = spec.groups(C)
    D = spec.num_directions
    plans = []
    for pass_, kernel, cfg in (("forward", "gspn_forward", config), ("backward", "gspn_backward", bwd_config)):
        if pass_ not in passes:
            continue
        for group, tile, dir_, steps in tl_.plan_launches(spec, N, C, H, W, cfg, sms, pass_):
            cx: dict[str, Any] = {"BLOCK_C": tile.block_c, "BLOCK_L": group.block_l, "DIR": dir_,
                                  "GROUP_TILE": tile.group_tile, "WIDE_INDEX": tl_.wide_index(C, H, W),
                                  "STEPS": steps}
            if pass_ == "forward":
                accumulate = spec.merge != "stack" and D > 1
                cx.update(ACCUMULATE=accumulate, SAVE_H=True)
                ptrs = _pointer_types(dname, accumulate, False, False)
            else:
                cx.update(GX_ATOMIC=D > 1, GW_ATOMIC=tile.gw_atomic)
                ptrs = _pointer_types(dname, False, D > 1, tile.gw_atomic)
            job = {"kernel": kernel, "ints": dict(zip(_INT_ARGS, tl_._launch_args(C, H, W, G, group, tile))),
                   "constexprs": cx, "num_warps": tile.num_warps, "num_stages": cfg.num_stages,
                   "ptr_types": ptrs, "arch": arch}
            plans.append((pass_, group, tile, dir_, steps, cfg, job))
    facts = compile_facts(spec, [p[-1] for p in plans])
    out: dict[str, list[dict]] = {p: [] for p in passes}
    for (pass_, group, tile, dir_, steps, cfg, _), f in zip(plans, facts):
        out[pass_].append({
            "directions": [spec.directions[d] for d in group.directions],
            "dir": dir_, "block_c": tile.block_c, "block_l": group.block_l, "num_warps": tile.num_warps,
            "num_stages": cfg.num_stages, "steps": steps,
            "elements_per_thread": tile.block_c * group.block_l * steps // (32 * tile.num_warps),
            **asdict(f),
        })
    return out


if __name__ == "__main__":  # the child of compile_facts: jobs in on stdin, facts out as one JSON line
    _req = json.load(sys.stdin)
    _spec = Spec.from_dict(_req["spec"])
    print(json.dumps([_compile_here(_spec, j) for j in _req["jobs"]]))
