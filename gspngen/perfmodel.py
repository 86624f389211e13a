"""Static performance model of the fused CUDA kernels: what a launch costs, counted without a GPU.

For a spec, a storage dtype, a shape and a named GPU (:data:`GPUS`), every
kernel the ``cuda`` backend launches per pass (forward with the h store,
forward without it, backward) is planned exactly as the backend plans it,
built with the runtime's own NVRTC options for the GPU's architecture, and
described by:

- ``bytes_moved``: the bytes the kernel's own loads and stores touch, each
  address once per launch (what DRAM sees when re-reads hit in cache, e.g.
  a shared weight every channel of a group reads). :func:`launch_bytes`
  lists them per tensor; ``tests/test_cuda_byte_counts.py`` counts the same
  through the CPU emulator's checked accesses and
  ``tests/test_perfmodel.py`` holds the two equal. ``bytes_moved_over_minimal``
  divides by what any implementation must move (:func:`gspngen.bench.minimal_bytes`).
- ``registers``, ``spill_bytes`` (spill stores + loads) and the static part of
  ``shared_bytes``: ptxas' report (``-Xptxas=-v``) from the NVRTC build; the
  dynamic shared memory is what the launch requests.
- ``warps_per_sm``: occupancy from threads, registers and shared memory, with
  the allocation rules of the CUDA occupancy calculator for sm_80 / sm_90.
- ``instructions_per_element``: SASS instructions of the kernel's tile loop
  (the backward branch whose body holds the step barrier; ``cuobjdump -sass``
  of the cubin), divided by the elements one thread handles per tile
  (segments x vector). A static count: every instruction of the loop body
  counts once, rarely taken paths included (masked edge tiles, the fallback
  branch of an IEEE divide; their out-of-line bodies are not in the loop),
  so it is an upper bound on the steady-state per-element cost of a thread.
- ``ctas`` per launch against the GPU's ``sms``.
- ``sector_use``: of the 32-byte sectors one warp access to a per-pixel tensor touches, the fraction
  it uses (:func:`sector_use`; 0.5: each sector is requested twice, once per half); lr/rl without
  sector tiles are at 0.5 (fp32 forward) or less. It sets the scattered-request term below.

The forward tuning oc=1 (one launch, a block per plane running every direction) is planned by
:func:`onchip_launch`: its instructions per element are the mean over its directions of the tile loops
it runs (those of the per-direction kernels with its tunings), its instruction term counts every
direction's element updates, and its scattered term applies to its lr/rl directions' own bytes.
Under cc=1 (directions on side streams at once, each into its own output slice, then a PyTorch sum)
the launches are predicted together by :func:`predict_group`.

Prediction (everything here is *predicted*, none of it measured): per launch

    busy   = min(ctas, sms)                       SMs with work
    t_mem  = bytes_moved / (0.9 * peak_hbm * busy / sms)
    issue  = min(4, resident_warps / 4)           warp instructions per clock per SM:
                                                  4 schedulers, a warp issuing every 4 clocks
    t_inst = elements * instructions_per_element / 32 / (busy * issue * clock)
    t_scat = bytes_moved / (32 * sector_use) / (rate * busy / sms)   only where sector_use < 1:
                                                  one request per partial-sector access, each to another
                                                  row (SCATTERED_SECTORS_PER_S_H200, fitted on an H200)
    t      = max(t_mem, t_inst, t_scat) + LAUNCH_US

and a pass is the sum of its launches. ``predicted_pct_copy`` is the time a
copy at 0.9 x peak takes for the *minimal* bytes over the predicted time (the
same "% of copy" ``gspngen bench`` measures); ``predicted_pct_copy_moved`` uses
the bytes moved instead (how close the kernel runs to the bandwidth limit on
the traffic it actually makes). The model ignores memory latency (few
resident warps and no prefetch can leave bandwidth unused), L2 hits across
launches, tail waves and clocks below boost, so it errs on the fast side.

How far, measured (H200, 2026-12-04, benchmarks/results/device_check_2026-12-04_h200_pm): without the
scattered-request term the paper shape was predicted at 5.0 ms forward and 8.6 backward on an H200
against 21.1 and 95.5 measured, the same in bf16 (half the bytes) and before and after a 10-20 % cut in
instructions per element. With it: 22.5 / 73.6 ms predicted at the paper shape (the term is fitted to
these runs, so this is a description of them, not a test of it; scripts/gpu_probe.py's per-launch
times will say whether lr/rl hold the time as the term says).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .geometry import DIRECTION_TABLE
from .spec import Spec

PREDICTED = "predicted (static model), not measured on a GPU"
COPY_EFFICIENCY = 0.9  # fraction of peak HBM bandwidth a large copy reaches
LAUNCH_US = 2.0  # assumed cost of one kernel launch in a queue of launches
WARP_ISSUE_CLOCKS = 4  # a warp issues about once every 4 clocks (dependent fp32 latency)
SCHEDULERS = 4  # warp schedulers per SM (sm_80, sm_90)
# Partial-sector requests to scattered rows (lr/rl without sector tiles: each thread reads V steps of its
# own image row, 16 bytes or less per access) served per second, whole GPU. Fitted to the 16 pass times
# `gspngen bench` measured on an H200 on 2026-12-04 (gspn4, 5 shapes in fp32 and 3 in bf16, forward and
# backward; benchmarks/results/device_check_2026-12-04_h200_pm): 33e9 gives the least rms log error of
# 30, 33, 36 and 40e9, x1.22 (every prediction within 0.70-1.46x of its measurement; without this term,
# which applies only to launches whose data exceeds L2, the model was 3-11x
# optimistic at the large shapes). bf16 and fp32 took the same time because their lr/rl loads make the
# same number of requests (bf16 uses 8-byte vectors there), which only this term reproduces.
# scripts/perfmodel_vs_measured.py prints the comparison (tests/test_perfmodel.py holds it).
SCATTERED_SECTORS_PER_S_H200 = 33e9
# cl=N (a line split over a thread block cluster): each step ends at a cluster barrier after a DSMEM store,
# which no other work of the cluster's blocks hides; a launch takes at least its steps times this. Assumed,
# not measured (published Hopper microbenchmarks put a cluster barrier at a few hundred ns); the probe's
# cl=N rows on the next GPU run give the figure to put here.
CLUSTER_STEP_US = 0.5


@dataclass(frozen=True)
class GPU:
    """Published peak figures of one GPU (boost clock; opt-in shared memory per block)."""

    name: str
    arch: str
    sms: int
    hbm_gbps: float
    clock_ghz: float
    smem_per_sm: int
    smem_per_block: int
    max_warps: int = 64
    max_blocks: int = 32
    regs_per_sm: int = 65536
    l2_bytes: int = 50 * 1024 * 1024


GPUS = {
    "a100": GPU("A100-SXM4-80GB", "sm_80", 108, 2039.0, 1.41, 164 * 1024, 163 * 1024, l2_bytes=40 * 1024 * 1024),
    "h100": GPU("H100-SXM5-80GB", "sm_90", 132, 3350.0, 1.98, 228 * 1024, 227 * 1024),
    "h200": GPU("H200-SXM-141GB", "sm_90", 132, 4800.0, 1.98, 228 * 1024, 227 * 1024),
}
DEFAULT_GPU = "h100"
PASSES = ("forward", "forward_no_grad", "backward")


def gpu_by_name(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"gpu: expected one of {', '.join(GPUS)}, got {name!r}")
    return GPUS[name]


# ---------------------------------------------------------------------------
# Bytes: what each launch's loads and stores touch
# ---------------------------------------------------------------------------

def launch_bytes(spec: Spec, kind: str, d: int, shape: tuple[int, int, int, int], dname: str,
                 save_h: bool = True, acc: Optional[bool] = None) -> dict[str, dict[str, int]]:
    """Bytes one direction's fused launch touches, per tensor: ``{"read"|"write"|"atomic": {name: bytes}}``.

    Mirrors the loads and stores of ``templates/cuda/fused.cuh.j2`` (held equal to the emulator's count
    by the tests): the forward reads x, its direction's lam/u/s and used weights, and, after the first
    direction, the y the earlier ones wrote; it writes y and, with ``save_h``, h. The backward reads gy,
    the forward inputs, the saved h (when the adjoint uses it) and the gx so far; it writes every
    gradient, and adds weight gradients shared by several channels in fp32 atomics (only for
    neighbours that exist) and the merge weight's gradient once per block. ``acc``: whether the launch
    adds to the output so far (None: every direction after the first, as launched one after another;
    False under cc=1, where each direction writes its own slice).
    """
    from .render import cuda as rc
    from .validate import expected_shapes

    if kind not in ("fwd", "bwd"):
        raise ValueError(f"kind: expected fwd or bwd, got {kind!r}")
    N, C, H, W = shape
    es = rc.ELEM_BYTES[dname]
    D, k = spec.num_directions, spec.connection
    shapes = expected_shapes(spec, N, C, H, W)
    plane = math.prod(shapes["x"]) * es
    per_dir = {n: math.prod(shapes[n]) * es // D for n in ("lam", "u", "s") if n in shapes}
    w_c = math.prod(shapes["w"]) * es // (D * k)  # one connection's weights of one direction
    facts = rc.host_facts(spec)
    if acc is None:
        acc = d > 0 and (kind == "bwd" or spec.merge != "stack")
    read: dict[str, int] = {"x": plane, **per_dir}
    write: dict[str, int] = {}
    atomic: dict[str, int] = {}
    if "m" in shapes:
        read["m"] = es  # one scalar per launch (every block reads the same one)
    if kind == "fwd":
        read["w"] = sum(facts["w_used_fwd"]) * w_c
        if acc:
            read["y"] = plane
        write["y"] = plane
        if save_h:
            write["h"] = plane
    else:
        read["gy"] = plane
        read["w"] = sum(facts["w_used_bwd"]) * w_c
        if facts["bwd_needs_h"] or facts["bwd_needs_hp"]:
            read["h"] = plane
        if acc:
            read["gx"] = plane
        write.update({"gx": plane, "glam": per_dir["lam"]})
        write.update({"g" + n: per_dir[n] for n in ("u", "s") if n in per_dir})
        G = spec.groups(C)
        if G == C:
            write["gw"] = k * w_c
        else:
            geo = DIRECTION_TABLE[spec.directions[d]]
            L, T = (H, W) if geo.step_axis == "W" else (W, H)
            r = spec.radius
            atomic["gw"] = 4 * N * G * T * sum(max(0, L - abs(c - r)) for c in range(k))
        if "m" in shapes:
            atomic["gm"] = 4
    return {"read": read, "write": write, "atomic": atomic}


def total_bytes(parts: dict[str, dict[str, int]]) -> int:
    return sum(sum(v.values()) for v in parts.values())


# ---------------------------------------------------------------------------
# Planning: the launches the cuda backend makes (same code path, no tensors)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    pass_: str
    direction: str
    name: str
    ctas: int
    threads: int
    dynamic_smem: int
    elements_per_iteration: int  # per thread per tile: segments x vector (x 2 with sector tiles)
    sector_use: float  # useful bytes / bytes of the 32-byte sectors one warp access to a pixel tensor touches
    bytes: dict
    # oc=1 (one launch runs every direction): the directions it runs over the elements, the share of its
    # bytes moved with partial sectors (its lr/rl directions' own tensors), and per direction the fused
    # kernel (name expression) whose tile loop it runs, with that loop's elements per thread and iteration
    directions: int = 1
    scattered_share: float = 1.0
    loops: tuple = ()
    # cc=1: launches of one pass on side streams at the same time share a non-empty group; "external": not
    # a gspngen kernel (the sum of cc=1's slices, a PyTorch reduction): no SASS, memory-bound on every SM
    group: str = ""
    external: bool = False
    launches: int = 1  # an external step's kernel launches (a 16-bit sum: the fp32 sum, then the copy)
    # cl=N: the steps one cluster walks, each ending at a cluster barrier (0: no cluster)
    cluster_steps: int = 0
    # ml=1 (group "ml"): the one-launch entry whose blocks of this direction this entry describes (its own
    # name is the direction's plain or cluster kernel, the same tile loop, whose build facts stand for it)
    entry: str = ""


SECTOR = 32  # bytes: the unit L1/L2 and DRAM move


def sector_use(mapping: int, cfg, elem_bytes: int, C: int) -> float:
    """Of the 32-byte sectors one warp load or store of a per-pixel tensor (x, lam, u, s, y, w, the
    gradients) touches, the fraction it uses (aligned tensors, a full warp):

    - lanes (tb/bt, nchw): 32 threads read consecutive V-element runs of one row: whole sectors.
    - steps (lr/rl, nchw): each thread reads a V-element run of its own row, 32 rows per warp load:
      V x size / 32 of each sector (16-byte vectors: half). Sector tiles (``stage``) load and store
      2V steps of 16 rows per warp access: whole sectors.
    - chan (nhwc): CT threads cover a run of CT x V channels of one pixel (the next pixel's run follows
      when CT x V = C): whole sectors when the run fills them.
    """
    from .render import cuda as rc

    if mapping == rc.LANES:
        run = SECTOR
    elif mapping == rc.STEPS:
        run = cfg.vec * elem_bytes * (2 if cfg.stage else 1)
    else:
        run = SECTOR if cfg.chan_threads * cfg.vec >= C else cfg.chan_threads * cfg.vec * elem_bytes
    return min(run, SECTOR) / SECTOR


def onchip_launch(spec: Spec, dname: str, shape: tuple[int, int, int, int], oc, pass_: str,
                  save_h: bool) -> Launch:
    """oc=1's one forward launch (``gspn_fwd_oc``): a block per (n, channel) plane runs every direction
    with y in shared memory. Bytes: each address once (x is read by every direction, from L2 after the
    first), every direction's lam/u/s and used weights, y written once, h per direction with ``save_h``;
    the emulator counts the same (tests/test_cuda_byte_counts.py). Its tile loops are those of the
    launch-per-direction kernels with the same tunings (the same ``GsForward`` instantiations, whose y
    accesses land in shared memory here): their SASS gives the instructions per element."""
    from .render import cuda as rc

    N, C, H, W = shape
    D = spec.num_directions
    one = launch_bytes(spec, "fwd", 0, shape, dname, save_h)  # one direction's launch, no y read back
    mine = [t for t in ("lam", "u", "s", "w") if t in one["read"]]  # a direction's own inputs
    read = {"x": one["read"]["x"], **{t: D * one["read"][t] for t in mine}}
    if "m" in one["read"]:
        read["m"] = D * one["read"]["m"]
    write = {"y": one["write"]["y"], **({"h": D * one["write"]["h"]} if save_h else {})}
    parts = {"read": read, "write": write, "atomic": {}}
    own = sum(one["read"][t] for t in mine) + one["write"].get("h", 0)
    es = rc.ELEM_BYTES[dname]
    loops, steps_bytes = [], 0
    for d, direction in enumerate(spec.directions):
        mapping = rc.thread_map(spec, direction)
        cfg, vec = (oc.steps, oc.vec_steps) if mapping == rc.STEPS else (oc.lanes, oc.vec_lanes)
        loops.append((rc.fused_name("fwd", mapping, DIRECTION_TABLE[direction].reverse, cfg, vec, False, save_h),
                      cfg.tile_elements(mapping)))
        if mapping == rc.STEPS:  # x comes from DRAM in the first direction (then from L2)
            steps_bytes += own + (read["x"] if d == 0 else 0)
    return Launch(pass_, "onchip", oc.name(save_h), N * C, oc.threads, oc.smem, 1,
                  sector_use(rc.STEPS, oc.steps, es, C) if steps_bytes else 1.0, parts,
                  directions=D, scattered_share=steps_bytes / total_bytes(parts), loops=tuple(loops))


def plan_launches(spec: Spec, dname: str, shape: tuple[int, int, int, int], gpu: GPU,
                  configs=None, transposed: bool = False, onchip: bool = False,
                  concurrent: tuple = (), cluster: int = 1, one_launch: tuple = ()) -> dict[str, list[Launch]]:
    """Per pass, the launches ``CudaBackend`` makes at this shape (aligned tensors) on ``gpu``; ``configs``:
    a tuning chooser as ``CudaBackend`` takes (None: the defaults); ``transposed``: the tuning tr=1 in both
    passes (left/right scans as top/bottom ones on transposed planes, plus the plane transposes);
    ``onchip``: the forward tuning oc=1 (one launch for every direction where the plane fits on chip,
    :func:`gspngen.render.cuda.onchip_plan`; elsewhere the backend, and so the model, keeps the launches
    per direction); ``concurrent``: the passes ("fwd", "bwd") under cc=1, whose directions run at once on
    side streams, each writing its own slice of the output (y, or gx) with nothing to read back, and a
    PyTorch sum of the slices after them (not with tr=1, as in the backend); ``cluster``: the tuning
    cl=N in both passes (each line split over up to N blocks of a cluster; sm_90 and newer); ``one_launch``:
    the passes under ml=1, whose directions run in one launch (group "ml", one entry per direction with its
    blocks of the launch), each into its own slice, summed after it as under cc=1."""
    from .backends.cuda import CudaBackend, left_right, transposed_as
    from .render import cuda as rc

    if cluster > 1:
        if int(gpu.arch.split("_")[1]) < 90:
            raise ValueError(f"cluster: thread block clusters need sm_90 or newer, the {gpu.name} is {gpu.arch}")
        if configs is not None:
            raise ValueError("cluster: cl=N chooses the tunings itself; pass configs or cluster, not both")
    if cluster > 1 or (one_launch and configs is None):  # the keys' tunings, pass by pass
        keys = {k: ",".join(([f"cl={cluster}"] if cluster > 1 else []) + (["ml=1"] if k in one_launch else []))
                for k in ("fwd", "bwd")}
        configs = CudaBackend(runner=object()).with_config(keys["fwd"], keys["bwd"]).configs
    N, C, H, W = shape
    be = CudaBackend(runner=object(), configs=configs, transposed=transposed)  # tr=1: both passes here
    limits = (gpu.sms, gpu.smem_per_block)
    # as in CudaBackend.forward: tr=1 first, then oc=1 where the plane fits
    oc = (rc.onchip_plan(spec, dname, H, W, gpu.smem_per_block)
          if onchip and not (transposed and be.transpose_applies(spec)) else None)
    watom = spec.groups(C) != C
    es = rc.ELEM_BYTES[dname]
    plane = N * C * H * W * es  # one image of C channels per batch item, in bytes
    tiles = -(-H // 32) * -(-W // 32)  # 32 x 32 transpose tiles per H x W plane
    out: dict[str, list[Launch]] = {}
    for pass_, kind, save_h in (("forward", "fwd", True), ("forward_no_grad", "fwd", False),
                                ("backward", "bwd", True)):
        if oc is not None and kind == "fwd":
            out[pass_] = [onchip_launch(spec, dname, shape, oc, pass_, save_h)]
            continue
        launches = []
        tr = be.transposed and be.transpose_applies(spec, kind, dname, C)
        if kind in one_launch and be.one_launch_applies(spec) and not tr:
            out[pass_] = _one_launch_plan(be, spec, dname, kind, shape, gpu, watom and kind == "bwd", save_h,
                                          pass_)
            continue
        cc = kind in concurrent and be.concurrency_applies(spec, kind) and not tr
        side = left_right(spec) if tr else []
        order = [d for d in range(spec.num_directions) if d not in side] + side  # the backend's launch order
        for i, d in enumerate(order):
            direction = spec.directions[d]
            moved = d in side
            as_dir = transposed_as(direction) if moved else direction
            dims = (N, C, W, H) if moved else shape
            first = i == 0 or (moved and d == side[0])  # tr=1: the first transposed direction starts yT
            acc = not first and (kind == "bwd" or spec.merge != "stack")
            p = be.plan(spec, dname, kind, d, dims, [], acc=acc, watom=watom and kind == "bwd", limits=limits,
                        save_h=save_h, as_dir=as_dir if moved else None)
            cfg = be.config(spec, dname, as_dir, kind, C, dims[2], dims[3], gpu.smem_per_block)
            mapping = rc.thread_map(spec, as_dir)
            if moved:
                # this direction's w, lam (u, s) read and written once more, transposed; x before the first
                G = spec.groups(C)
                per = {"w": N * spec.connection * G * H * W * es, "lam": plane}
                if spec.modulation:
                    per["u"] = plane
                if spec.skip:
                    per["s"] = plane
                if d == side[0]:
                    per["x"] = plane
                if kind == "bwd" and (spec.merge == "stack" or d == side[0]):  # gy: its slice, or once
                    per["gy"] = plane
                if kind == "bwd":  # the direction's own gradients back into their slices
                    grads = {"gw": N * spec.connection * G * H * W * (4 if G != C else es), "glam": plane}
                    if spec.modulation:
                        grads["gu"] = plane
                    if spec.skip:
                        grads["gs"] = plane
                    per.update(grads)
                ctas = sum(-(-v // (H * W * es)) for v in per.values()) * tiles
                launches.append(Launch(pass_, f"{direction} transposes", rc.transpose_name(False), ctas,
                                       rc.TR_THREADS, rc.TR_SMEM, 1, 1.0, {"read": per, "write": dict(per)}))
            T = dims[3] if DIRECTION_TABLE[as_dir].step_axis == "W" else dims[2]
            K = spec.chunk if spec.chunk is not None and spec.chunk < T else T
            launches.append(Launch(pass_, direction, p.name, p.grid, p.block, p.smem, cfg.tile_elements(mapping),
                                   sector_use(mapping, cfg, es, C),
                                   launch_bytes(spec, kind, d if not first else 0, shape, dname, save_h,
                                                acc=False if cc else None),
                                   group="cc" if cc else "",
                                   cluster_steps=min(T, p.cpb * K) if cfg.cluster > 1 else 0))
        if side:  # the transposed output (gx in the backward) back: read it (and the target, when added to)
            target = "y" if kind == "fwd" else "gx"
            back = {"read": {target: (2 if len(order) > len(side) else 1) * plane}, "write": {target: plane}}
            if spec.merge == "stack" and kind == "fwd":
                back = {"read": {"y": len(side) * plane}, "write": {"y": len(side) * plane}}
            launches.append(Launch(pass_, "transpose back", rc.transpose_name(len(order) > len(side)),
                                   N * C * tiles * (len(side) if spec.merge == "stack" and kind == "fwd" else 1),
                                   rc.TR_THREADS, rc.TR_SMEM, 1, 1.0, back))
        if cc:  # the slices summed into the output (fp32 accumulation, then a copy, for 16-bit storage)
            launches.append(_sum_of_slices(spec, pass_, "y" if kind == "fwd" else "gx", plane, es, gpu))
        out[pass_] = launches
    return out


def _sum_of_slices(spec: Spec, pass_: str, target: str, plane: int, es: int, gpu: GPU) -> Launch:
    """cc=1's and ml=1's PyTorch sum of the directions' slices into the output (fp32 accumulation, then a
    copy, for 16-bit storage)."""
    D = spec.num_directions
    moved = {"read": {target: D * plane}, "write": {target: plane}}
    if es < 4:
        moved = {"read": {target: D * plane, "fp32 sum": 4 // es * plane},
                 "write": {target: plane, "fp32 sum": 4 // es * plane}}
    return Launch(pass_, "sum of slices", "torch.sum", gpu.sms, 256, 0, 1, 1.0, moved, external=True,
                  launches=1 if es == 4 else 2)


def _one_launch_plan(be, spec: Spec, dname: str, kind: str, shape: tuple[int, int, int, int], gpu: GPU,
                     watom: bool, save_h: bool, pass_: str) -> list[Launch]:
    """ml=1: the one launch as one entry per direction (group "ml": their blocks share the launch, predicted
    together as cc=1's side-stream launches are), then the sum of the slices (not for stack's forward)."""
    from .render import cuda as rc

    N, C, H, W = shape
    es = rc.ELEM_BYTES[dname]
    slices = kind == "bwd" or spec.merge != "stack"
    launch, parts = be._plan_one_launch(spec, dname, kind, shape, [], watom, (gpu.sms, gpu.smem_per_block),
                                        save_h, slices=slices)
    out = []
    for d, (own, blocks) in enumerate(parts):
        direction = spec.directions[d]
        mapping, _, cfg, _ = own.part
        T = W if DIRECTION_TABLE[direction].step_axis == "W" else H
        K = spec.chunk if spec.chunk is not None and spec.chunk < T else T
        out.append(Launch(pass_, direction, own.name, blocks, launch.block, launch.smem, cfg.tile_elements(mapping),
                          sector_use(mapping, cfg, es, C), launch_bytes(spec, kind, d, shape, dname, save_h, acc=False),
                          group="ml", cluster_steps=min(T, launch.cpb * K) if cfg.cluster > 1 else 0,
                          entry=launch.name))
    if slices:
        out.append(_sum_of_slices(spec, pass_, "y" if kind == "fwd" else "gx", N * C * H * W * es, es, gpu))
    return out


# ---------------------------------------------------------------------------
# Build: NVRTC (the runtime's compiler and options), ptxas report, SASS
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelFacts:
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    stack_bytes: int
    static_smem: int
    loop_instructions: int  # SASS instructions in the tile loop's body
    instructions: int  # SASS instructions of the whole kernel


class ToolMissing(RuntimeError):
    """NVRTC or cuobjdump is not installed: the static model cannot build the kernels."""


def _cuobjdump_candidates() -> list[str]:
    found = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            found.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    for site in sys.path:  # nvidia-cuda-cuobjdump wheels, then the copy in the Triton wheel
        found += [str(p) for p in sorted(Path(site).glob("nvidia/*/bin/cuobjdump"))]
        found.append(os.path.join(site, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return list(dict.fromkeys(p for p in found if p and os.path.isfile(p) and os.access(p, os.X_OK)))


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # not installed, or the NVRTC library fails to load
        raise ToolMissing(f"NVRTC is not available (pip install 'gspngen[cuda13]'): {type(exc).__name__}: "
                          f"{exc}"[:300]) from None
    return nvrtc


def toolchain() -> dict[str, Any]:
    """The NVRTC version and the disassemblers found (part of every cache key)."""
    major, minor = _nvrtc().getVersion()
    return {"nvrtc": f"{major}.{minor}", "cuobjdump": _cuobjdump_candidates()}


_PTXAS = re.compile(r"Function properties for (\S+)\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads\n.*?Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?",
                    re.S)
_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_ptxas(log: str) -> dict[str, tuple[int, int, int, int]]:
    """{mangled name: (registers, spill bytes, stack bytes, static smem)} from an ``-Xptxas=-v`` log."""
    out = {}
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", log):
        m = _PTXAS.search(block)
        if m:
            out[m.group(1)] = (int(m.group(5)), int(m.group(3)) + int(m.group(4)), int(m.group(2)),
                               int(m.group(6) or 0))
    return out


def parse_sass(sass: str) -> dict[str, tuple[int, int]]:
    """{mangled name: (tile-loop instructions, all instructions)} from ``cuobjdump -sass``.

    The tile loop is the widest backward branch (the kernels have one loop over tiles, everything
    inside it unrolled; the other backward branch is the one-instruction trap loop after EXIT).
    A kernel without a loop counts 0 loop instructions.
    """
    out = {}
    for func in re.split(r"\n\s+Function : ", sass)[1:]:
        name = func.split("\n", 1)[0].strip()
        ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INS.finditer(func)]
        best = 0
        for a, op, rest in ins:
            t = re.search(r"0x([0-9a-f]+)\s*$", rest.strip()) if op.startswith("BRA") else None
            if t is None or int(t.group(1), 16) >= a:
                continue
            lo = int(t.group(1), 16)
            best = max(best, sum(1 for b, _, _ in ins if lo <= b <= a))
        out[name] = (best, len(ins))
    return out


def _disassemble(cubin: bytes) -> str:
    tools = _cuobjdump_candidates()
    if not tools:
        raise ToolMissing("cuobjdump not found (PATH, /usr/local/cuda/bin, the nvidia-cuda-cuobjdump or "
                          "triton wheel): pip install 'gspngen[triton]'")
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        for tool in tools:  # an older cuobjdump may not read a newer NVRTC's cubin: try the next
            r = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
            if r.returncode == 0 and "Function :" in r.stdout:
                return r.stdout
            errors.append(f"{tool}: {(r.stderr or r.stdout).strip()[:200]}")
    raise ToolMissing("no cuobjdump could read the cubin: " + "; ".join(errors))


def _build(source: str, names: list[str], arch: str) -> dict[str, KernelFacts]:
    """One NVRTC build of ``names`` with the runtime's options for ``arch``; facts per name expression."""
    from .runtime.cuda_build import build_options

    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, "gspn.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, list(build_options()) + [f"-arch={arch}", "-Xptxas=-v"])
        except Exception as exc:
            raise RuntimeError(f"NVRTC build for {arch} failed: {exc}\n{nvrtc.getProgramLog(prog)[-4000:]}") from None
        log = nvrtc.getProgramLog(prog)
        # CuPy's getCUBIN reads the buffer as a C string and drops the final (NUL) byte; put it back
        # (a trailing byte more is harmless to an ELF reader).
        cubin = nvrtc.getCUBIN(prog) + b"\0"
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
    finally:
        nvrtc.destroyProgram(prog)
    res = parse_ptxas(log)
    sass = parse_sass(_disassemble(cubin))
    out = {}
    for n, m in lowered.items():
        if m not in res or m not in sass:
            raise RuntimeError(f"kernel {n}: no ptxas report or SASS for {m}")
        regs, spill, stack, smem = res[m]
        out[n] = KernelFacts(regs, spill, stack, smem, *sass[m])
    return out


