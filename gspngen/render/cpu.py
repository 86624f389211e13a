"""Render a spec's CPU C++ source from ``templates/cpu`` and list its tunings.

One source per spec holds the forward and backward passes for every storage
dtype the CPU backend runs for that spec (fp64 and fp32 always, plus the
spec's 16-bit precisions), as ``extern "C"`` entry points
``gspn_fwd_<dtype>`` / ``gspn_bwd_<dtype>``. The template holds the work
split, tiling and memory access; the per-pixel math is the lowering's printed
code (:func:`gspngen.lower.print_block`, languages ``cpu`` and ``cpu64``),
pasted into one inline function per block and math type. Printed lines are
checked against a narrow grammar, as for CUDA: nothing from the spec reaches
the source except validated numbers, flags and identifiers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .. import __version__
from ..spec import Spec
from .cuda import _arg, _cbool, _check_ident, _w_used, check_block_contract

if TYPE_CHECKING:
    from ..lower.ir import CodeBlock

# The lowering (sympy) and Jinja are imported only when rendering: a compiled package's
# source is built as it is (see kernel_source).

# storage dtype -> (C++ storage type, math type)
CTYPES = {"fp64": ("double", "double"), "fp32": ("float", "float"),
          "fp16": ("_Float16", "float"), "bf16": ("gs_bf16", "float")}
FILE_NAME = "gspn_cpu.cpp"

_LINE = re.compile(r"const (float|double|bool) ([a-z][a-z0-9_]*) = ([A-Za-z0-9_ .+\-*/()?:,<>=!&|]+);")
_CALLS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_ALLOWED_CALLS = {"cpu": {"gs_exp", "gs_exp2", "gs_floor", "gs_pow2", "fmaf"},
                  "cpu64": {"exp", "exp2", "gs_floor", "gs_pow2", "fma"}}


def dtypes(spec: Spec) -> tuple[str, ...]:
    """Storage dtypes the CPU source has entry points for: fp64, fp32 and the spec's 16-bit precisions."""
    return tuple(d for d in CTYPES if d in ("fp64", "fp32") or d in spec.precision)


def _check_lines(block_name: str, lang: str, lines: list[str]) -> list[str]:
    ctype = "double" if lang == "cpu64" else "float"
    for line in lines:
        m = _LINE.fullmatch(line)
        if not m or m.group(1) not in (ctype, "bool"):
            raise ValueError(f"block {block_name}: unexpected printed line {line!r}")
        for fn in _CALLS.findall(m.group(3)):
            if fn not in _ALLOWED_CALLS[lang]:
                raise ValueError(f"block {block_name}: printed line calls {fn!r}, not an allowed function")
    return lines


def _print_block(block: CodeBlock, lang: str) -> list[str]:
    from ..lower import print_block

    return print_block(block, lang)


# The fp32 blocks are also compiled for 16 lanes at once (AVX-512): the same printed lines with the
# declared types swapped for the template's vector types, whose operators and function overloads
# (gs_exp2, gs_floor, gs_pow2, fmaf) take the place of the scalar ones.
VECTOR_TYPES = {"float": "gs_vf", "bool": "gs_vm"}


def _signature(used: list[str], outs: list[str], ctype: str, flag: str) -> str:
    params = [f"const {flag if re.fullmatch(r'e[0-9]', v) else ctype} {v}" for v in used]
    return ", ".join(params + [f"{ctype}& o_{o}" for o in outs])


def _math_block(name: str, block: CodeBlock, lang: str) -> dict:
    """An inline function for one printed block in one math type (fp32: also its 16-lane form)."""
    ctype = "double" if lang == "cpu64" else "float"
    used = [_check_ident(v, f"block {name} input") for v in block.used_inputs]
    outs = [_check_ident(v, f"block {name} output") for v in block.outputs]
    lines = _check_lines(name, lang, _print_block(block, lang))
    out = {
        "name": name,
        "ctype": ctype,
        "inputs": list(block.inputs),
        "outputs": outs,
        "signature": _signature(used, outs, ctype, "bool"),
        "lines": lines,
    }
    if lang == "cpu":
        # _check_lines has matched every line to "const (float|bool) name = expr;": the type changes, and
        # the value goes through gs_bc / gs_bm, which broadcast an expression of constants alone
        out["vsignature"] = _signature(used, outs, VECTOR_TYPES["float"], VECTOR_TYPES["bool"])
        out["vlines"] = [_LINE.sub(lambda m: f"const {VECTOR_TYPES[m.group(1)]} {m.group(2)} = "
                                   f"{'gs_bc' if m.group(1) == 'float' else 'gs_bm'}({m.group(3)});", line)
                         for line in lines]
    return out


