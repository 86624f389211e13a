"""Render a spec's CUDA C++ kernels from ``templates/cuda`` and describe how to instantiate them.

One source per spec and storage dtype holds every kernel as a C++ template:
the fused forward and backward scans (``gspn_fwd``, ``gspn_bwd``) and the
per-step baseline (``gspn_ps_*``). The templates hold thread mapping, memory
access and the scan loop; the per-pixel math is the lowering's printed code
(:func:`gspngen.lower.print_block`), pasted into one device function per
block. Nothing from the spec reaches the source except validated numbers,
flags and identifiers; the spec's name does not reach it at all.

The host picks a tuning per launch (:class:`KernelConfig`) and names the
instantiation it needs (:func:`fused_name`), which NVRTC compiles through
name expressions. :func:`candidate_configs` lists the tunings an autotuner may
try, the documented default first.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from dataclasses import replace as _replace
from functools import lru_cache

from typing import TYPE_CHECKING

from .. import __version__
from ..geometry import DIRECTION_TABLE
from ..spec import MAX_CONNECTION, Spec

if TYPE_CHECKING:
    from ..lower.ir import CodeBlock

# Rendering imports sympy (the lowering) and Jinja lazily: a compiled package launches its own
# sources, and the host-side planning below reads the lowering's facts from its manifest.

STORE_KIND = {"fp32": 0, "fp16": 1, "bf16": 2}
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# Kernel parameters, in order: (kind, name). Kinds: in = const storage pointer,
# out = storage pointer, f32 = fp32 pointer, vptr = untyped pointer (storage or
# fp32, by template flag), i32 = int. The source's signatures and the host's
# argument packing both come from this table.
PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "fwd": (("in", "p_x"), ("in", "p_w"), ("in", "p_lam"), ("in", "p_u"), ("in", "p_s"), ("in", "p_m"),
            ("out", "p_y"), ("out", "p_h"),
            ("i32", "N"), ("i32", "C"), ("i32", "G"), ("i32", "H"), ("i32", "W"), ("i32", "chunk"), ("i32", "cpb"),
            ("i32", "d"), ("i32", "rev"), ("i32", "stepw"), ("i32", "acc")),
    "bwd": (("in", "p_gy"), ("in", "p_x"), ("in", "p_w"), ("in", "p_lam"), ("in", "p_u"), ("in", "p_s"),
            ("in", "p_m"), ("in", "p_h"),
            ("out", "p_gx"), ("out", "p_glam"), ("out", "p_gu"), ("out", "p_gs"), ("vptr", "p_gw"), ("f32", "p_gm"),
            ("i32", "N"), ("i32", "C"), ("i32", "G"), ("i32", "H"), ("i32", "W"), ("i32", "chunk"), ("i32", "cpb"),
            ("i32", "d"), ("i32", "rev"), ("i32", "stepw"), ("i32", "acc")),
    "ps_fwd": (("in", "p_x"), ("in", "p_w"), ("in", "p_lam"), ("out", "p_h"),
               ("i32", "N"), ("i32", "C"), ("i32", "G"), ("i32", "H"), ("i32", "W"), ("i32", "chunk"), ("i32", "s")),
    "ps_merge": (("in", "p_x"), ("in", "p_u"), ("in", "p_s"), ("in", "p_m"), ("in", "p_h"), ("out", "p_y"),
                 ("i32", "N"), ("i32", "C"), ("i32", "H"), ("i32", "W")),
    "ps_bwd_out": (("in", "p_gy"), ("in", "p_x"), ("in", "p_u"), ("in", "p_s"), ("in", "p_m"), ("in", "p_h"),
                   ("out", "p_gu"), ("out", "p_gs"), ("f32", "p_gh"), ("f32", "p_gx32"), ("f32", "p_gm"),
                   ("i32", "N"), ("i32", "C"), ("i32", "H"), ("i32", "W")),
    "ps_bwd_step": (("in", "p_x"), ("in", "p_w"), ("in", "p_lam"), ("in", "p_h"), ("out", "p_glam"),
                    ("vptr", "p_gw"), ("f32", "p_gh"), ("f32", "p_gx32"),
                    ("i32", "N"), ("i32", "C"), ("i32", "G"), ("i32", "H"), ("i32", "W"), ("i32", "chunk"),
                    ("i32", "s")),
    "tr": (("in", "p_src"), ("out", "p_dst"), ("i32", "nb1"), ("i32", "nb2"), ("i32", "s1s"), ("i32", "s1d"),
           ("i32", "sp0"), ("i32", "dp0"), ("i32", "R"), ("i32", "Cc")),
}
# The on-chip forward takes the forward's arguments; it runs every direction (the host passes d = -1) and
# ignores rev, stepw and acc.
PARAMS["fwd_oc"] = PARAMS["fwd"]
# The cluster entries (cl=N) take the plain ones' arguments.
PARAMS["fwd_cl"] = PARAMS["fwd"]
PARAMS["bwd_cl"] = PARAMS["bwd"]
# The one-launch entries (ml=1) too: d = -1 (every direction), rev and stepw ignored, acc = 1 for "each
# direction into its own slice of y (gx)".
for _k in ("fwd", "bwd"):
    PARAMS[f"{_k}_ml"] = PARAMS[f"{_k}_ml_cl"] = PARAMS[_k]
C_TYPES = {"in": "const gs_t* __restrict__", "out": "gs_t* __restrict__", "f32": "float* __restrict__",
           "vptr": "void*", "i32": "int"}

# Thread mappings (see templates/cuda/fused.cuh.j2).
LANES, STEPS, CHAN = 0, 1, 2
MAP_NAMES = {LANES: "lanes", STEPS: "steps", CHAN: "chan"}

# Printed-block variables -> the template's locals. Inputs and outputs of
# both adjoint blocks are named apart (gh, gx occur in both).
_IN_MAP = {"lam": "f_lam", "x": "f_x", "u": "f_u", "s": "f_s", "md": "f_md", "h": "f_h", "gy": "f_gy", "gh": "f_gh"}
_OUT_MAP = {
    "forward": {"h": "f_h"},
    "output": {"y": "f_y"},
    "adjoint_output": {"gh": "f_gho", "gx": "f_gxo", "gu": "f_gu", "gs": "f_gs", "gmd": "f_gmd"},
    "adjoint": {"glam": "f_glam", "gx": "f_gxa"},
}
_INDEXED_IN = re.compile(r"(w|e|hp)([0-9])")
_INDEXED_OUT = re.compile(r"(gw|ghp)([0-9])")
_IDENT = re.compile(r"[a-z][a-z0-9_]{0,31}")
# A printed line: one const definition of fp32 arithmetic over identifiers,
# literals, + - * / ( ) ? : , and a few libm calls. Nothing else may reach the source.
_LINE = re.compile(r"const (float|bool) ([a-z][a-z0-9_]*) = ([A-Za-z0-9_ .+\-*/()?:,<>=!&|]+);")
_CALLS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_ALLOWED_CALLS = {"expf", "exp2f", "__fdividef", "floorf", "fmaf", "fmaxf", "fminf", "logf", "log1pf", "expm1f", "sqrtf",
                  "fabsf"}


def _check_ident(name: str, what: str) -> str:
    if not _IDENT.fullmatch(name) or name.startswith(("cse", "o_", "f_", "gs_", "p_")):
        raise ValueError(f"{what}: {name!r} is not a valid block variable name")
    return name


def _check_lines(block_name: str, lines: list[str]) -> list[str]:
    for line in lines:
        m = _LINE.fullmatch(line)
        if not m:
            raise ValueError(f"block {block_name}: unexpected printed line {line!r}")
        for fn in _CALLS.findall(m.group(3)):
            if fn not in _ALLOWED_CALLS:
                raise ValueError(f"block {block_name}: printed line calls {fn!r}, not an allowed libm function")
    return lines


def _arg(name: str, block_name: str, output: bool) -> str:
    """The template expression a block variable binds to."""
    if output:
        m = _INDEXED_OUT.fullmatch(name)
        if m:
            return f"f_{m.group(1)}[{int(m.group(2))}]"
        if name in _OUT_MAP[block_name]:
            return _OUT_MAP[block_name][name]
    else:
        m = _INDEXED_IN.fullmatch(name)
        if m:
            return f"f_{m.group(1)}[{int(m.group(2))}]"
        if name in _IN_MAP:
            return _IN_MAP[name]
    raise ValueError(f"block {block_name}: the CUDA templates have no variable for {'output' if output else 'input'} "
                     f"{name!r} (lowering contract)")


def _math_block(name: str, block: CodeBlock) -> dict:
    """A device function for one printed block and the call that binds it to the template's locals."""
    from ..lower import print_block

    used = [_check_ident(v, f"block {name} input") for v in block.used_inputs]
    outs = [_check_ident(v, f"block {name} output") for v in block.outputs]
    params = [f"const {'bool' if re.fullmatch(r'e[0-9]', v) else 'float'} {v}" for v in used]
    params += [f"float& o_{o}" for o in outs]
    call = [_arg(v, name, False) for v in used] + [_arg(o, name, True) for o in outs]
    return {
        "name": name,
        "inputs": list(block.inputs),
        "outputs": outs,
        "signature": ", ".join(params),
        "lines": _check_lines(name, print_block(block, "cuda")),
        "call": ", ".join(call),
    }


