"""Run a spec's rendered Triton kernels on torch tensors.

Three jobs, in order: load the rendered kernel module once per source (Triton's
``@jit`` reads its function's source through ``inspect``, so the module is
written to a real file under the cache folder and imported from there), plan
the launches (tile sizes, grid, which directions share a launch), and launch
forward and backward on CUDA tensors, or on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1`` set before the module is loaded).

Meta-parameters live in :class:`TritonConfig`; :data:`CONFIGS` is the list of
candidates for the autotuner and :data:`DEFAULT_CONFIG` the documented default.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from ..geometry import DIRECTION_TABLE, frame_extent
from ..spec import Spec
from .cache_dir import cache_dir as _cache_root

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- meta-parameters ---------------------------------------------------------

@dataclass(frozen=True)
class TritonConfig:
    """Launch meta-parameters. The lane axis is not one: a program always owns a whole line.

    block_c: channels per program, an upper bound (see :func:`plan_tile`).
    num_warps: warps per program, a lower bound: :func:`plan_tile` raises it for long lines.
    num_stages: software-pipelining depth of the step loop (loads of later
        steps do not depend on h, so they can be issued ahead).
    steps: 1, or STEP_TILE: lr/rl scans of an nchw tensor then load STEP_TILE
        consecutive steps of each lane at once (one 16-byte vector per lane in
        fp32, against 4 bytes of a 32-byte sector per step), each such direction
        in its own launch (see "Step tiles" in templates/triton/kernels.py.j2).
        Other directions and layouts ignore it. Default 1 until a GPU has timed it.
    """

    block_c: int = 4
    num_warps: int = 4
    num_stages: int = 2
    steps: int = 1

    def __post_init__(self) -> None:
        for name in ("block_c", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name}: expected a power of two >= 1, got {v!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages: expected an integer >= 1, got {self.num_stages!r}")
        if self.steps not in (1, STEP_TILE) or isinstance(self.steps, bool):
            raise ValueError(f"steps: expected 1 or {STEP_TILE}, got {self.steps!r}")


# Steps per tile of a step-tiled lr/rl launch: the templates' _split4/_join4 take a tile apart in 4.
STEP_TILE = 4

# Default: 4 channels x the line over 4 warps. A 64-lane line then holds 2
# elements per thread per tile, leaving registers for the ~10 live tiles of
# a k=3 step; long lines are capped by MAX_ELEMS_PER_THREAD instead.
DEFAULT_CONFIG = TritonConfig()
CONFIGS: tuple[TritonConfig, ...] = tuple(
    TritonConfig(block_c=bc, num_warps=nw, num_stages=ns, steps=st)
    # steps innermost: a tuner that times only the first few candidates still meets both
    for bc in (1, 2, 4, 8, 16) for nw in (2, 4, 8, 16) for ns in (1, 2, 3) for st in (1, STEP_TILE)
)
# Register budget of one fp32 tile, in elements per thread: block_c is lowered
# until BLOCK_C * BLOCK_L <= MAX_ELEMS_PER_THREAD * 32 * num_warps, and where one
# channel still exceeds it, num_warps is raised (up to MAX_WARPS). Why 4: at 8
# per thread the backward spilled 1.3 KB per thread at 1024 lanes; at 4 nothing
# spills at 1024 lanes (8 warps, up to 255 registers a thread) nor at 2048 (16
# warps, at most 128), sm_90, tests/test_triton_spills.py.
MAX_ELEMS_PER_THREAD = 4
MAX_WARPS = 32  # 1024 threads, the most a CTA may have


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class TilePlan:
    block_c: int
    group_tile: bool  # the tile is one weight group (C/G > 1)
    gw_atomic: bool  # several channel blocks share a group: gw is summed with atomics
    num_blocks: int  # channel blocks per (batch, direction)
    num_warps: int  # the config's, raised where one channel of the line exceeds the register budget


def _warps_for(block_c: int, block_l: int, num_warps: int) -> int:
    while block_c * block_l > MAX_ELEMS_PER_THREAD * 32 * num_warps and num_warps < MAX_WARPS:
        num_warps *= 2
    return num_warps


def plan_tile(config: TritonConfig, C: int, G: int, block_l: int) -> TilePlan:
    """Channels (and warps) per program for one launch: the config's bound, the register budget, the groups."""
    cap = min(config.block_c, next_pow2(C), max(1, MAX_ELEMS_PER_THREAD * 32 * config.num_warps // block_l))
    per_group = C // G
    if per_group == 1:
        return TilePlan(cap, False, False, -(-C // cap), _warps_for(cap, block_l, config.num_warps))
    bc = 1
    while bc * 2 <= cap and per_group % (bc * 2) == 0:
        bc *= 2  # the largest power of two <= cap dividing C/G: a tile never straddles groups
    return TilePlan(bc, True, bc < per_group, C // bc, _warps_for(bc, block_l, config.num_warps))


@dataclass(frozen=True)
class LaunchGroup:
    """Directions sharing one launch: their lines round up to the same BLOCK_L."""

    directions: tuple[int, ...]  # indices into spec.directions
    block_l: int
    num_chunks: int  # chunk programs per direction (max over the group)

    @property
    def dmap(self) -> int:
        return sum(d << (2 * slot) for slot, d in enumerate(self.directions))


def launch_groups(spec: Spec, H: int, W: int) -> list[LaunchGroup]:
    by_block: dict[int, list[int]] = {}
    for d, name in enumerate(spec.directions):
        L, _ = frame_extent(name, H, W)
        by_block.setdefault(next_pow2(L), []).append(d)
    groups = []
    for block_l, dirs in by_block.items():
        steps = max(frame_extent(spec.directions[d], H, W)[1] for d in dirs)
        chunks = -(-steps // spec.chunk) if spec.chunk else 1
        groups.append(LaunchGroup(tuple(dirs), block_l, chunks))
    return groups


# SMs assumed when planning without a device (H100/H200 have 132).
DEFAULT_SMS = 132


class Launch(NamedTuple):
    group: LaunchGroup  # the directions this launch runs (one when ``dir >= 0``)
    tile: TilePlan
    dir: int  # the DIR constexpr: the direction's index, or -1 (taken from the program id)
    steps: int = 1  # the STEPS constexpr: steps per tile (> 1 only for one lr/rl direction in nchw)


# Step tiles only while one channel's tile (lanes x steps) fits the element budget on this many warps,
# per pass. More warps leave fewer registers a thread (65536 / threads), and the step-tiled kernels
# spilled beyond these (gspn4, sm_90, tests/test_triton_spills.py): the forward at 32 warps (1024 lanes:
# 64 registers, 120-728 bytes), the backward at 16 (512 lanes: 128 registers, 48-56 bytes).
STEP_TILE_MAX_WARPS = {"forward": 16, "backward": 8}


def step_tile(block_l: int, steps: int, pass_: str = "forward") -> int:
    """The steps per tile a launch of BLOCK_L lanes gets for a config's ``steps``: STEP_TILE while
    block_l x steps elements fit MAX_ELEMS_PER_THREAD a thread on STEP_TILE_MAX_WARPS[pass_] warps (the
    forward's lines up to 512 lanes, the backward's up to 256), else 1: one step per load."""
    fits = block_l * steps <= MAX_ELEMS_PER_THREAD * 32 * STEP_TILE_MAX_WARPS[pass_]
    return steps if steps > 1 and fits else 1


def plan_launches(spec: Spec, N: int, C: int, H: int, W: int, config: TritonConfig,
                  sms: int = DEFAULT_SMS, pass_: str = "forward") -> list[Launch]:
    """The launches of one pass. Directions sharing a BLOCK_L share a launch (the direction comes from
    the program id, strides are runtime values, loads scalar), except when that launch would need more
    than one wave of ``sms`` programs anyway: then each direction whose lanes are contiguous (tb/bt in
    nchw) gets its own launch with constant strides, where its loads become 128-bit. Strided (lr/rl)
    directions stay shared: constants buy them no vector loads. (This was also chosen because their
    single-direction backward spilled at 1024 lanes, 56 and 312 bytes against 8 shared; since the int32
    offsets none of them spills at 1024 or 2048 lanes, sm_90, so whether lr/rl alone run faster is open
    until measured on a GPU.) With ``config.steps`` > 1, each lr/rl direction of an nchw tensor whose
    line fits :func:`step_tile`'s budget for ``pass_`` gets its own launch with step tiles, planned with
    lanes x steps elements; the others are planned as above."""
    G = spec.groups(C)
    out = []
    for group in launch_groups(spec, H, W):
        tile = plan_tile(config, C, G, group.block_l)
        # step tiles: each lr/rl direction of an nchw tensor in its own launch, steps counted into the tile
        steps = step_tile(group.block_l, config.steps, pass_)
        tiled = [d for d in group.directions if steps > 1 and _strided_steps(spec, d)]
        for d in tiled:
            n_steps = frame_extent(spec.directions[d], H, W)[1]
            out.append(Launch(LaunchGroup((d,), group.block_l, -(-n_steps // spec.chunk) if spec.chunk else 1),
                              plan_tile(config, C, G, group.block_l * steps), d, steps))
        group = LaunchGroup(tuple(d for d in group.directions if d not in tiled), group.block_l, group.num_chunks)
        if not group.directions:
            continue
        fits = N * tile.num_blocks * group.num_chunks * len(group.directions) <= sms
        own = [] if fits else [d for d in group.directions if _contiguous_lanes(spec, d)]
        for d in own:
            steps = frame_extent(spec.directions[d], H, W)[1]
            out.append(Launch(LaunchGroup((d,), group.block_l, -(-steps // spec.chunk) if spec.chunk else 1),
                              tile, d))
        rest = tuple(d for d in group.directions if d not in own)
        if rest:
            steps = max(frame_extent(spec.directions[d], H, W)[1] for d in rest)
            out.append(Launch(LaunchGroup(rest, group.block_l, -(-steps // spec.chunk) if spec.chunk else 1),
                              tile, -1))
    return out


def _strided_steps(spec: Spec, d: int) -> bool:
    """Steps adjacent in memory, lanes a row apart: the scan steps along W in an nchw tensor (lr, rl)."""
    return spec.layout == "nchw" and DIRECTION_TABLE[spec.directions[d]].step_axis == "W"


def _contiguous_lanes(spec: Spec, d: int) -> bool:
    """Lanes adjacent in memory: the scan steps along H, so lanes run along W, in an nchw tensor."""
    return spec.layout == "nchw" and DIRECTION_TABLE[spec.directions[d]].step_axis == "H"


def _sms(t: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else DEFAULT_SMS


# --- loading the rendered module ---------------------------------------------

def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs  # Triton >= 3.4 reads the flag here, from the environment

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def cache_dir() -> Path:
    """Where rendered Triton modules live: the ``triton`` folder of the gspngen cache folder."""
    return _cache_root() / "triton"


def _write_source(source: str, digest: str) -> Path:
    """Write the module under the cache folder (atomically), or a temp folder if that is not writable."""
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"gspngen-triton-{os.getuid()}"):
        path = folder / f"gspn_{digest}.py"
        try:
            if path.is_file() and path.read_text() == source:
                return path
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=folder)
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    raise OSError("cannot write the rendered Triton module to the cache folder or a temporary folder")


_MODULES: dict[tuple[str, bool], ModuleType] = {}
_LOCK = threading.Lock()


def kernel_module(spec: Spec) -> ModuleType:
    """The rendered kernels of ``spec``, imported once per process (and per interpreter mode)."""
    key = (spec.hash, interpreter_enabled())
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is None:
            from ..render import TRITON_FILE
            from . import sources

            def render() -> str:
                from ..render.triton import render_kernels

                return render_kernels(spec)

            source = sources.source(spec, TRITON_FILE, render)
            digest = hashlib.sha256(source.encode()).hexdigest()[:32]
            path = _write_source(source, digest)
            name = f"gspngen_triton_{digest}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = mod  # inspect.getmodule (used by Triton) finds it
            module_spec.loader.exec_module(mod)
            _MODULES[key] = mod
    return mod


# --- allocation (a test hook) --------------------------------------------------

def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a result the kernels write completely (tests replace this to NaN-poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def no_saved(spec: Spec, x) -> torch.Tensor:
    """The saved tensor of a forward that needs none: empty, never written (tests replace it to watch)."""
    return torch.empty((0,), dtype=SAVED_DTYPE, device=x.device)


def _accumulator(shape, device) -> torch.Tensor:
    """A zeroed fp32 buffer for atomic sums (for fp32 storage, the result itself)."""
    return torch.zeros(shape, dtype=torch.float32, device=device)


# --- launches --------------------------------------------------------------------

def image_dims(spec: Spec, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, C, H, W) of x in the spec's layout."""
    if spec.layout == "nhwc":
        N, H, W, C = x.shape
    else:
        N, C, H, W = x.shape
    return N, C, H, W


# The stored h is fp32 whatever the storage dtype: see "Backward stores h" in
# templates/triton/kernels.py.j2 for the byte count and the accuracy reason.
SAVED_DTYPE = torch.float32


def saved_shape(spec: Spec, x: torch.Tensor) -> tuple[int, ...]:
    """Shape of the stored h: one per direction, like lam."""
    return (x.shape[0], spec.num_directions, *x.shape[1:])


def _optional(spec: Spec, u, s, m) -> list[torch.Tensor]:
    return [t for t, used in ((u, spec.modulation), (s, spec.skip), (m, spec.merge == "learned")) if used]


# Element offsets inside one image are int32 below this size (see "Addresses" in
# templates/triton/kernels.py.j2); an image of this many elements or more gets int64 (WIDE_INDEX).
INT32_INDEX_LIMIT = 2**31


def wide_index(C: int, H: int, W: int) -> bool:
    """WIDE_INDEX: some element offset inside one image (C*H*W elements; G <= C) needs int64."""
    return C * H * W >= INT32_INDEX_LIMIT


def _launch_args(C, H, W, G, group: LaunchGroup, tile: TilePlan):
    return (group.dmap, len(group.directions), C, H, W, G, group.num_chunks, tile.num_blocks)


def _grid(N: int, group: LaunchGroup, tile: TilePlan) -> tuple[int]:
    return (group.num_chunks * tile.num_blocks * len(group.directions) * N,)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(spec: Spec, x, w, lam, u, s, m, config: TritonConfig = DEFAULT_CONFIG, need_saved: bool = True):
    """(y, hs): the merged result and the stored h of every direction (empty, never written, when not
    ``need_saved``)."""
    mod = kernel_module(spec)
    N, C, H, W = image_dims(spec, x)
    G = spec.groups(C)
    D = spec.num_directions
    out_shape = (N, D, *x.shape[1:]) if spec.merge == "stack" else tuple(x.shape)
    hs = new_output(saved_shape(spec, x), SAVED_DTYPE, x.device) if need_saved else no_saved(spec, x)
    accumulate = spec.merge != "stack" and D > 1
    y = _accumulator(out_shape, x.device) if accumulate else new_output(out_shape, x.dtype, x.device)
    with _on_device(x):
        for group, tile, dir_, steps in plan_launches(spec, N, C, H, W, config, _sms(x)):
            mod.gspn_forward[_grid(N, group, tile)](
                x, w, lam, *_optional(spec, u, s, m), y, hs, *_launch_args(C, H, W, G, group, tile),
                BLOCK_C=tile.block_c, BLOCK_L=group.block_l, DIR=dir_, GROUP_TILE=tile.group_tile,
                WIDE_INDEX=wide_index(C, H, W),
                ACCUMULATE=accumulate,
                SAVE_H=need_saved, STEPS=steps, num_warps=tile.num_warps, num_stages=config.num_stages,
            )
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, hs


def backward(spec: Spec, gy, x, w, lam, u, s, m, hs, config: TritonConfig = DEFAULT_CONFIG):
    """Gradients of (x, w, lam, u, s, m); None for the inputs the spec does not use."""
    mod = kernel_module(spec)
    N, C, H, W = image_dims(spec, x)
    G = spec.groups(C)
    D = spec.num_directions
    dev, dt = x.device, x.dtype
    groups = plan_launches(spec, N, C, H, W, config, _sms(x), "backward")
    gx_atomic = D > 1  # every direction adds to gx
    gw_atomic = any(launch.tile.gw_atomic for launch in groups)
    gx = _accumulator(x.shape, dev) if gx_atomic else new_output(x.shape, dt, dev)
    # One buffer for every direction: fp32 and zeroed if any launch adds into it.
    gw = _accumulator(w.shape, dev) if gw_atomic else new_output(w.shape, dt, dev)
    glam = new_output(lam.shape, dt, dev)
    gu = new_output(u.shape, dt, dev) if spec.modulation else None
    gs = new_output(s.shape, dt, dev) if spec.skip else None
    gm = _accumulator(m.shape, dev) if spec.merge == "learned" else None
    grads_out = [t for t in (gu, gs, gm) if t is not None]
    with _on_device(x):
        for group, tile, dir_, steps in groups:
            mod.gspn_backward[_grid(N, group, tile)](
                gy, x, w, lam, *_optional(spec, u, s, m), hs, gx, gw, glam, *grads_out,
                *_launch_args(C, H, W, G, group, tile),
                BLOCK_C=tile.block_c, BLOCK_L=group.block_l, DIR=dir_, GROUP_TILE=tile.group_tile,
                WIDE_INDEX=wide_index(C, H, W),
                GX_ATOMIC=gx_atomic, GW_ATOMIC=tile.gw_atomic, STEPS=steps,
                num_warps=tile.num_warps, num_stages=config.num_stages,
            )
    gx, gw = gx.to(dt), gw.to(dt)
    if gm is not None:
        gm = gm.to(dt)
    return gx, gw, glam, gu, gs, gm