def _call(name: str, block: CodeBlock) -> str:
    """The template locals a block's function is called with (same names as the CUDA templates)."""
    return ", ".join([_arg(v, name, False) for v in block.used_inputs] + [_arg(o, name, True) for o in block.outputs])


# The adjoint's outputs that need no neighbour: what the lr/rl backward computes on image rows from the
# line's total gh (see gs_bwd_local_rows in the template), and the only inputs they may read.
LOCAL_OUTPUTS = ("glam", "gx")
LOCAL_INPUTS = frozenset({"gh", "x", "lam"})


def local_adjoint(block: "CodeBlock"):
    """The adjoint block cut down to LOCAL_OUTPUTS (the assignments they depend on, in order), or None
    where the cut does not hold: one of them reads beyond LOCAL_INPUTS, or another output reads x or
    lam (the line then runs without them, so nothing else may depend on them)."""
    from ..lower.ir import CodeBlock

    names = [sym.name for sym, _ in block.assigns]
    if len(set(names)) != len(names) or set(names) & set(block.inputs):
        return None  # not single assignment: the walk below goes by name
    deps: dict[str, set[str]] = {n: {n} for n in block.inputs}
    for sym, rhs in block.assigns:
        deps[sym.name] = set().union(*(deps.get(f.name, {f.name}) for f in rhs.free_symbols))
    inputs_of = {name: deps[name] & set(block.inputs) for name in block.outputs}
    if not set(LOCAL_OUTPUTS) <= set(block.outputs):
        return None
    if any(not inputs_of[o] <= LOCAL_INPUTS for o in LOCAL_OUTPUTS):
        return None
    if any(inputs_of[o] & {"x", "lam"} for o in block.outputs if o not in LOCAL_OUTPUTS):
        return None
    needed: set[str] = set(LOCAL_OUTPUTS)
    for sym, rhs in reversed(block.assigns):
        if sym.name in needed:
            needed |= {f.name for f in rhs.free_symbols}
    return CodeBlock(inputs=block.inputs, outputs=LOCAL_OUTPUTS,
                     assigns=tuple((sym, rhs) for sym, rhs in block.assigns if sym.name in needed))


def render_context(spec: Spec) -> dict:
    """Everything the CPU template reads."""
    from ..lower import lower

    ir = lower(spec)
    check_block_contract(ir)
    adj_used = set(ir.adjoint.used_inputs)
    order = ("forward", "output", "adjoint", "adjoint_output")
    blocks = dict(ir.blocks)
    local = local_adjoint(ir.adjoint)
    if local is not None:
        blocks["adjoint_local"] = local
        order += ("adjoint_local",)
    math = [_math_block(n, blocks[n], lang) for lang in ("cpu", "cpu64") for n in order]
    return {
        "version": __version__,
        "k": int(ir.k),
        "r": int(ir.r),
        "num_directions": len(ir.directions),
        "dirs": [{"rev": bool(d.reverse), "step_w": d.step_axis == "W"} for d in ir.directions],
        "nhwc": ir.layout == "nhwc",
        "modulation": bool(ir.modulation),
        "skip": bool(ir.skip),
        "learned": ir.merge == "learned",
        "stack": ir.merge == "stack",
        "bwd_needs_h": "h" in ir.adjoint_output.used_inputs,
        "bwd_needs_hp": any(f"hp{c}" in adj_used for c in range(ir.k)),
        "w_used_fwd": _w_used(ir.forward, ir.k),
        "w_used_bwd": _w_used(ir.adjoint, ir.k),
        "math": math,
        # the local cut binds its outputs as the adjoint's do (f_glam, f_gxa)
        "calls": {n: _call("adjoint" if n == "adjoint_local" else n, blocks[n]) for n in order},
        "local_adjoint": local is not None,
        "dtypes": [{"name": d, "storage": CTYPES[d][0], "math": CTYPES[d][1]} for d in dtypes(spec)],
    }


@lru_cache(maxsize=None)
def _env():
    from .templates import environment

    env = environment().overlay()
    env.filters["cbool"] = _cbool
    return env