def _w_used(block: CodeBlock, k: int) -> list[bool]:
    used = set(block.used_inputs)
    return [f"w{c}" in used for c in range(k)]


def _cbool(v: object) -> str:
    if not isinstance(v, bool):
        raise TypeError(f"expected a bool, got {v!r}")
    return "true" if v else "false"


@lru_cache(maxsize=None)
def _env():
    from .templates import environment

    env = environment().overlay()
    env.filters["cbool"] = _cbool
    return env


def check_block_contract(ir) -> None:
    """The printed blocks have the outputs the templates bind (gspngen/lower contract); every renderer checks."""
    want = {"gu": ir.modulation, "gs": ir.skip, "gmd": ir.merge == "learned"}
    outs = set(ir.adjoint_output.outputs)
    for name, used in want.items():
        if (name in outs) != used:
            raise ValueError(f"adjoint_output block: output {name} {'missing' if used else 'unexpected'}")
    if not {"gh", "gx"} <= outs or set(ir.forward.outputs) != {"h"} or set(ir.output.outputs) != {"y"}:
        raise ValueError("printed blocks do not have the contract's outputs")


def render_context(spec: Spec, dtype: str) -> dict:
    """Everything the CUDA templates read, for one spec and storage dtype."""
    from ..lower import lower

    if dtype not in STORE_KIND:
        raise ValueError(f"dtype: expected one of {', '.join(STORE_KIND)}, got {dtype!r}")
    ir = lower(spec)
    blocks = {n: _math_block(n, b) for n, b in ir.blocks.items()}
    check_block_contract(ir)
    adj_used = set(ir.adjoint.used_inputs)
    dirs = [{"index": int(d.index), "rev": bool(d.reverse), "step_w": d.step_axis == "W"} for d in ir.directions]
    params = {k: ", ".join(f"{C_TYPES[kind]} {name}" for kind, name in v) for k, v in PARAMS.items()}
    args = {k: ", ".join(name for _, name in v) for k, v in PARAMS.items()}
    # the arguments before the per-direction tail (d, rev, stepw, acc), which the one-launch entries replace
    args.update({f"{k}_head": ", ".join(name for _, name in PARAMS[k][:-4]) for k in ("fwd", "bwd")})
    return {
        "version": __version__,
        "dtype": dtype,
        "store_kind": STORE_KIND[dtype],
        "k": int(ir.k),
        "r": int(ir.r),
        "num_directions": len(ir.directions),
        "dirs": dirs,
        "nhwc": ir.layout == "nhwc",
        "modulation": bool(ir.modulation),
        "skip": bool(ir.skip),
        "learned": ir.merge == "learned",
        "stack": ir.merge == "stack",
        "weight_per_channel": spec.weight_groups == "channel",
        "bwd_needs_h": "h" in ir.adjoint_output.used_inputs,
        "bwd_needs_hp": any(f"hp{c}" in adj_used for c in range(ir.k)),
        "w_used_fwd": _w_used(ir.forward, ir.k),
        "w_used_bwd": _w_used(ir.adjoint, ir.k),
        "math": [blocks[n] for n in ("forward", "output", "adjoint", "adjoint_output")],
        "calls": {n: b["call"] for n, b in blocks.items()},
        "params": params,
        "args": args,
    }