_MEMO: dict[str, KernelFacts] = {}
_LOCK = threading.Lock()


def _key(source: str, arch: str, name: str, tools: dict) -> str:
    text = json.dumps([hashlib.sha256(source.encode()).hexdigest(), arch, name, tools, 1])
    return hashlib.sha256(text.encode()).hexdigest()


def kernel_facts(source: str, names: list[str], arch: str) -> dict[str, KernelFacts]:
    """Facts of each named kernel; built once per (source, arch, name, toolchain), kept in memory and
    on disk under the gspngen cache folder (``perfmodel/``), so a second run builds nothing."""
    from .runtime.cache_dir import cache_dir

    tools = toolchain()
    keys = {n: _key(source, arch, n, tools) for n in names}
    folder = cache_dir() / "perfmodel"
    with _LOCK:
        missing = []
        for n, key in keys.items():
            if key in _MEMO:
                continue
            try:
                _MEMO[key] = KernelFacts(**json.loads((folder / f"{key}.json").read_text()))
            except (OSError, ValueError, TypeError):
                missing.append(n)
        if missing:
            built = _build(source, missing, arch)
            for n, facts in built.items():
                _MEMO[keys[n]] = facts
                try:
                    from .atomic import write_file_atomically

                    folder.mkdir(parents=True, exist_ok=True)
                    write_file_atomically(folder / f"{keys[n]}.json", json.dumps(asdict(facts)).encode())
                except OSError:
                    pass  # a read-only cache folder only costs a rebuild next time
        return {n: _MEMO[keys[n]] for n in names}