@lru_cache(maxsize=64)
def render_source(spec: Spec) -> str:
    """The C++ source of every CPU entry point of ``spec`` (deterministic)."""
    return _env().get_template("cpu/gspn.cpp.j2").render(**render_context(spec))


def kernel_source(spec: Spec) -> str:
    """The source the backend builds: a loaded compiled package's file, else rendered now."""
    from ..runtime import sources

    return sources.source(spec, FILE_NAME, lambda: render_source(spec))


def render_files(spec: Spec) -> dict[str, str]:
    """Files for ``gspngen compile``: one .cpp."""
    return {FILE_NAME: render_source(spec)}


# ---------------------------------------------------------------------------
# Tunings
# ---------------------------------------------------------------------------

TILES = (8, 16, 32, 64, 128, 256)
CBS = (4, 8, 16, 32)
THREADS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # caps; 0 (the default): torch.get_num_threads()


@dataclass(frozen=True)
class CpuConfig:
    """One tuning: ``tile`` steps staged per tile; ``cb`` channels per work item (nhwc only;
    nchw items are one channel plane); ``threads``: at most this many OpenMP threads (0: all of
    ``torch.get_num_threads()``; on small images one thread can beat the fork and join)."""

    tile: int = 16
    cb: int = 32
    threads: int = 0

    def key(self, spec: Spec) -> str:
        parts = [f"cb={self.cb}"] if spec.layout == "nhwc" else []
        parts += [f"threads={self.threads}"] if self.threads else []
        return ",".join(parts + [f"tile={self.tile}"])

    def thread_count(self, available: int) -> int:
        return max(1, min(self.threads, available) if self.threads else available)


def default_config(spec: Spec) -> CpuConfig:
    """The documented default. nchw: tiles of 32 steps (a tile of lr/rl rows is two 64-byte cache
    lines of fp32, transposed in 16 x 16 blocks in registers; against 16 steps, half the per-tile
    work per step; the gspn4 fp32 backward's scratch at 128 lanes, ~330 KB per thread, still fits
    L2): gspn4 fp32, 2 x 32 x 128 x 128, backward about 1 ms (6 %) faster in two quiet A/B runs,
    forward the same within noise; lr alone with its inputs in L3, 11 % faster backward). nhwc: tiles of 16 steps (a tile holds every channel of the item, so it grows with cb)
    and items of up to 32 channels (two AVX-512 vectors of fp32, 128 contiguous bytes per pixel,
    and with C <= 32 every line is one contiguous run and shared weight groups are summed inside
    the item)."""
    return CpuConfig(tile=16 if spec.layout == "nhwc" else 32)


def parse_config(spec: Spec, key: str, what: str = "config") -> CpuConfig:
    """The config a key names ("" is the default). ValueError naming the key if it is not valid."""
    from ..backends.base import parse_config_key

    fields = parse_config_key(key, what)
    allowed = {"tile", "cb", "threads"} if spec.layout == "nhwc" else {"tile", "threads"}
    base = default_config(spec)
    values = {"tile": base.tile, "cb": base.cb, "threads": base.threads}
    for name, value in fields.items():
        if name not in allowed:
            raise ValueError(f"{what}: unknown cpu config field {name!r} in {key!r} (allowed: {sorted(allowed)})")
        choices = CHOICES[name]
        if not value.isdigit() or int(value) not in choices:
            raise ValueError(f"{what}: cpu config {name} must be one of {list(choices)}, got {value!r} in {key!r}")
        values[name] = int(value)
    return CpuConfig(**values)


CHOICES = {"tile": TILES, "cb": CBS, "threads": THREADS}


def candidate_configs(spec: Spec, threads: int = 1) -> list[CpuConfig]:
    """Tunings worth timing, the default first: shorter and longer tiles (longer ones read longer
    runs of each row for lr/rl in nchw, at the price of more cache), for nhwc other channel
    blocks (half, one and two AVX2 vectors), and one thread where ``threads`` (the caller's
    torch.get_num_threads()) offers more."""
    base = default_config(spec)
    one = [CpuConfig(tile=base.tile, cb=base.cb, threads=1)] if threads > 1 else []
    if spec.layout == "nhwc":
        return [base] + [CpuConfig(tile=t, cb=base.cb) for t in (32, 64)] + [CpuConfig(tile=base.tile, cb=c)
                                                                          for c in (4, 8, 16)] + one
    return [base] + [CpuConfig(tile=t) for t in (16, 64, 128)] + one