@lru_cache(maxsize=64)
def render_source(spec: Spec, dtype: str) -> str:
    """The CUDA C++ source of every kernel of ``spec`` for one storage dtype (deterministic)."""
    return _env().get_template("cuda/gspn.cu.j2").render(**render_context(spec, dtype))


def file_name(dtype: str) -> str:
    return f"gspn_{dtype}.cu"


def kernel_source(spec: Spec, dtype: str) -> str:
    """The source the backends build: a loaded compiled package's file, else rendered now."""
    from ..runtime import sources

    return sources.source(spec, file_name(dtype), lambda: render_source(spec, dtype))


def host_facts(spec: Spec) -> dict:
    """What the host's planning needs from the lowering (shared memory, register estimates).

    ``gspngen compile`` stores these in the manifest so a compiled package plans launches
    without sympy; without a package they are derived here.
    """
    from ..runtime import sources

    return sources.facts(spec, "cuda", lambda: _derive_host_facts(spec))


def manifest_facts(spec: Spec) -> dict:
    """The host facts ``gspngen compile`` writes into the manifest (see :func:`host_facts`)."""
    return _derive_host_facts(spec)


def _derive_host_facts(spec: Spec) -> dict:
    from ..lower import lower

    ir = lower(spec)
    return {
        "w_used_fwd": _w_used(ir.forward, ir.k),
        "w_used_bwd": _w_used(ir.adjoint, ir.k),
        "bwd_needs_h": "h" in ir.adjoint_output.used_inputs,
        "bwd_needs_hp": any(f"hp{c}" in ir.adjoint.used_inputs for c in range(ir.k)),
    }


def render_files(spec: Spec) -> dict[str, str]:
    """Files for ``gspngen compile``: one .cu per storage dtype of the spec."""
    return {file_name(dt): render_source(spec, dt) for dt in spec.precision}


# ---------------------------------------------------------------------------
# Tunings and instantiation names
# ---------------------------------------------------------------------------

def thread_map(spec: Spec, direction: str) -> int:
    """LANES, STEPS or CHAN: which axis a thread's vector runs along (see the fused template)."""
    if spec.layout == "nhwc":
        return CHAN
    return STEPS if DIRECTION_TABLE[direction].step_axis == "W" else LANES