# ---------------------------------------------------------------------------
# Occupancy and prediction
# ---------------------------------------------------------------------------

def occupancy(gpu: GPU, threads: int, registers: int, smem: int) -> tuple[int, int]:
    """(blocks, warps) resident per SM, with the occupancy calculator's rules for sm_80 / sm_90:
    registers allocated per warp in units of 256 and warps in groups of 4; 1 KB of shared memory
    reserved per block, allocated in units of 128 bytes."""
    wpb = -(-threads // 32)
    by_warps = gpu.max_warps // wpb
    per_warp = -(-registers * 32 // 256) * 256
    reg_warps = (gpu.regs_per_sm // per_warp) // 4 * 4 if registers else gpu.max_warps
    by_regs = reg_warps // wpb
    block_smem = -(-(smem + 1024) // 128) * 128
    by_smem = gpu.smem_per_sm // block_smem
    blocks = max(0, min(by_warps, by_regs, by_smem, gpu.max_blocks))
    return blocks, blocks * wpb


def scattered_sectors_per_s(gpu: GPU) -> float:
    """Rate at which the memory system serves partial-sector requests that each land in another image
    row (see SCATTERED_SECTORS_PER_S_H200), scaled to other GPUs by peak HBM bandwidth (an assumption)."""
    return SCATTERED_SECTORS_PER_S_H200 * gpu.hbm_gbps / GPUS["h200"].hbm_gbps


def predict_launch(gpu: GPU, ctas: int, warps_per_block: int, warps_per_sm: int, elements: int,
                   instructions_per_element: float, nbytes: int, sector_use: float = 1.0,
                   scattered_share: float = 1.0) -> tuple[float, float]:
    """(predicted ms, ms of the memory term alone) of one launch (module docstring). ``elements``: element
    updates (elements x directions for oc=1); ``scattered_share``: of ``nbytes``, the part the scattered
    term applies to (oc=1: its lr/rl directions' own tensors)."""
    busy = max(1, min(ctas, gpu.sms))
    bw = COPY_EFFICIENCY * gpu.hbm_gbps * 1e9 * busy / gpu.sms
    t_mem = nbytes / bw
    resident = max(1, min(warps_per_sm, -(-ctas // gpu.sms) * warps_per_block))
    issue = min(SCHEDULERS, resident / WARP_ISSUE_CLOCKS)
    t_inst = elements * instructions_per_element / 32 / (busy * issue * gpu.clock_ghz * 1e9)
    t_scat = scattered_ms(gpu, ctas, nbytes, sector_use, scattered_share) * 1e-3
    return (max(t_mem, t_inst, t_scat) * 1e3 + LAUNCH_US * 1e-3), t_mem * 1e3


def scattered_ms(gpu: GPU, ctas: int, nbytes: int, sector_use: float, share: float = 1.0) -> float:
    """The scattered-request term of a launch, ms: rows read and written a part of a sector at a time
    make one request per access, each in another row (0 where every access uses whole sectors, or where
    the launch's data fits in L2, whose hits the rate does not describe); ``share``: the part of
    ``nbytes`` moved that way."""
    if sector_use >= 1 or nbytes <= gpu.l2_bytes:
        return 0.0
    busy = max(1, min(ctas, gpu.sms))
    return share * nbytes / (SECTOR * sector_use) / (scattered_sectors_per_s(gpu) * busy / gpu.sms) * 1e3


def predict_group(gpu: GPU, members: list[dict]) -> tuple[float, str]:
    """(predicted ms, bound) of launches that run at the same time (cc=1: one per direction, on side
    streams): the span from the first start to the last end. Each member is held to what it would take
    alone (its CTAs are all the SMs it can use, so a launch of 4 CTAs stays as slow as it was); together
    they add up on what they share: their bytes over the SMs all their CTAs cover, their scattered
    requests likewise (those of members whose data exceeds L2), and, where their CTAs outnumber the SMs,
    their instructions over every SM. One launch latency (the streams' launches overlap).
    ``members``: predict_launch's arguments per launch, as dicts."""
    alone = [predict_launch(gpu, m["ctas"], m["warps_per_block"], m["warps_per_sm"], m["elements"],
                            m["instructions_per_element"], m["nbytes"], m["sector_use"],
                            m["scattered_share"])[0] * 1e-3 - LAUNCH_US * 1e-6 for m in members]
    ctas = sum(m["ctas"] for m in members)
    busy = max(1, min(ctas, gpu.sms))
    nbytes = sum(m["nbytes"] for m in members)
    t_mem = nbytes / (COPY_EFFICIENCY * gpu.hbm_gbps * 1e9 * busy / gpu.sms)
    t_inst = 0.0
    if ctas > gpu.sms:  # the SMs are shared: the members' work over all of them
        resident = max(1, min(min(m["warps_per_sm"] for m in members),
                              -(-ctas // gpu.sms) * max(m["warps_per_block"] for m in members)))
        issue = min(SCHEDULERS, resident / WARP_ISSUE_CLOCKS)
        t_inst = sum(m["elements"] * m["instructions_per_element"] for m in members) / 32 / (
            gpu.sms * issue * gpu.clock_ghz * 1e9)
    # scattered requests: where a member's own data exceeds L2, as for a launch alone (their sum counts the
    # inputs they share once per member, so it is no measure of the working set)
    rate = scattered_sectors_per_s(gpu) * busy / gpu.sms
    t_scat = sum(m["scattered_share"] * m["nbytes"] / (SECTOR * m["sector_use"]) / rate
                 for m in members if m["sector_use"] < 1 and m["nbytes"] > gpu.l2_bytes)
    t = max(max(alone), t_mem, t_inst, t_scat)
    bound = ("memory" if t == t_mem else "scattered requests" if t == t_scat else
             "instructions" if t == t_inst else "its slowest launch")
    return t * 1e3 + LAUNCH_US * 1e-3, bound


def copy_ms(gpu: GPU, nbytes: int) -> float:
    """A copy's time for ``nbytes`` (read + write counted) at 0.9 x peak."""
    return nbytes / (COPY_EFFICIENCY * gpu.hbm_gbps * 1e9) * 1e3


def static_figures(spec: Spec, dname: str, shape: tuple[int, int, int, int], gpu: str = DEFAULT_GPU,
                   configs=None, transposed: bool = False, onchip: bool = False, concurrent: tuple = (),
                   cluster: int = 1, one_launch: tuple = ()) -> dict:
    """The static model of the ``cuda`` backend at one shape: per pass (``forward``, ``forward_no_grad``,
    ``backward``) the pass's figures and one entry per kernel launch, under stable names. JSON-ready.
    ``configs``: a tuning chooser (``CudaBackend(configs=...)``; None: the default tunings);
    ``transposed``, ``onchip``, ``concurrent``, ``cluster``, ``one_launch``: the tunings tr=1, oc=1, cc=1, cl=N
    and ml=1
    (:func:`plan_launches`; a cl=N launch takes at least its steps x CLUSTER_STEP_US, bound "cluster barriers").
    Launches that run at once (cc=1) are predicted together (:func:`predict_group`): each member has
    ``concurrent`` true, ``predicted_ms`` and ``group_ms`` the group's span (each runs over it),
    ``group_bound`` what bounds the group, and ``alone_ms`` and ``bound`` its own prediction as if it
    ran alone; the pass counts the span once. The sum of cc=1's slices is an ``external`` entry (a
    PyTorch reduction), left out of the pass's instruction, register, occupancy and CTA figures.
    ml=1's directions are a group too (one launch: ``launch_ctas`` and the pass's ``ctas`` count all its
    blocks, ``entry`` names the one-launch kernel)."""
    from .bench import minimal_bytes
    from .render import cuda as rc

    g = gpu_by_name(gpu)
    if dname not in rc.ELEM_BYTES:
        raise ValueError(f"dtype: expected one of {', '.join(rc.ELEM_BYTES)}, got {dname!r}")
    N, C, H, W = (int(v) for v in shape)
    shape = (N, C, H, W)
    plans = plan_launches(spec, dname, shape, g, configs, transposed, onchip, concurrent, cluster, one_launch)
    names = list(dict.fromkeys([l.name for ls in plans.values() for l in ls if not l.external]
                               + [n for ls in plans.values() for l in ls for n, _ in l.loops]))
    facts = kernel_facts(rc.kernel_source(spec, dname), names, g.arch)
    elements = N * C * H * W
    minimal = {p: minimal_bytes(spec, N, C, H, W, dname, "backward" if p == "backward" else "forward")
               for p in PASSES}
    no_grad_bytes = sum(total_bytes(l.bytes) for l in plans["forward_no_grad"])
    out: dict[str, Any] = {"gpu": gpu, "gpu_name": g.name, "arch": g.arch, "sms": g.sms, "dtype": dname,
                           "shape": list(shape), "label": PREDICTED}
    for pass_, launches in plans.items():
        kernels = []
        for l in launches:
            f = KernelFacts(0, 0, 0, 0, 0, 0) if l.external else facts[l.name]
            smem = l.dynamic_smem + f.static_smem
            blocks, warps = occupancy(g, l.threads, f.registers, smem)
            if l.loops:  # oc=1: per direction, the tile loop it runs; means over its directions
                loop_ins = sum(facts[n].loop_instructions for n, _ in l.loops) / len(l.loops)
                ipe = sum(facts[n].loop_instructions / e for n, e in l.loops) / len(l.loops)
                epi = loop_ins / ipe  # elements per iteration as their ratio implies
            else:
                loop_ins, ipe, epi = f.loop_instructions, f.loop_instructions / l.elements_per_iteration, \
                    l.elements_per_iteration
            if l.external:  # a PyTorch elementwise reduction: every SM busy, memory-bound
                blocks, warps = g.max_warps // -(-l.threads // 32), g.max_warps
            nbytes = total_bytes(l.bytes)
            ms, mem_ms = predict_launch(g, l.ctas, -(-l.threads // 32), warps, elements * l.directions, ipe, nbytes,
                                        l.sector_use, l.scattered_share)
            ms += (l.launches - 1) * LAUNCH_US * 1e-3
            barriers_ms = l.cluster_steps * CLUSTER_STEP_US * 1e-3 + LAUNCH_US * 1e-3
            barrier_bound = barriers_ms > ms
            ms = max(ms, barriers_ms)
            kernels.append({
                "direction": l.direction, "kernel": l.name, "instructions_per_element": ipe,
                "loop_instructions": loop_ins, "elements_per_iteration": epi,
                "sector_use": l.sector_use,
                "instructions": f.instructions, "bytes_moved": nbytes, "bytes_breakdown": l.bytes,
                "registers": f.registers, "shared_bytes": smem, "spill_bytes": f.spill_bytes,
                "stack_bytes": f.stack_bytes, "threads": l.threads, "blocks_per_sm": blocks,
                "warps_per_sm": warps, "ctas": l.ctas, "sms": g.sms, "predicted_ms": ms,
                "bound": ("cluster barriers" if barrier_bound else
                          "memory" if ms - LAUNCH_US * 1e-3 <= mem_ms * (1 + 1e-9) else
                          "scattered requests" if ms - LAUNCH_US * 1e-3 <= scattered_ms(
                              g, l.ctas, nbytes, l.sector_use, l.scattered_share) * (1 + 1e-9)
                          else "instructions"),
                "concurrent": bool(l.group), "external": l.external,
                "launch_ctas": (sum(m.ctas for m in launches if m.group == "ml") if l.group == "ml" else l.ctas),
                "entry": l.entry or l.name,
            })
        # cc=1: the side-stream launches predicted together; each runs over the group's span (what a
        # probe timing one of them sees), the pass counts the span once
        ms = sum(k["predicted_ms"] for l, k in zip(launches, kernels) if not l.group)
        for group in dict.fromkeys(l.group for l in launches if l.group):
            members = [(l, k) for l, k in zip(launches, kernels) if l.group == group]
            span, bound = predict_group(g, [dict(ctas=l.ctas, warps_per_block=-(-l.threads // 32),
                                                 warps_per_sm=k["warps_per_sm"], elements=elements * l.directions,
                                                 instructions_per_element=k["instructions_per_element"],
                                                 nbytes=k["bytes_moved"], sector_use=l.sector_use,
                                                 scattered_share=l.scattered_share) for l, k in members])
            # cl=N members: the group lasts at least its longest walk of cluster barriers
            floor = max(l.cluster_steps for l, _ in members) * CLUSTER_STEP_US * 1e-3 + LAUNCH_US * 1e-3
            if floor > span:
                span, bound = floor, "cluster barriers"
            for _, k in members:
                k["alone_ms"], k["predicted_ms"], k["group_ms"], k["group_bound"] = (k["predicted_ms"], span,
                                                                                   span, bound)
            ms += span
        moved = sum(k["bytes_moved"] for k in kernels)
        own = [k for l, k in zip(launches, kernels) if not l.external]  # gspngen's kernels (not the sum)
        out[pass_] = {
            "gpu": gpu, "sms": g.sms,
            "instructions_per_element": sum(k["instructions_per_element"] for k in own) / len(own),
            "bytes_minimal": minimal[pass_],
            "bytes_moved": moved,
            "bytes_moved_over_minimal": moved / minimal[pass_],
            "bytes_moved_over_minimal_no_grad": (no_grad_bytes / minimal[pass_]) if pass_ != "backward" else None,
            "registers": max(k["registers"] for k in own),
            "shared_bytes": max(k["shared_bytes"] for k in own),
            "spill_bytes": max(k["spill_bytes"] for k in own),
            "sector_use": min(k["sector_use"] for k in own),
            "warps_per_sm": min(k["warps_per_sm"] for k in own),
            "ctas": min(k["launch_ctas"] for k in own),
            "predicted_ms": ms,
            "predicted_pct_copy": 100 * copy_ms(g, minimal[pass_]) / ms,
            "predicted_pct_copy_moved": 100 * copy_ms(g, moved) / ms,
            "kernels": kernels,
        }
    return out