@dataclass(frozen=True)
class KernelConfig:
    """One tuning of a fused kernel: the template parameters the host chooses.

    lane_threads (LT) x chan_threads (CT) threads per block; each thread owns
    ``vec`` (V) elements per segment along the contiguous axis and ``nseg``
    segments of lanes; loads run ``prefetch`` - 1 tiles ahead; ``bufs`` line
    buffers (2: one barrier per step, 1: half the shared memory, two barriers).
    ``stage`` (steps mapping, forward): sector tiles of 2 x ``vec`` steps loaded
    and stored in whole 32-byte sectors through shared memory (see the fused
    template); costs :func:`stage_bytes` of shared memory.
    ``cluster`` (lanes and steps mappings, sm_90+): the line split over that many blocks of a thread block
    cluster, exchanging their edge lanes through distributed shared memory each step; the other fields then
    describe one block's share of the line (see :func:`cluster_config`).
    ``ring`` (lanes and steps mappings, prefetch >= 2, sm_80+): the prefetch ring in shared memory, filled
    by cp.async, instead of registers: ``prefetch`` - 1 tiles in flight for the registers of one
    (:func:`ring_bytes` of shared memory). It needs whole-vector runs; with unaligned tensors the host
    launches the same tuning without it.
    """

    lane_threads: int
    chan_threads: int
    vec: int
    nseg: int
    prefetch: int = 2
    bufs: int = 2
    stage: bool = False
    cluster: int = 1
    ring: bool = False

    @property
    def threads(self) -> int:
        return self.lane_threads * self.chan_threads

    def check(self, mapping: int) -> None:
        lt, ct, v = self.lane_threads, self.chan_threads, self.vec
        ok = (1 <= v <= 16 and v & (v - 1) == 0 and self.nseg >= 1 and 1 <= self.prefetch <= 4
              and self.bufs in (1, 2) and lt >= 1 and ct >= 1 and self.threads <= 1024
              and (self.threads % 32 == 0 or (self.cluster > 1 and self.threads == SUBWARP_THREADS)))
        if ok and mapping != CHAN:
            ok = (lt % 32 == 0) if lt >= 32 else (32 % lt == 0)
        if ok and self.stage:
            ok = mapping == STEPS and v <= 8
        if ok and self.ring:
            ok = mapping != CHAN and not self.stage and self.prefetch >= 2 and v >= 2
        if ok and self.cluster != 1:
            ok = (2 <= self.cluster <= MAX_CLUSTER and mapping != CHAN and not self.stage
                  and self.nseg * self.lanes_per_segment(mapping) >= MAX_RADIUS)
        if not ok:
            raise ValueError(f"invalid CUDA kernel config {self} for the {MAP_NAMES[mapping]} mapping")

    def tile_elements(self, mapping: int) -> int:
        """Elements one thread computes per tile and tensor (GsBlock::E): segments x vector, x 2 with sector tiles."""
        return self.nseg * self.vec * (2 if self.stage and mapping == STEPS else 1)

    def lanes_per_segment(self, mapping: int) -> int:
        return self.lane_threads * (self.vec if mapping == LANES else 1)

    def lanes_covered(self, mapping: int) -> int:
        """Lanes of one line the launch covers: a block's segments, times the blocks of a cluster."""
        return self.nseg * self.lanes_per_segment(mapping) * self.cluster

    def channels_per_block(self, mapping: int) -> int:
        return self.chan_threads * (self.vec if mapping == CHAN else 1)

    def plane_floats(self, mapping: int, r: int) -> int:
        """Floats of one on-chip line buffer (must match GsBlock::PLANE)."""
        padc = -(-r // self.vec) if mapping == LANES else r
        cols = self.nseg * self.lane_threads + 2 * padc
        rows = self.chan_threads * (1 if mapping == STEPS else self.vec)
        return rows * cols


def _b(v: bool) -> str:
    return "true" if v else "false"


def fused_name(kind: str, mapping: int, reverse: bool, cfg: KernelConfig, vec_ok: bool, watom: bool = False,
               save_h: bool = True) -> str:
    """NVRTC name expression of a fused kernel instantiation.

    One instantiation serves every direction with the same thread mapping
    (the direction, its step order and step axis and whether it accumulates
    are run-time arguments), except that the steps mapping compiles its step
    order in: its tile walk is unrolled over registers. ``save_h`` (forward):
    whether the kernel stores h for the backward (False: no h store at all).
    """
    revt = bool(reverse) and mapping == STEPS
    head = (f"{mapping}, {_b(revt)}, {cfg.lane_threads}, {cfg.chan_threads}, {cfg.vec}, {cfg.nseg}, "
            f"{cfg.prefetch}, {cfg.bufs}, {_b(vec_ok)}")
    ring = ", true" if cfg.ring else ""  # a defaulted template argument: named only when on
    if cfg.cluster > 1:  # the cluster entries: no sector tiles, the cluster size last
        if kind not in ("fwd", "bwd"):
            raise ValueError(f"kind: expected fwd or bwd, got {kind!r}")
        flag = save_h if kind == "fwd" else watom
        return f"gspn_{kind}_cl<{head}, {_b(flag)}, {cfg.cluster}{ring}>"
    head += f", {_b(cfg.stage and mapping == STEPS)}"
    if kind == "fwd":
        return f"gspn_fwd<{head}, {_b(save_h)}{ring}>"
    if kind == "bwd":
        return f"gspn_bwd<{head}, {_b(watom)}{ring}>"
    raise ValueError(f"kind: expected fwd or bwd, got {kind!r}")


def pass_struct(kind: str, mapping: int, reverse: bool, cfg: KernelConfig, vec_ok: bool, flag: bool) -> str:
    """The GsForward / GsBackward type of one direction's tuning (the template's per-pass struct); ``flag``:
    save_h (forward) or watom (backward)."""
    revt = bool(reverse) and mapping == STEPS
    head = (f"{mapping}, {_b(revt)}, {cfg.lane_threads}, {cfg.chan_threads}, {cfg.vec}, {cfg.nseg}, "
            f"{cfg.prefetch}, {cfg.bufs}, {_b(vec_ok)}")
    if kind == "fwd":
        return f"GsForward<{head}, {_b(cfg.stage and mapping == STEPS)}, {_b(flag)}, {cfg.cluster}, {_b(cfg.ring)}>"
    if kind == "bwd":
        if cfg.stage:
            raise ValueError(f"config {cfg}: sector tiles (stage) serve the forward only")
        return f"GsBackward<{head}, {_b(flag)}, {cfg.cluster}, {_b(cfg.ring)}>"
    raise ValueError(f"kind: expected fwd or bwd, got {kind!r}")


def one_launch_name(kind: str, parts: list[tuple[int, bool, KernelConfig, bool]], flag: bool) -> str:
    """NVRTC name expression of the one-launch entry (ml=1) running every direction of a pass: ``parts``
    holds each direction's (mapping, reverse, tuning, vec_ok), in direction order. The tunings must share
    their threads per block and cluster size (the template asserts it; the host checks it first)."""
    structs = ", ".join(pass_struct(kind, m, r, c, v, flag) for m, r, c, v in parts)
    cl = parts[0][2].cluster
    return f"gspn_{kind}_ml_cl<{cl}, {structs}>" if cl > 1 else f"gspn_{kind}_ml<{structs}>"


@dataclass(frozen=True)
class OnChipPlan:
    """The on-chip forward (gspn_fwd_oc, oc=1): one block per (n, channel) plane runs every direction with
    y in shared memory. ``lanes``/``steps``: the tunings of tb/bt and lr/rl, the same threads."""

    lanes: KernelConfig
    steps: KernelConfig
    vec_lanes: bool
    vec_steps: bool
    smem: int
    threads: int

    def name(self, save_h: bool = True) -> str:
        a, b = self.lanes, self.steps
        return (f"gspn_fwd_oc<{self.threads}, {a.vec}, {a.nseg}, {b.vec}, {b.nseg}, {a.prefetch}, "
                f"{_b(self.vec_lanes)}, {_b(self.vec_steps)}, {_b(save_h)}>")


OC_MAX_THREADS = 256


def onchip_plan(spec: Spec, dtype: str, H: int, W: int, smem_limit: int = 227 * 1024) -> OnChipPlan | None:
    """The on-chip forward's tunings and shared memory for H x W planes, or None where it does not apply
    (nhwc, stack merge, one direction) or the plane does not fit ``smem_limit`` beside the line buffers.

    Threads: lines along W (tb/bt) and along H (lr/rl) share one block of NT threads, the smallest
    multiple of 32 covering the longer of W / min(v, 4) and H lanes, at most OC_MAX_THREADS (longer lines take
    segments); v: 16-byte vectors (4 fp32 or 8 16-bit elements along the contiguous axis), narrowed
    while W is not a multiple of it, and for tb/bt further while it would leave threads without lanes.
    Prefetch 2, two line buffers (as the launch-per-direction default). Only lines one block covers in one
    segment (H and W / v up to OC_MAX_THREADS), where the registers fit.

    Known cost, not measured: lr/rl keep y in shared memory with the image's row stride, so a warp's y
    accesses (one row per thread) fall on the same banks (32-way conflicts at W = 128 in fp32); padding
    the rows would need the y pointer to stop being the global one moved onto the plane."""
    if spec.layout != "nchw" or spec.merge == "stack" or spec.num_directions < 2:
        return None
    es = ELEM_BYTES[dtype]
    v = 16 // es
    while v > 1 and W % v:
        v //= 2
    nt = min(OC_MAX_THREADS, max(32, -(-max(-(-W // min(v, 4)), H) // 32) * 32))
    # tb/bt: at most 4 lanes a thread (8 16-bit lanes on 256 threads spilled: bf16 4 x 2048, sm_80, 140
    # bytes), and no wider than keeps every thread busy (one 128-lane line on 128 threads: scalars)
    vl = min(v, 4)
    while vl > 1 and W // vl < nt:
        vl //= 2
    lanes = KernelConfig(nt, 1, vl, -(-(-(-W // vl)) // nt), 2, 2)
    steps = KernelConfig(nt, 1, v, -(-H // nt), 2, 2)
    lanes.check(LANES)
    steps.check(STEPS)
    # One segment per line and thread, and a predicted register count within the budget: with segments
    # (lines beyond OC_MAX_THREADS lanes, or tb/bt lines beyond that many vectors) the kernel spilled
    # (sm_90, NVRTC: 144 bytes to 5.4 KB per thread at 300 x 8, 1000 x 8, 4 x 2048, 2 x 4096).
    if lanes.nseg > 1 or steps.nseg > 1:
        return None
    if max(predicted_registers(spec, "fwd", lanes, LANES), predicted_registers(spec, "fwd", steps, STEPS)) \
            > register_cap(nt):
        return None
    line = max(smem_bytes(spec, "fwd", LANES, lanes, es), smem_bytes(spec, "fwd", STEPS, steps, es))
    smem = -(-line // 16) * 16 + -(-(H * W * es) // 16) * 16
    if smem > smem_limit:
        return None
    return OnChipPlan(lanes, steps, vl > 1, v > 1, smem, nt)


PS_THREADS = 256  # per-step kernels: GSPN-1 used 512; 256 keeps more blocks per SM


TR_THREADS = 256
TR_SMEM = 32 * 33 * 4


def transpose_name(acc: bool) -> str:
    """NVRTC name expression of the plane transpose (templates/cuda/transpose.cuh.j2)."""
    return f"gspn_tr<{_b(acc)}>"


def per_step_names(watom: bool) -> dict[str, str]:
    return {
        "ps_fwd": f"gspn_ps_fwd<{PS_THREADS}>",
        "ps_merge": f"gspn_ps_merge<{PS_THREADS}>",
        "ps_bwd_out": f"gspn_ps_bwd_out<{PS_THREADS}>",
        "ps_bwd_step": f"gspn_ps_bwd_step<{PS_THREADS}, {_b(watom)}>",
    }


def stage_streams(spec: Spec, kind: str) -> int:
    """Tensors a sector tile stages (GsForward::NSTR): x, lam, u, s, y and the used weights."""
    if kind != "fwd":
        raise ValueError("sector tiles: forward only")
    return 3 + spec.modulation + spec.skip + sum(host_facts(spec)["w_used_fwd"])


def stage_bytes(spec: Spec, dtype_bytes: int, kind: str, mapping: int, cfg: KernelConfig) -> int:
    """Shared memory of a sector tile (GsForward::STG_FLOATS x 4): streams x 2V steps x padded row."""
    if not (cfg.stage and mapping == STEPS):
        return 0
    sp = cfg.nseg * cfg.threads + 4
    return -(-(stage_streams(spec, kind) * 2 * cfg.vec * sp * dtype_bytes) // 16) * 16


def ring_streams(spec: Spec, kind: str, mapping: int) -> int:
    """Tensors the cp.async ring holds (GsForward / GsBackward::NRS). Forward: x, lam, u, s, y and the used
    weights; backward: gy, x, lam, u, s, the gx so far, the used weights and, in the lanes mapping, h(t-2)."""
    facts = host_facts(spec)
    if kind == "fwd":
        return stage_streams(spec, "fwd")
    need_h = facts["bwd_needs_h"] or facts["bwd_needs_hp"]
    return 4 + spec.modulation + spec.skip + sum(facts["w_used_bwd"]) + (need_h and mapping == LANES)


def ring_bytes(spec: Spec, dtype_bytes: int, cfg: KernelConfig, kind: str = "fwd", mapping: int = LANES) -> int:
    """Shared memory of the cp.async ring (RING_FLOATS x 4 in the template): prefetch slots x streams x
    segments x threads x vector, in storage elements, rounded up to 16 bytes."""
    if not cfg.ring:
        return 0
    n = cfg.prefetch * ring_streams(spec, kind, mapping) * cfg.nseg * cfg.threads * cfg.vec * dtype_bytes
    return -(-n // 16) * 16


def smem_bytes(spec: Spec, kind: str, mapping: int, cfg: KernelConfig, dtype_bytes: int = 4) -> int:
    """Dynamic shared memory of a fused kernel (must match SMEM_FLOATS in the template); ``dtype_bytes``:
    the storage element size (sector tiles and the cp.async ring hold storage elements)."""
    facts = host_facts(spec)
    plane = cfg.plane_floats(mapping, spec.radius)
    if kind == "fwd":
        if cfg.ring:  # after the line buffers, 16-byte aligned
            return 4 * (-(-(cfg.bufs * plane) // 4) * 4) + ring_bytes(spec, dtype_bytes, cfg)
        return 4 * cfg.bufs * plane + stage_bytes(spec, dtype_bytes, kind, mapping, cfg)
    needs_h = facts["bwd_needs_h"] or facts["bwd_needs_hp"]
    floats = (2 * plane if needs_h else 0) + cfg.bufs * spec.connection * plane + (32 if spec.merge == "learned" else 0)
    if cfg.ring:  # after the buffers and the block sum's floats, 16-byte aligned
        return 4 * (-(-floats // 4) * 4) + ring_bytes(spec, dtype_bytes, cfg, kind, mapping)
    return 4 * floats


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _streams(spec: Spec, kind: str, acc: bool = True) -> tuple[int, int]:
    """(input, output) tensors a fused kernel streams per element (register-budget estimate)."""
    facts = host_facts(spec)
    if kind == "fwd":
        nw = sum(facts["w_used_fwd"])
        return 2 + nw + spec.modulation + spec.skip + acc, 1
    nw = sum(facts["w_used_bwd"])
    return 4 + nw + spec.modulation + spec.skip + acc, 2 + spec.connection + spec.modulation + spec.skip


def _tile_words(spec: Spec, kind: str, cfg: KernelConfig, mapping: int) -> int:
    """Values a thread keeps in flight: P input tiles, one output tile, one step's ghp (backward).
    16-bit values count as whole registers: the compiler unpacks them at the load."""
    nin, nout = _streams(spec, kind)
    e = cfg.nseg * cfg.vec
    words = (1 if cfg.ring else cfg.prefetch) * e * nin + e * nout  # the ring keeps one tile in registers
    if kind == "bwd":
        words += cfg.nseg * (1 if mapping == STEPS else cfg.vec) * (spec.connection + 1)
    return words


def predicted_registers(spec: Spec, kind: str, cfg: KernelConfig, mapping: int) -> float:
    """Registers per thread, fitted to ptxas reports (sm_90, fp32 and bf16, 2 mappings, 48 tunings)
    plus a margin above the worst under-prediction seen."""
    w = _tile_words(spec, kind, cfg, mapping)
    if kind == "fwd":
        return w + 6 * cfg.nseg + 42 + 16
    return 0.6 * w + 7 * cfg.nseg + 54 + 30


def register_cap(threads: int) -> int:
    """Registers a thread may use when the whole block must fit one SM's 64K registers."""
    return min(255, 65536 // threads)


def default_config(spec: Spec, dtype: str, direction: str, kind: str, C: int, H: int, W: int,
                   smem_limit: int = 227 * 1024) -> KernelConfig:
    """The documented default tuning for one direction of one pass.

    - Vectors of 16 bytes along the contiguous axis (4 fp32 or 8 16-bit
      elements); for ``chan`` the largest power of two <= that dividing C.
    - lanes/steps: one line per 32..512 threads (LT), short lines packed
      several per block (CT lines) to reach 128 threads; a longer line uses
      segments. chan: CT (8..1) channel vectors x LT lanes, at most 512 threads.
    - prefetch 2 (one tile in flight while one is consumed).
    - two line buffers (one barrier per step).
    - no sector tiles (``stage``): the static model counts +25-35% SASS
      instructions per element for them (scalar shared-memory exchange) and
      they do not fit lines of ~700+ lanes; they are a tuning candidate
      (:func:`candidate_configs`) until a GPU measurement says otherwise.
    The first tuning in order (widest vector, deepest prefetch, for chan the
    most channel threads, 512 then 256 threads, two then one buffer) whose predicted registers fit the register
    file and whose shared memory fits the GPU; else the one with the fewest
    predicted registers.
    """
    mapping = thread_map(spec, direction)
    L = H if DIRECTION_TABLE[direction].step_axis == "W" else W
    v16 = 16 // ELEM_BYTES[dtype]
    if mapping == CHAN:
        v = v16
        while v > 1 and C % v:
            v //= 2
        vecs = [v >> i for i in range(v.bit_length()) if v >> i >= 1]
    else:
        vecs = [v16 >> i for i in range(v16.bit_length()) if v16 >> i >= 1]
    fallback, least = None, None
    es = ELEM_BYTES[dtype]
    for v in vecs:
        # chan: channel threads per block, most first (wider coalesced runs per pixel)
        cts = [ct for ct in (8, 4, 2, 1) if ct <= _pow2_ceil(-(-C // v))] if mapping == CHAN else [None]
        for p, ct, max_threads, bufs in itertools.product((2, 1), cts, (512, 256), (2, 1)):
            cfg = _shape_config(mapping, L, C, v, p, bufs, max_threads, ct)
            if smem_bytes(spec, kind, mapping, cfg, es) > smem_limit:
                continue
            over = predicted_registers(spec, kind, cfg, mapping) - register_cap(cfg.threads)
            if over <= 0:
                return cfg
            if least is None or over < least:
                fallback, least = cfg, over
    if fallback is None:
        # Even one line buffer of the narrowest tiling does not fit: the line is too long.
        raise ValueError(f"x: an image line of {L} lanes needs more shared memory than the GPU offers "
                         f"({smem_limit} bytes) for the cuda backend; use backend='triton' or 'reference'")
    return fallback


def _shape_config(mapping: int, L: int, C: int, v: int, p: int, bufs: int, max_threads: int = 512,
                  chan_threads: int | None = None) -> KernelConfig:
    """Threads and segments for a line of L lanes (see default_config)."""
    if mapping == CHAN:
        ct = chan_threads or min(_pow2_ceil(-(-C // v)), 8)
        step = max(1, 32 // ct)  # LT granularity keeping threads a multiple of 32
        max_lt = max(step, max_threads // ct)
        nseg = -(-L // max_lt)
        lt = -(-(-(-L // nseg)) // step) * step
        return KernelConfig(lt, ct, v, nseg, p, bufs)
    groups = -(-L // v) if mapping == LANES else L
    if groups <= 32:
        lt = _pow2_ceil(groups)
        ct = max(32 // lt, min(128 // lt, _pow2_ceil(C)))
        return KernelConfig(lt, ct, v, 1, p, bufs)
    nseg = -(-groups // max_threads)
    lt = -(-(-(-groups // nseg)) // 32) * 32
    return KernelConfig(lt, 1, v, nseg, p, bufs)


def candidate_configs(spec: Spec, dtype: str, direction: str, kind: str, C: int, H: int, W: int,
                      smem_limit: int = 227 * 1024) -> list[KernelConfig]:
    """Tunings an autotuner may time for one direction and pass; the default comes first.

    Variations: prefetch depth 1..3, vector width halved (and, where the default has no tile in flight,
    halved with a prefetch of 2), one line buffer, sector tiles (lr/rl forward), the cp.async ring in shared
    memory (2 and 3 slots, and where the default has no tile in flight, 2 slots of half-width vectors),
    and for nchw lines twice the channels (short lines) or half the threads
    with twice the segments (long lines). Each is valid, fits shared memory
    and is predicted to fit the register file.
    """
    base = default_config(spec, dtype, direction, kind, C, H, W, smem_limit)
    mapping = thread_map(spec, direction)
    out = [base]
    L = H if DIRECTION_TABLE[direction].step_axis == "W" else W

    def add(cfg: KernelConfig) -> None:
        try:
            cfg.check(mapping)
        except ValueError:
            return
        fits = (smem_bytes(spec, kind, mapping, cfg, ELEM_BYTES[dtype]) <= smem_limit
                and predicted_registers(spec, kind, cfg, mapping) <= register_cap(cfg.threads))
        if cfg not in out and fits:
            out.append(cfg)

    for p in (1, 2, 3):
        add(_replace(base, prefetch=p))
    add(_replace(base, bufs=1))
    if mapping == STEPS and kind == "fwd" and base.vec * ELEM_BYTES[dtype] == 16:
        add(_replace(base, stage=True))  # sector tiles, where their shared memory fits
    if mapping != CHAN and base.vec * ELEM_BYTES[dtype] >= 4:
        # the prefetch ring in shared memory (cp.async): tiles in flight without their registers
        for p in (2, 3):
            add(_replace(base, ring=True, prefetch=p))
        if base.prefetch == 1 and base.vec > 1:  # where registers leave no tile in flight: half the ring's size
            add(_replace(_shape_config(mapping, L, C, base.vec // 2, 2, base.bufs), ring=True))
    if base.vec > 1:
        add(_shape_config(mapping, L, C, base.vec // 2, base.prefetch, base.bufs))
        if base.prefetch == 1:
            # Long lines leave room for one register tile only; half-width vectors buy a tile in flight
            # (a load ahead of the arithmetic) at the cost of narrower loads: which wins is measured.
            for threads in (512, 256):
                add(_shape_config(mapping, L, C, base.vec // 2, 2, base.bufs, threads))
    if mapping != CHAN:
        if base.lane_threads <= 32:
            add(_replace(base, chan_threads=base.chan_threads * 2))
        elif base.lane_threads >= 64:
            lt = -(-(base.lane_threads // 2) // 32) * 32
            nseg = -(-(-(-L // (base.vec if mapping == LANES else 1))) // lt)
            add(_replace(base, lane_threads=lt, nseg=nseg))
    return out


CLUSTER_SIZES = (2, 4, 8)  # the cl=N keys: at most N blocks per line
SUBWARP_THREADS = 16  # cl=N: a block of one partial warp owns a share of 16 lanes (short lines, 128 and under)
MAX_CLUSTER = 8  # the portable cluster size limit (16 needs an opt-in the runtime does not make)
MAX_RADIUS = (MAX_CONNECTION - 1) // 2  # lanes a block of a cluster owns at least: the largest radius


def cluster_config(spec: Spec, dtype: str, direction: str, kind: str, C: int, H: int, W: int, cluster: int,
                   smem_limit: int = 227 * 1024) -> KernelConfig | None:
    """The tuning of ``cl=<cluster>``: a line of L lanes split over at most ``cluster`` blocks of a thread
    block cluster, each block owning a share of about L / cluster lanes of one channel (no channels packed
    into a block: the point is more blocks). As :func:`default_config` (the first that fits of prefetch 2
    then 1, 512 then 256 threads, two then one line buffer), with the widest vector that still gives a
    block at least 32 threads (tb/bt: a thread owns vec lanes). Blocks are whole warps, so a share rounds
    up and the cluster is the blocks that covers the line: 130 lanes under cl=4 are 3 blocks of 64 (in
    fp32 lr). A share of 16 lanes or fewer (a line of at most 8 x 16 = 128 lanes under cl=8, 64 under cl=4)
    is one block of 16 threads, one partial warp, owning 16 lanes (tb/bt: scalar lanes): a 128 x 128 image
    of 16 channels then has 128 blocks per direction, where whole warps would give 64. None where it does
    not apply: nhwc, a key other than 2, 4 or 8, a line of fewer than 32 lanes, or a line one block covers."""
    mapping = thread_map(spec, direction)
    if mapping == CHAN or cluster not in CLUSTER_SIZES:
        return None
    L = H if DIRECTION_TABLE[direction].step_axis == "W" else W
    share = -(-L // cluster)
    v16 = 16 // ELEM_BYTES[dtype]
    vecs = [v16 >> i for i in range(v16.bit_length()) if v16 >> i >= 1]
    sub = share <= SUBWARP_THREADS  # one partial warp per block
    if mapping == LANES:  # a block of 32 threads at least (shares of 17 to 31 lanes: 32 scalar lanes)
        vecs = [1] if sub else [v for v in vecs if max(share, 32) >= 32 * v]
    if L < 32 or not vecs:
        return None
    for p, max_threads, bufs in itertools.product((2, 1), (512, 256), (2, 1)):
        cfg = (KernelConfig(SUBWARP_THREADS, 1, vecs[0], 1, p, bufs) if sub
               else _shape_config(mapping, max(share, 32), 1, vecs[0], p, bufs, max_threads))
        lpb = cfg.nseg * cfg.lanes_per_segment(mapping)
        cfg = _replace(cfg, cluster=-(-L // lpb))  # the blocks the line needs (<= cluster)
        if cfg.cluster < 2:
            return None
        if (smem_bytes(spec, kind, mapping, cfg, ELEM_BYTES[dtype]) <= smem_limit
                and predicted_registers(spec, kind, cfg, mapping) <= register_cap(cfg.threads)):
            cfg.check(mapping)
            return cfg
    return None


def _chunks(spec: Spec, direction: str, H: int, W: int) -> int:
    """Chunks of one scan of the direction (1: a global scan)."""
    T = W if DIRECTION_TABLE[direction].step_axis == "W" else H
    K = spec.chunk if spec.chunk is not None and spec.chunk < T else T
    return -(-T // K)


def _blocks_per_range(spec: Spec, direction: str, N: int, C: int, cfg: KernelConfig) -> int:
    """Blocks sharing one step range: a cluster's blocks for each (n, channel tile)."""
    return N * -(-C // cfg.channels_per_block(thread_map(spec, direction))) * cfg.cluster


def direction_blocks(spec: Spec, direction: str, N: int, C: int, H: int, W: int, cfg: KernelConfig,
                     cpb: int) -> int:
    """Blocks of one direction's launch (or range of a one-launch grid: gs_dir_blocks in the template)."""
    return _blocks_per_range(spec, direction, N, C, cfg) * -(-_chunks(spec, direction, H, W) // cpb)


def _cpb_for(nck: int, base: int, sm_count: int) -> int:
    """Chunks per block so that base x step ranges fill about 4 blocks per SM when chunks allow, and the
    grid stays under 2^31 blocks."""
    target = 4 * max(1, sm_count)
    cpb = nck if base >= target else max(1, math.ceil(nck * base / target))
    while base * -(-nck // cpb) > 2**31 - 1 and cpb < nck:
        cpb = min(nck, cpb * 2)
    if base * -(-nck // cpb) > 2**31 - 1:
        raise ValueError(f"x: too large for one launch of the cuda backend ({base} blocks per step range)")
    return cpb


def _tunings(spec: Spec, dtype: str, direction: str, kind: str, C: int, H: int, W: int, cluster: int,
             smem_limit: int):
    """The tunings of one direction a one-launch plan may choose from, in the order of preference of
    :func:`default_config` (cluster 1) or :func:`cluster_config` (vector, prefetch, threads, buffers), with
    every thread count the shapes allow (short lines: channels per block; long ones: segments), each valid
    and predicted to fit shared memory and the register file. Duplicates removed."""
    mapping = thread_map(spec, direction)
    L = H if DIRECTION_TABLE[direction].step_axis == "W" else W
    v16 = 16 // ELEM_BYTES[dtype]
    vecs = [v16 >> i for i in range(v16.bit_length()) if v16 >> i >= 1]
    if mapping == CHAN:
        vecs = [v for v in vecs if C % v == 0] or [1]
    sub = False  # cl=N: blocks of one partial warp (16 lanes)
    if cluster > 1:
        if mapping == CHAN:
            return
        share = -(-L // cluster)
        sub = share <= SUBWARP_THREADS
        if sub:
            vecs = [1] if mapping == LANES else vecs[:1]
        elif mapping == LANES:
            vecs = [v for v in vecs if max(share, 32) >= 32 * v]
        L = max(share, 32)
        if not vecs or L < 32:
            return
    seen = set()
    for v, p, bufs in itertools.product(vecs, (2, 1), (2, 1)):
        groups = -(-L // v) if mapping == LANES else L
        if sub:
            shapes = [KernelConfig(SUBWARP_THREADS, 1, v, 1, p, bufs)]
        elif mapping == CHAN:
            shapes = [_shape_config(mapping, L, C, v, p, bufs, mt, ct) for ct in (8, 4, 2, 1)
                      if ct <= _pow2_ceil(-(-C // v)) for mt in (512, 256, 128, 64, 32)]
        elif groups <= 32 and cluster == 1:  # short lines: channels packed, 32 to 128 threads
            lt = _pow2_ceil(groups)
            # no more channel threads than whole warps or the channels need (the default's rule)
            shapes = [KernelConfig(lt, ct, v, 1, p, bufs) for ct in (4, 2, 1, 8, 16, 32)
                      if (32 <= lt * ct <= 128 or (ct == 1 and lt >= 32)) and ct <= max(32 // lt, _pow2_ceil(C))]
        else:
            shapes = [_shape_config(mapping, L, 1 if cluster > 1 else C, v, p, bufs, mt)
                      for mt in (512, 256, 128, 64, 32)]
        for cfg in shapes:
            if cluster > 1:
                cfg = _replace(cfg, cluster=-(-(H if DIRECTION_TABLE[direction].step_axis == "W" else W)
                                               // (cfg.nseg * cfg.lanes_per_segment(mapping))))
                if cfg.cluster < 2 or cfg.cluster > cluster:
                    continue
            try:
                cfg.check(mapping)
            except ValueError:
                continue
            if cfg in seen:
                continue
            seen.add(cfg)
            if (smem_bytes(spec, kind, mapping, cfg, ELEM_BYTES[dtype]) <= smem_limit
                    and predicted_registers(spec, kind, cfg, mapping) <= register_cap(cfg.threads)):
                yield cfg


@lru_cache(maxsize=256)
def one_launch_configs(spec: Spec, dtype: str, kind: str, C: int, H: int, W: int, cluster: int = 1,
                       smem_limit: int = 227 * 1024) -> dict[str, KernelConfig] | None:
    """The tunings of ml=1 (every direction in one launch): per direction, one with the same threads per
    block and cluster size as the others. Of the thread counts every direction can take, the one whose
    tunings sit earliest in the directions' orders of preference (:func:`_tunings`: the default first);
    None where the directions share none (or, under cl=N, a direction's line is too short to split)."""
    options = {dn: list(_tunings(spec, dtype, dn, kind, C, H, W, cluster, smem_limit)) for dn in spec.directions}
    best, cost = None, None
    for key in dict.fromkeys((c.threads, c.cluster) for c in options[spec.directions[0]]):
        picks = {}
        for dn, opts in options.items():
            i = next((i for i, c in enumerate(opts) if (c.threads, c.cluster) == key), None)
            if i is None:
                break
            picks[dn] = (i, opts[i])
        else:
            total = sum(i for i, _ in picks.values())
            if cost is None or total < cost:
                best, cost = {dn: c for dn, (_, c) in picks.items()}, total
    return best


def chunks_per_block(spec: Spec, direction: str, N: int, C: int, H: int, W: int, cfg: KernelConfig,
                     sm_count: int) -> tuple[int, int]:
    """(cpb, grid size): chunks per block so the grid fills about 4 blocks per SM when chunks allow."""
    cpb = _cpb_for(_chunks(spec, direction, H, W), _blocks_per_range(spec, direction, N, C, cfg), sm_count)
    return cpb, direction_blocks(spec, direction, N, C, H, W, cfg, cpb)


def one_launch_cpb(spec: Spec, N: int, C: int, H: int, W: int, cfgs: list[KernelConfig], sm_count: int) -> int:
    """ml=1: one chunks-per-block for every direction of the launch (the kernel derives each direction's
    range from it), filling the GPU with all their blocks together."""
    nck = max(_chunks(spec, dn, H, W) for dn in spec.directions)
    base = sum(_blocks_per_range(spec, dn, N, C, cfg) for dn, cfg in zip(spec.directions, cfgs))
    return _cpb_for(nck, base, sm_count)
