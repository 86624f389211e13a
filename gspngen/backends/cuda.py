"""The CUDA backends: generated CUDA C++ (gspngen/render/cuda.py) behind the Backend protocol.

``CudaBackend`` runs the fused kernels: per pass, one launch per direction,
each covering every step of its scan. ``CudaPerStepBackend`` runs GSPN-1's
launch structure (one launch per step) with the same math, for benchmarks.
Both save h (storage dtype, frame order: (N, D, C, H*W); nhwc (N, D, H*W, C))
in the forward for the backward; with ``forward(..., need_saved=False)`` the fused
forward runs instantiations that never store h (and returns an empty ``saved``).

All shapes and launch geometry are decided here before any launch; the
kernels additionally mask every access to the problem's bounds. Kernels are
built and launched by a runner (gspngen/runtime/cuda_build.py: CuPy/NVRTC on
the current PyTorch stream; the tests use a CPU emulator).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ..geometry import DIRECTION_TABLE, image_dims
from ..render import cuda as rc
from ..spec import Spec
from .base import Grads, parse_config_key, result_shape

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# A config chooser: (spec, dtype name, direction, kind, C, H, W) -> KernelConfig or None (use the default).
ConfigChooser = Callable[[Spec, str, str, str, int, int, int], Optional[rc.KernelConfig]]


def _dims(spec: Spec, x: torch.Tensor) -> tuple[int, int, int, int]:
    return image_dims(x.shape, spec.layout)


def saved_shape(spec: Spec, x: torch.Tensor) -> tuple[int, ...]:
    """The stored h: one frame-order image per (n, direction, channel)."""
    N, C, H, W = _dims(spec, x)
    D = spec.num_directions
    return (N, D, H * W, C) if spec.layout == "nhwc" else (N, D, C, H * W)


def _dtype_name(x: torch.Tensor, backend: str) -> str:
    name = DTYPE_NAMES.get(x.dtype)
    if name is None:
        raise TypeError(f"x: the {backend} backend stores fp32, fp16 or bf16, got {x.dtype}")
    return name


def _check_saved(spec: Spec, x: torch.Tensor, saved: torch.Tensor, backend: str) -> None:
    want = saved_shape(spec, x)
    if tuple(saved.shape) != want or saved.dtype != x.dtype or not saved.is_contiguous():
        raise ValueError(f"saved: expected the stored h of shape {want} and dtype {x.dtype} from the {backend} "
                         f"forward, got shape {tuple(saved.shape)} and dtype {saved.dtype}")


def _chunk_arg(spec: Spec) -> int:
    return int(spec.chunk) if spec.chunk is not None else 0  # 0: global scan


@dataclass(frozen=True)
class FusedLaunch:
    name: str
    grid: int
    block: int
    smem: int
    cpb: int
    tail: tuple[tuple[str, int], ...]  # the run-time arguments after the shape: cpb, d, rev, stepw, acc
    cluster: int = 1  # blocks per thread block cluster (cl=N)
    # ml=1's planning: the direction's (mapping, reverse, tuning, vec_ok), the parts of a one-launch name
    part: Optional[tuple] = None


# Side streams per thread and device: a thread capturing a CUDA graph must not share them with another
# thread running eagerly.
_SIDE_STREAMS = threading.local()


class _directions:
    """Context for one pass's launches: ``on_stream(d)`` puts direction d's launch on its own CUDA
    stream when ``concurrent`` (forked from and joined back into the current stream, so the caller's
    ordering, CUDA-graph capture and the caching allocator see one stream); otherwise, and on the CPU
    (the emulator), the current stream."""

    def __init__(self, device: torch.device, n: int, concurrent: bool):
        self.on = concurrent and device.type == "cuda"
        self.device = device
        self.n = n

    def __enter__(self):
        import contextlib

        if not self.on:
            return lambda d: contextlib.nullcontext()
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if not hasattr(_SIDE_STREAMS, "pools"):
            _SIDE_STREAMS.pools = {}
        pool = _SIDE_STREAMS.pools.setdefault(idx, [])
        while len(pool) < self.n:
            pool.append(torch.cuda.Stream(device=self.device))
        self.main = torch.cuda.current_stream(self.device)
        self.streams = pool[:self.n]
        for st in self.streams:
            st.wait_stream(self.main)  # inputs and outputs are ready
        return lambda d: torch.cuda.stream(self.streams[d])

    def __exit__(self, *exc):
        if self.on:
            for st in self.streams:
                self.main.wait_stream(st)  # everything later on the caller's stream sees the results
        return False


def left_right(spec: Spec) -> list[int]:
    """Indices of the directions that step along W (lr, rl): the ones tr=1 runs on transposed planes."""
    return [d for d, dn in enumerate(spec.directions) if DIRECTION_TABLE[dn].step_axis == "W"]


def transposed_as(direction: str) -> str:
    """The top/bottom direction a left/right one becomes on transposed planes (same step order)."""
    return "bt" if DIRECTION_TABLE[direction].reverse else "tb"


def _sum_into(out: torch.Tensor, parts: torch.Tensor) -> None:
    """out = the sum of parts over its first axis, accumulated in fp32 (16-bit storage)."""
    if parts.dtype in (torch.float16, torch.bfloat16):
        out.copy_(parts.sum(0, dtype=torch.float32))
    else:
        torch.sum(parts, 0, out=out)


class _CudaBase:
    def __init__(self, runner=None, poison: bool = False):
        self._runner = runner
        self.poison = poison  # tests: NaN-fill every output the kernels must write

    def _out(self, shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        if self.poison:
            return torch.full(tuple(shape), float("nan"), dtype=dtype, device=like.device)
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)

    @property
    def runner(self):
        if self._runner is None:
            from ..runtime.cuda_build import default_runner

            self._runner = default_runner()
        return self._runner

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        from ..runtime.cuda_build import cupy_available

        return cupy_available()

    skips_saved = True  # forward(..., need_saved=False): fused kernels without the h store

    def saved_shape(self, spec: Spec, x: torch.Tensor):
        return saved_shape(spec, x), x.dtype

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return "needs a CUDA device"
        from ..runtime.cuda_build import cuda_unavailable_reason

        return cuda_unavailable_reason()

    def _ready(self, x: torch.Tensor) -> str:
        dname = _dtype_name(x, self.name)
        if self._runner is None and not self.available(x.device):
            raise ValueError(f"x: the {self.name} backend needs a CUDA device and cupy, got device {x.device}")
        return dname

    def _check_grid(self, grid: int) -> int:
        """Called while planning, before any launch."""
        if grid > 2**31 - 1:
            raise ValueError(f"x: too large for one launch of the {self.name} backend ({grid} blocks)")
        return grid

    def _launch(self, device, source: str, name: str, names, grid: int, block: int, smem: int, args) -> None:
        if grid < 1:
            return
        kernel = self.runner.kernel(device, source, name, names)
        self.runner.launch(kernel, device, grid, block, smem, args)


def _variant(key: str) -> tuple[int, bool, bool, bool, int, bool]:
    """``"v=3"`` -> (3, False, False, False, 1, False), ``"cc=1"`` -> (0, True, False, False, 1, False),
    ``"tr=1"`` -> (0, False, True, False, 1, False), ``"oc=1"`` -> (0, False, False, True, 1, False),
    ``"cl=4"`` -> (0, False, False, False, 4, False), ``"ml=1"`` -> (0, False, False, False, 1, True),
    ``""`` -> all off (the default); ValueError naming ``backend`` otherwise."""
    if not key:
        return 0, False, False, False, 1, False
    fields = parse_config_key(key, "backend")
    ok = (set(fields) <= {"v", "cc", "tr", "oc", "cl", "ml"} and fields.get("v", "0").isdigit()
          and all(fields.get(f, "1") in ("0", "1") for f in ("cc", "tr", "oc", "ml"))
          and fields.get("cl", "1") in ("1",) + tuple(str(c) for c in rc.CLUSTER_SIZES))
    if not ok:
        raise ValueError(f"backend: a cuda config key is 'v=<index of the tuning>', 'cc=1' (directions run "
                         f"concurrently), 'tr=1' (left/right scans on transposed planes), 'oc=1' (forward: "
                         f"every direction in one block per plane, y on chip), 'cl=2|4|8' (each line split "
                         f"over a thread block cluster, sm_90+) and/or 'ml=1' (every direction in one launch), "
                         f"got {key!r}")
    return (int(fields.get("v", "0")), fields.get("cc") == "1", fields.get("tr") == "1", fields.get("oc") == "1",
            int(fields.get("cl", "1")), fields.get("ml") == "1")


class CudaBackend(_CudaBase):
    """The fused kernels. ``configs`` may choose the tuning per direction (an autotuner's hook)."""

    name = "cuda"

    def __init__(self, runner=None, configs: ConfigChooser | None = None, poison: bool = False,
                 concurrent: tuple[str, ...] = (), transposed: bool = False, transposed_bwd: bool = False,
                 onchip: bool = False, one_launch: tuple[str, ...] = ()):
        super().__init__(runner, poison)
        self.configs = configs
        # passes ("fwd", "bwd") whose directions run at the same time (see _directions)
        self.concurrent = tuple(concurrent)
        # lr/rl on transposed planes with the lanes mapping (tr=1; see _forward_transposed), per pass
        self.transposed = bool(transposed)
        self.transposed_bwd = bool(transposed_bwd)
        # forward: every direction in one block per plane, y in shared memory (oc=1; see _forward_onchip)
        self.onchip = bool(onchip)
        # passes whose directions run in one launch, each into its own slice (ml=1; see _plan_one_launch)
        self.one_launch = tuple(one_launch)

    # -- the config protocol -------------------------------------------------
    # Key "v=i": the i-th tuning of render.cuda.candidate_configs for every
    # direction of the pass (the default where a direction has fewer), so a
    # key is re-planned for each shape and never names a tuning that does not fit it.
    # Key "cc=1" (alone or with v=i): the directions run concurrently, each into its own slice of a
    # temporary that is summed afterwards, instead of one after another into the output (read-add-write).
    # It costs two planes of traffic per pass (six in 16-bit storage: an fp32 sum, then a copy); it pays
    # where one direction's launch leaves most SMs idle (small images, few channels), which the static
    # model predicts (perfmodel.predict_group) and only a measurement decides.
    # Key "cl=N" (N = 2, 4, 8; alone, with cc=1 or tr=1): each nchw line split over a cluster of N blocks that
    # exchange their edge lanes through distributed shared memory (sm_90+; rc.cluster_config), N times the
    # blocks of the launch for the same work: for small images and long single-image lines, where one block
    # per (n, channel tile) leaves SMs idle. Lines too short for it keep the default tuning.
    # Key "ml=1" (alone, with cl=N or v=i): every direction of the pass in one launch, each writing its own
    # slice of a temporary that is summed afterwards (as cc=1, without side streams): D times the blocks of
    # one launch, and one launch instead of D. Where the directions' tunings differ in threads per block or
    # cluster size the plan refuses the key (_plan_one_launch).
    def candidates(self, spec: Spec, dtype: str, pass_: str, shape) -> list[str]:
        _, C, H, W = shape
        kind = "fwd" if pass_ == "fwd" else "bwd"
        n = max(len(rc.candidate_configs(spec, dtype, dn, kind, C, H, W)) for dn in spec.directions)
        cc = ["cc=1"] if self.concurrency_applies(spec, kind) else []
        tr = ["tr=1"] if self.transpose_applies(spec, kind, dtype, C) else []
        oc = ["oc=1"] if kind == "fwd" and rc.onchip_plan(spec, dtype, H, W) is not None else []
        cl, seen = [], set()
        for c in rc.CLUSTER_SIZES:  # a key only where it splits some line, and differently from a smaller key
            plan = tuple(rc.cluster_config(spec, dtype, dn, kind, C, H, W, c) for dn in spec.directions)
            if any(plan) and plan not in seen:
                cl.append(f"cl={c}")
            seen.add(plan)
        ml = []
        if self.one_launch_applies(spec):
            for key in [""] + cl:
                try:
                    be = self.with_config(*(((key + ",ml=1").lstrip(","),) * 2))
                    be._plan_one_launch(spec, dtype, kind, (1, C, H, W), [], False, (132, 227 * 1024))
                except ValueError:
                    continue
                ml.append((key + ",ml=1").lstrip(","))
        return [""] + cc + tr + oc + cl + ml + [f"v={i}" for i in range(1, n)]

    @staticmethod
    def one_launch_applies(spec: Spec) -> bool:
        """ml=1: several directions to put in one launch."""
        return spec.num_directions > 1

    @staticmethod
    def transpose_applies(spec: Spec, kind: str = "fwd", dtype: str = "fp32", C: int = 0) -> bool:
        """nchw with a left/right direction: their rows can be transposed into top/bottom scans. The
        backward's shared-weight gradients are fp32 atomic sums, which the transpose kernel (storage type)
        moves only when the storage is fp32."""
        ok = spec.layout == "nchw" and any(DIRECTION_TABLE[dn].step_axis == "W" for dn in spec.directions)
        return ok and (kind == "fwd" or dtype == "fp32" or (C > 0 and spec.groups(C) == C))

    @staticmethod
    def concurrency_applies(spec: Spec, kind: str) -> bool:
        """Several directions, and an output they would otherwise accumulate into (stack's forward
        writes one slice per direction: nothing to sum)."""
        return spec.num_directions > 1 and (kind == "bwd" or spec.merge != "stack")

    def with_config(self, fwd: str = "", bwd: str = "") -> "CudaBackend":
        picks = {"fwd": _variant(fwd), "bwd": _variant(bwd)}

        for key, pk in ((fwd, picks["fwd"]), (bwd, picks["bwd"])):
            if pk[1] and pk[2]:
                raise ValueError(f"backend: cc=1 and tr=1 do not combine (the transposed pass runs its directions "
                                 f"in order), got {key!r}")
            if pk[5] and (pk[1] or pk[2]):
                raise ValueError(f"backend: ml=1 runs the directions at once in one launch; it does not combine "
                                 f"with cc=1 or tr=1, got {key!r}")
            if pk[3] and (pk[0] or pk[1] or pk[2] or pk[4] > 1 or pk[5]):
                raise ValueError(f"backend: oc=1 combines with nothing (one kernel runs every direction with its "
                                 f"own tunings), got {key!r}")
            if pk[4] > 1 and pk[0]:
                raise ValueError(f"backend: cl=N replans each line for its share of the cluster and does not "
                                 f"combine with v=i, got {key!r}")
        if picks["bwd"][3]:
            raise ValueError(f"backend: oc=1 is a forward tuning (the backward keeps one launch per direction), "
                             f"got {bwd!r} for the backward")

        def chooser(spec, dname, direction, kind, C, H, W):
            i, cl = picks[kind][0], picks[kind][4]
            if picks[kind][5] and not i:  # ml=1: tunings of the same threads per block (and cluster size)
                ml = rc.one_launch_configs(spec, dname, kind, C, H, W, cl)
                if ml is None:
                    raise ValueError(f"backend: ml=1 runs every direction in one launch, which needs tunings of "
                                     f"the same threads per block{' and cluster size' if cl > 1 else ''} for all "
                                     f"of them; none fit at {C} channels of {H} x {W}")
                return ml[direction]
            if cl > 1:  # None (the default) for a line too short to split or nhwc
                return rc.cluster_config(spec, dname, direction, kind, C, H, W, cl)
            if not i:
                return None
            options = rc.candidate_configs(spec, dname, direction, kind, C, H, W)
            return options[i] if i < len(options) else None

        return CudaBackend(self._runner, chooser, self.poison, tuple(k for k in ("fwd", "bwd") if picks[k][1]),
                           picks["fwd"][2], picks["bwd"][2], picks["fwd"][3],
                           tuple(k for k in ("fwd", "bwd") if picks[k][5]))

    # -- planning ------------------------------------------------------------
    def config(self, spec: Spec, dname: str, direction: str, kind: str, C: int, H: int, W: int,
               smem_limit: int) -> rc.KernelConfig:
        cfg = self.configs(spec, dname, direction, kind, C, H, W) if self.configs is not None else None
        if cfg is None:
            cfg = rc.default_config(spec, dname, direction, kind, C, H, W, smem_limit)
        return cfg

    def plan(self, spec: Spec, dname: str, kind: str, d: int, dims: tuple[int, int, int, int],
             tensors: list[Optional[torch.Tensor]], acc: bool, watom: bool,
             limits: tuple[int, int], save_h: bool = True, as_dir: Optional[str] = None,
             device: Optional[torch.device] = None) -> FusedLaunch:
        """Instantiation, grid and shared memory of one direction's fused kernel. ``as_dir``: run direction
        d as this one (tr=1: lr/rl as tb/bt on transposed planes, ``dims`` transposed). ``device``: the
        tensors' (default: the first tensor's); without either (the static model's planning for a named GPU)
        the runner is not asked whether the GPU has clusters."""
        N, C, H, W = dims
        direction = as_dir or spec.directions[d]
        sm_count, smem_limit = limits
        cfg = self.config(spec, dname, direction, kind, C, H, W, smem_limit)
        mapping = rc.thread_map(spec, direction)
        cfg.check(mapping)
        L, T = (H, W) if DIRECTION_TABLE[direction].step_axis == "W" else (W, H)
        if cfg.lanes_covered(mapping) < L:
            raise ValueError(f"config {cfg}: covers {cfg.lanes_covered(mapping)} lanes, the line has {L}")
        if cfg.cluster > 1 and (cfg.cluster - 1) * cfg.nseg * cfg.lanes_per_segment(mapping) >= L:
            raise ValueError(f"config {cfg}: the last block of each cluster would own no lane of a line of {L}")
        device = device if device is not None else next((t.device for t in tensors if t is not None), None)
        if cfg.cluster > 1 and device is not None:
            has = getattr(self.runner, "clusters", None)
            if has is None or not has(device):
                raise ValueError(f"config {cfg}: thread block clusters (cl={cfg.cluster}) need a GPU of compute "
                                 f"capability 9.0 or newer")
        if cfg.stage and (mapping != rc.STEPS or kind != "fwd"):
            raise ValueError(f"config {cfg}: sector tiles (stage) serve the forward of the steps mapping only")
        vec = self._vec_ok(spec, dname, mapping, cfg.vec, C, L, T, tensors)
        if cfg.ring and (not vec or not 4 <= cfg.vec * rc.ELEM_BYTES[dname] <= 16):
            # the cp.async ring copies whole vectors of 4 to 16 bytes: otherwise (unaligned tensors, a wider
            # run) the same tuning runs from registers
            cfg = replace(cfg, ring=False)
        smem = rc.smem_bytes(spec, kind, mapping, cfg, rc.ELEM_BYTES[dname])
        if smem > smem_limit:
            raise ValueError(f"x: the {self.name} backend needs {smem} bytes of shared memory per block for "
                             f"lines of {L} lanes, the GPU offers {smem_limit}; use backend='triton' or 'reference'")
        cpb, grid = rc.chunks_per_block(spec, direction, N, C, H, W, cfg, sm_count)
        geo = DIRECTION_TABLE[direction]
        name = rc.fused_name(kind, mapping, geo.reverse, cfg, vec, watom, save_h)
        tail = (("i32", cpb), ("i32", d), ("i32", int(geo.reverse)), ("i32", int(geo.step_axis == "W")),
                ("i32", int(acc)))
        return self.check_launch(spec, FusedLaunch(name, grid, cfg.threads, smem, cpb, tail, cfg.cluster,
                                                   (mapping, geo.reverse, cfg, vec)), d, smem_limit)

    def _plan_one_launch(self, spec: Spec, dname: str, kind: str, dims: tuple[int, int, int, int],
                         tensors: list[Optional[torch.Tensor]], watom: bool, limits: tuple[int, int],
                         save_h: bool = True, device: Optional[torch.device] = None,
                         slices: bool = True) -> tuple[FusedLaunch, list[tuple[FusedLaunch, int]]]:
        """ml=1: one launch of every direction of the pass (gspn_{fwd,bwd}_ml in the fused template). Each
        direction keeps its own tuning (plan), all with the same threads per block and cluster size (else a
        ValueError naming ``backend``); one chunks-per-block for all (rc.one_launch_cpb), direction d's blocks
        after those of the directions before it. ``slices``: each direction writes its own slice of the
        output (y, or gx), summed by the caller (False: stack's forward, whose directions write their own
        slices of y anyway). Returns the launch and, per direction, its own plan and its blocks."""
        N, C, H, W = dims
        sm_count, smem_limit = limits
        own = [self.plan(spec, dname, kind, d, dims, tensors, acc=False, watom=watom, limits=limits,
                         save_h=save_h, device=device) for d in range(spec.num_directions)]
        t0, c0 = own[0].block, own[0].cluster
        if any(p.block != t0 or p.cluster != c0 for p in own):
            got = ", ".join(f"{dn}: {p.block} threads, cluster {p.cluster}" for dn, p in zip(spec.directions, own))
            raise ValueError(f"backend: ml=1 runs every direction in one launch, which needs the same threads per "
                             f"block and cluster size for all of them; the tunings at this shape have {got}")
        cfgs = [p.part[2] for p in own]
        cpb = rc.one_launch_cpb(spec, N, C, H, W, cfgs, sm_count)
        blocks = [rc.direction_blocks(spec, dn, N, C, H, W, cfg, cpb) for dn, cfg in zip(spec.directions, cfgs)]
        name = rc.one_launch_name(kind, [p.part for p in own], save_h if kind == "fwd" else watom)
        smem = max(p.smem for p in own)
        tail = (("i32", cpb), ("i32", -1), ("i32", 0), ("i32", 0), ("i32", int(slices)))
        launch = FusedLaunch(name, self._check_grid(sum(blocks)), t0, smem, cpb, tail, c0)
        return self.check_launch(spec, launch, 0, smem_limit), list(zip(own, blocks))

    def check_launch(self, spec: Spec, p: FusedLaunch, d: int, smem_limit: int) -> FusedLaunch:
        """Everything the fused kernels would refuse (with a device trap) checked on the host, before any
        launch: a clear ValueError instead of a failed launch or unwritten outputs."""
        what = f"x: the {self.name} backend cannot launch {p.name}"
        if not (p.block % 32 == 0 or (p.cluster > 1 and p.block == 16)) or not 16 <= p.block <= 1024:
            raise ValueError(f"{what}: {p.block} threads per block (a multiple of 32, at most 1024; 16 in a "
                             f"cluster)")
        if p.cpb < 1:
            raise ValueError(f"{what}: {p.cpb} chunks per block")
        if not 0 <= d < spec.num_directions:
            raise ValueError(f"{what}: direction {d} of {spec.num_directions}")
        if p.smem > smem_limit:
            raise ValueError(f"{what}: it needs {p.smem} bytes of shared memory per block, the GPU offers "
                             f"{smem_limit}; use backend='triton' or 'reference'")
        self._check_grid(p.grid)
        return p

    @staticmethod
    def _vec_ok(spec: Spec, dname: str, mapping: int, v: int, C: int, L: int, T: int,
                tensors: list[Optional[torch.Tensor]]) -> bool:
        """Whole-vector accesses are legal: runs never straddle a row and every base is aligned."""
        if v == 1:
            return False
        axis = {rc.LANES: L, rc.STEPS: T, rc.CHAN: C}[mapping]
        if axis % v:
            return False
        align = v * rc.ELEM_BYTES[dname]
        return all(t.data_ptr() % align == 0 for t in tensors if t is not None)

    # -- passes --------------------------------------------------------------
    def forward(self, spec: Spec, x, w, lam, u, s, m, need_saved: bool = True):
        """``need_saved=False`` (no input needs a gradient): kernels that never store h; saved is empty."""
        dname = self._ready(x)
        dims = N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        y = self._out(result_shape(spec, x), x)
        saved = self._out(saved_shape(spec, x), x) if need_saved else x.new_empty((0,))
        source = rc.kernel_source(spec, dname)
        limits = self.runner.limits(x.device)
        if self.transposed and self.transpose_applies(spec):
            self._forward_transposed(spec, dname, source, limits, x, w, lam, u, s, m, y, saved, need_saved)
            return y, saved
        if self.onchip:
            oc = rc.onchip_plan(spec, dname, H, W, limits[1])
            if oc is not None:
                self._forward_onchip(spec, dname, source, oc, x, w, lam, u, s, m, y, saved, need_saved)
                return y, saved
        vec_tensors = [x, w, lam, u, s, y] + ([saved] if need_saved else [])
        stack = spec.merge == "stack"
        if "fwd" in self.one_launch and self.one_launch_applies(spec):
            # ml=1: one launch; each direction into its own slice of ys (stack: of y), summed below
            p, _ = self._plan_one_launch(spec, dname, "fwd", dims, vec_tensors, False, limits, need_saved,
                                         x.device, slices=not stack)
            ys = None if stack else self._out((spec.num_directions,) + tuple(y.shape), x)
            args = [("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m),
                    ("out", y if stack else ys), ("out", saved), ("i32", N), ("i32", C), ("i32", G), ("i32", H),
                    ("i32", W), ("i32", _chunk_arg(spec)), *p.tail]
            self._launch(x.device, source, p.name, [p.name], p.grid, p.block, p.smem, args)
            if not stack:
                _sum_into(y, ys)
            return y, saved
        plans = [self.plan(spec, dname, "fwd", d, dims, vec_tensors, acc=not stack and d > 0, watom=False,
                           limits=limits, save_h=need_saved) for d in range(spec.num_directions)]
        names = [p.name for p in plans]
        cc = "fwd" in self.concurrent and self.concurrency_applies(spec, "fwd")
        ys = self._out((spec.num_directions,) + tuple(y.shape), x) if cc else None
        with _directions(x.device, spec.num_directions, cc) as on_stream:
            for d, p in enumerate(plans):
                # concurrent: direction d writes its own slice (no accumulation), summed below
                yd, tail = (ys[d], p.tail[:-1] + (("i32", 0),)) if cc else (y, p.tail)
                args = [("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m), ("out", yd),
                        ("out", saved), ("i32", N), ("i32", C), ("i32", G), ("i32", H), ("i32", W),
                        ("i32", _chunk_arg(spec)), *tail]
                with on_stream(d):
                    self._launch(x.device, source, p.name, names, p.grid, p.block, p.smem, args)
        if cc:
            _sum_into(y, ys)
        return y, saved

    def _forward_onchip(self, spec: Spec, dname: str, source: str, oc, x, w, lam, u, s, m, y, saved,
                        need_saved: bool) -> None:
        """oc=1: one launch, one block per (n, channel) plane running every direction with y in shared
        memory (gspn_fwd_oc in templates/cuda/fused.cuh.j2). Where the plane does not fit, forward() runs the
        launch-per-direction path instead."""
        N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        tensors = [x, w, lam, u, s, y] + ([saved] if need_saved else [])
        align = max(oc.lanes.vec, oc.steps.vec) * rc.ELEM_BYTES[dname]
        aligned = all(t.data_ptr() % align == 0 for t in tensors if t is not None)
        plan = rc.OnChipPlan(oc.lanes, oc.steps, oc.vec_lanes and aligned, oc.vec_steps and aligned, oc.smem,
                             oc.threads)
        name = plan.name(need_saved)
        cpb = max(-(-T // (spec.chunk if spec.chunk else T)) for T in (H, W))  # every chunk in the block
        grid = self._check_grid(N * C)
        if plan.threads % 32 or not 32 <= plan.threads <= 1024:
            raise ValueError(f"x: the {self.name} backend cannot launch {name}: {plan.threads} threads per block")
        args = [("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m), ("out", y), ("out", saved),
                ("i32", N), ("i32", C), ("i32", G), ("i32", H), ("i32", W), ("i32", _chunk_arg(spec)),
                ("i32", cpb), ("i32", -1), ("i32", 0), ("i32", 0), ("i32", 0)]  # d = -1: every direction
        self._launch(x.device, source, name, [name], grid, plan.threads, plan.smem, args)

    def _forward_transposed(self, spec: Spec, dname: str, source: str, limits, x, w, lam, u, s, m, y, saved,
                            need_saved: bool) -> None:
        """tr=1: top/bottom directions as usual into y; left/right ones as top/bottom scans of transposed
        planes (their inputs transposed once, x shared), into a transposed output that is added back.
        h goes to ``saved`` in the frame order the backward reads (t along W, lanes along H either way)."""
        N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        D = spec.num_directions
        stack = spec.merge == "stack"
        chunk = _chunk_arg(spec)
        side = left_right(spec)
        rest = [d for d in range(D) if d not in side]
        xT = self._out((N, C, W, H), x)
        # Full-size buffers, of which only the left/right slices are written and read: the kernel addresses
        # direction d's slice with the whole tensor's strides. That is memory (at 16x8x1024^2 fp32, about
        # 13 GB beside the inputs), not traffic; the autotuner rejects tr=1 where it does not fit.
        wT = torch.empty_like(w)
        lamT = torch.empty_like(lam)
        uT = torch.empty_like(u) if u is not None else None
        sT = torch.empty_like(s) if s is not None else None
        yT = self._out(y.shape if stack else (N, C, W, H), x)
        tr_names = [rc.transpose_name(False), rc.transpose_name(True)]
        plans = {}
        for i, d in enumerate(rest):
            plans[d] = self.plan(spec, dname, "fwd", d, (N, C, H, W), [x, w, lam, u, s, y, saved],
                                 acc=not stack and i > 0, watom=False, limits=limits, save_h=need_saved)
        for i, d in enumerate(side):
            as_dir = transposed_as(spec.directions[d])
            plans[d] = self.plan(spec, dname, "fwd", d, (N, C, W, H), [xT, wT, lamT, uT, sT, yT, saved],
                                 acc=not stack and i > 0, watom=False, limits=limits, save_h=need_saved,
                                 as_dir=as_dir)
        names = [p.name for p in plans.values()] + tr_names

        def launch(d, xx, ww, ll, uu, ss, yy, h_, w_):
            p = plans[d]
            self._launch(x.device, source, p.name, names, p.grid, p.block, p.smem,
                         [("in", xx), ("in", ww), ("in", ll), ("in", uu), ("in", ss), ("in", m), ("out", yy),
                          ("out", saved), ("i32", N), ("i32", C), ("i32", G), ("i32", h_), ("i32", w_),
                          ("i32", chunk), *p.tail])

        for d in rest:
            launch(d, x, w, lam, u, s, y, H, W)
        self._transpose(x.device, source, names, x, xT, 1, N * C, 0, 0, H, W)
        for d in side:
            for t, tt in ((w, wT), (lam, lamT), (u, uT), (s, sT)):
                self._transpose_slice(x.device, source, names, t, tt, d, H, W)
            launch(d, xT, wT, lamT, uT, sT, yT, W, H)  # the transposed image: W rows of H lanes
            if stack:
                self._transpose_slice(x.device, source, names, yT, y, d, W, H)
        if not stack:
            self._transpose(x.device, source, names, yT, y, 1, N * C, 0, 0, W, H, acc=bool(rest))  # y (+)= yT^T

    def _transpose(self, device, source: str, names, src, dst, nb1: int, nb2: int, s1: int, p0: int, R: int,
                   Cc: int, acc: bool = False) -> None:
        """dst plane^T (+)= src plane for planes (b1, b2) at p0 + b1 * s1 + b2 in both tensors (R x Cc in src)."""
        grid = nb1 * nb2 * -(-R // 32) * -(-Cc // 32)
        self._launch(device, source, rc.transpose_name(acc), names, self._check_grid(grid), rc.TR_THREADS,
                     rc.TR_SMEM, [("in", src), ("out", dst), ("i32", nb1), ("i32", nb2), ("i32", s1), ("i32", s1),
                                  ("i32", p0), ("i32", p0), ("i32", R), ("i32", Cc)])

    def _transpose_slice(self, device, source: str, names, src, dst, d: int, R: int, Cc: int) -> None:
        """Direction d's slice of a per-direction tensor (N, D, ..., R, Cc: w, lam, u, s, a stacked y or gy,
        or their gradients) transposed into the same slice of dst; None (an unused tensor) is skipped."""
        if src is None:
            return
        N, D = src.shape[0], src.shape[1]
        per = src[0, 0].numel() // (R * Cc)  # planes per (n, d): K x G for w, C for the others
        self._transpose(device, source, names, src, dst, N, per, D * per, d * per, R, Cc)

    def _backward_transposed(self, spec: Spec, dname: str, source: str, limits, gy, x, w, lam, u, s, m, saved,
                             gx, glam, gu, gs, gw, gm32, watom: bool) -> None:
        """tr=1 backward: top/bottom directions as usual; left/right ones as top/bottom adjoint scans of
        transposed planes (gy, x and the direction's inputs transposed in; gx added back, the direction's
        own gradients transposed back into their slices). The saved h is read in frame order as always."""
        N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        D = spec.num_directions
        stack = spec.merge == "stack"
        chunk = _chunk_arg(spec)
        side = left_right(spec)
        rest = [d for d in range(D) if d not in side]
        xT = self._out((N, C, W, H), x)
        gyT = torch.empty_like(gy) if stack else self._out((N, C, W, H), gy)
        wT, lamT = torch.empty_like(w), torch.empty_like(lam)  # full size, side slices only (as the forward)
        uT = torch.empty_like(u) if u is not None else None
        sT = torch.empty_like(s) if s is not None else None
        gxT = self._out((N, C, W, H), x)
        glamT = torch.empty_like(glam)
        guT = torch.empty_like(gu) if gu is not None else None
        gsT = torch.empty_like(gs) if gs is not None else None
        gwT = torch.zeros_like(gw) if watom else torch.empty_like(gw)  # watom: fp32 atomic sums
        plans = {}
        for i, d in enumerate(rest):
            plans[d] = self.plan(spec, dname, "bwd", d, (N, C, H, W), [gy, x, w, lam, u, s, saved, gx, glam, gu, gs]
                                 + ([] if watom else [gw]), acc=i > 0, watom=watom, limits=limits)
        for i, d in enumerate(side):
            as_dir = transposed_as(spec.directions[d])
            plans[d] = self.plan(spec, dname, "bwd", d, (N, C, W, H), [gyT, xT, wT, lamT, uT, sT, saved, gxT, glamT,
                                                                      guT, gsT] + ([] if watom else [gwT]),
                                 acc=i > 0, watom=watom, limits=limits, as_dir=as_dir)
        names = [p.name for p in plans.values()] + [rc.transpose_name(False), rc.transpose_name(True)]

        def launch(d, ins, outs, h_, w_):
            p = plans[d]
            args = ([("in", t) for t in ins[:6]] + [("in", m), ("in", saved)] + [("out", t) for t in outs[:4]]
                    + [("vptr", outs[4]), ("f32", gm32), ("i32", N), ("i32", C), ("i32", G), ("i32", h_),
                       ("i32", w_), ("i32", chunk), *p.tail])
            self._launch(x.device, source, p.name, names, p.grid, p.block, p.smem, args)

        for d in rest:
            launch(d, (gy, x, w, lam, u, s), (gx, glam, gu, gs, gw), H, W)
        self._transpose(x.device, source, names, x, xT, 1, N * C, 0, 0, H, W)
        if not stack:
            self._transpose(x.device, source, names, gy, gyT, 1, N * C, 0, 0, H, W)
        for d in side:
            for t, tt in ((gy if stack else None, gyT), (w, wT), (lam, lamT), (u, uT), (s, sT)):
                self._transpose_slice(x.device, source, names, t, tt, d, H, W)
            launch(d, (gyT, xT, wT, lamT, uT, sT), (gxT, glamT, guT, gsT, gwT), W, H)
            # this direction's own gradients back into their slices (the transposed image is W x H)
            for t, tt in ((gwT, gw), (glamT, glam), (guT, gu), (gsT, gs)):
                self._transpose_slice(x.device, source, names, t, tt, d, W, H)
        self._transpose(x.device, source, names, gxT, gx, 1, N * C, 0, 0, W, H, acc=bool(rest))  # gx (+)= gxT^T

    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved) -> Grads:
        dname = self._ready(x)
        _check_saved(spec, x, saved, self.name)
        dims = N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        watom = G != C  # weights shared by several channels: fp32 atomic sums
        gx = self._out(x.shape, x)
        glam = self._out(lam.shape, lam)
        gu = self._out(u.shape, u) if u is not None else None
        gs = self._out(s.shape, s) if s is not None else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if watom else self._out(w.shape, w)
        gm32 = torch.zeros(spec.num_directions, dtype=torch.float32, device=x.device) if m is not None else None
        source = rc.kernel_source(spec, dname)
        limits = self.runner.limits(x.device)
        if self.transposed_bwd and self.transpose_applies(spec, "bwd", dname, C):
            self._backward_transposed(spec, dname, source, limits, gy, x, w, lam, u, s, m, saved, gx, glam, gu, gs,
                                      gw, gm32, watom)
            if watom:
                gw = gw.to(x.dtype)
            return gx, gw, glam, gu, gs, (gm32.to(m.dtype) if m is not None else None)
        vec_tensors = [gy, x, w, lam, u, s, saved, gx, glam, gu, gs] + ([] if watom else [gw])
        if "bwd" in self.one_launch and self.one_launch_applies(spec):
            # ml=1: one launch; each direction into its own slice of gxs, summed below
            p, _ = self._plan_one_launch(spec, dname, "bwd", dims, vec_tensors, watom, limits, device=x.device)
            gxs = self._out((spec.num_directions,) + tuple(gx.shape), x)
            args = [("in", gy), ("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m),
                    ("in", saved), ("out", gxs), ("out", glam), ("out", gu), ("out", gs), ("vptr", gw),
                    ("f32", gm32), ("i32", N), ("i32", C), ("i32", G), ("i32", H), ("i32", W),
                    ("i32", _chunk_arg(spec)), *p.tail]
            self._launch(x.device, source, p.name, [p.name], p.grid, p.block, p.smem, args)
            _sum_into(gx, gxs)
            if watom:
                gw = gw.to(x.dtype)
            return gx, gw, glam, gu, gs, (gm32.to(m.dtype) if m is not None else None)
        plans = [self.plan(spec, dname, "bwd", d, dims, vec_tensors, acc=d > 0, watom=watom, limits=limits)
                 for d in range(spec.num_directions)]
        names = [p.name for p in plans]
        cc = "bwd" in self.concurrent and self.concurrency_applies(spec, "bwd")
        gxs = self._out((spec.num_directions,) + tuple(gx.shape), x) if cc else None
        with _directions(x.device, spec.num_directions, cc) as on_stream:
            for d, p in enumerate(plans):
                gxd, tail = (gxs[d], p.tail[:-1] + (("i32", 0),)) if cc else (gx, p.tail)
                args = [("in", gy), ("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m),
                        ("in", saved), ("out", gxd), ("out", glam), ("out", gu), ("out", gs), ("vptr", gw),
                        ("f32", gm32), ("i32", N), ("i32", C), ("i32", G), ("i32", H), ("i32", W),
                        ("i32", _chunk_arg(spec)), *tail]
                with on_stream(d):
                    self._launch(x.device, source, p.name, names, p.grid, p.block, p.smem, args)
        if cc:
            _sum_into(gx, gxs)
        if watom:
            gw = gw.to(x.dtype)
        gm = gm32.to(m.dtype) if m is not None else None
        return gx, gw, glam, gu, gs, gm

    def kernel_names(self, spec: Spec, dname: str, dims: tuple[int, int, int, int],
                     limits: tuple[int, int], device: Optional[torch.device] = None) -> list[str]:
        """Every fused instantiation a forward (with and without the h store) and a backward at this shape
        launch, with aligned tensors (for building ahead); ``device``: refuse tunings it cannot run."""
        N, C, H, W = dims
        watom = spec.groups(C) != C
        names = []
        for kind, save_h in (("fwd", True), ("fwd", False), ("bwd", True)):
            if kind in self.one_launch and self.one_launch_applies(spec):  # ml=1: the one launch only
                names.append(self._plan_one_launch(spec, dname, kind, dims, [], watom and kind == "bwd", limits,
                                                   save_h, device)[0].name)
                continue
            for d in range(spec.num_directions):
                p = self.plan(spec, dname, kind, d, dims, [], acc=False, watom=watom and kind == "bwd", limits=limits,
                              save_h=save_h, device=device)
                names.append(p.name)
        oc = rc.onchip_plan(spec, dname, H, W, limits[1]) if self.onchip else None
        if oc is not None:
            names += [oc.name(True), oc.name(False)]
        return list(dict.fromkeys(names))


    def prebuild(self, spec: Spec, shape: tuple[int, ...], dtype: torch.dtype, device) -> list[str]:
        """Build, now, every kernel a forward and a backward on x of ``shape`` (the spec's layout) will
        launch, in one NVRTC build; later calls find them built (CupyRunner keeps them per process).
        Returns the kernel names."""
        device = torch.device(device)
        dname = DTYPE_NAMES.get(dtype)
        if dname is None:
            raise TypeError(f"dtype: the {self.name} backend stores fp32, fp16 or bf16, got {dtype}")
        if len(shape) != 4:
            raise ValueError(f"shape: expected x's 4-d shape, got {tuple(shape)}")
        N, a, b, c = (int(v) for v in shape)
        dims = (N, c, a, b) if spec.layout == "nhwc" else (N, a, b, c)
        names = self.kernel_names(spec, dname, dims, self.runner.limits(device), device)
        self.runner.kernel(device, rc.kernel_source(spec, dname), names[0], names)
        return names


class CudaPerStepBackend(_CudaBase):
    """GSPN-1's launch structure: one launch per scan step (all directions), for benchmarks only."""

    name = "cuda_per_step"

    def candidates(self, spec: Spec, dtype: str, pass_: str, shape) -> list[str]:
        return [""]  # a benchmark baseline: never a tuning candidate, one configuration

    def with_config(self, fwd: str = "", bwd: str = ""):
        if fwd or bwd:
            raise ValueError(f"backend: {self.name!r} has no configurations, got {fwd!r}|{bwd!r}")
        return self

    @staticmethod
    def _steps(spec: Spec, H: int, W: int) -> int:
        """Launches per pass: the longest chunk over the directions."""
        most = 0
        for dn in spec.directions:
            T = W if DIRECTION_TABLE[dn].step_axis == "W" else H
            most = max(most, min(spec.chunk, T) if spec.chunk is not None else T)
        return most

    def _step_grid(self, spec: Spec, N: int, C: int, H: int, W: int) -> int:
        lm = max(H, W)
        nchm = -(-lm // spec.chunk) if spec.chunk is not None else 1
        return self._check_grid(-(-(spec.num_directions * N * C * lm * nchm) // rc.PS_THREADS))

    def forward(self, spec: Spec, x, w, lam, u, s, m, need_saved: bool = True):
        """The merge launch reads h, so it is always written; returned empty when not needed."""
        dname = self._ready(x)
        N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        y = self._out(result_shape(spec, x), x)
        saved = self._out(saved_shape(spec, x), x)
        source = rc.kernel_source(spec, dname)
        kn = rc.per_step_names(G != C)
        names = list(kn.values())
        grid = self._step_grid(spec, N, C, H, W)
        pixel_grid = self._check_grid(-(-x.numel() // rc.PS_THREADS))
        for step in range(self._steps(spec, H, W)):
            args = [("in", x), ("in", w), ("in", lam), ("out", saved), ("i32", N), ("i32", C), ("i32", G),
                    ("i32", H), ("i32", W), ("i32", _chunk_arg(spec)), ("i32", step)]
            self._launch(x.device, source, kn["ps_fwd"], names, grid, rc.PS_THREADS, 0, args)
        args = [("in", x), ("in", u), ("in", s), ("in", m), ("in", saved), ("out", y),
                ("i32", N), ("i32", C), ("i32", H), ("i32", W)]
        self._launch(x.device, source, kn["ps_merge"], names, pixel_grid, rc.PS_THREADS, 0, args)
        return y, (saved if need_saved else saved.new_empty((0,)))

    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved) -> Grads:
        dname = self._ready(x)
        _check_saved(spec, x, saved, self.name)
        N, C, H, W = _dims(spec, x)
        G = spec.groups(C)
        watom = G != C
        source = rc.kernel_source(spec, dname)
        kn = rc.per_step_names(watom)
        names = list(kn.values())
        f32 = dict(dtype=torch.float32, device=x.device)
        gh32 = self._out(saved.shape, x, torch.float32)  # gh of every pixel and direction, frame order
        gx32 = self._out(x.shape, x, torch.float32)
        gm32 = torch.zeros(spec.num_directions, **f32) if m is not None else None
        glam = self._out(lam.shape, lam)
        gu = self._out(u.shape, u) if u is not None else None
        gs = self._out(s.shape, s) if s is not None else None
        gw = torch.zeros(w.shape, **f32) if watom else self._out(w.shape, w)
        grid = self._step_grid(spec, N, C, H, W)
        pixel_grid = self._check_grid(-(-x.numel() // rc.PS_THREADS))
        args = [("in", gy), ("in", x), ("in", u), ("in", s), ("in", m), ("in", saved), ("out", gu), ("out", gs),
                ("f32", gh32), ("f32", gx32), ("f32", gm32), ("i32", N), ("i32", C), ("i32", H), ("i32", W)]
        self._launch(x.device, source, kn["ps_bwd_out"], names, pixel_grid, rc.PS_THREADS, 0, args)
        for step in reversed(range(self._steps(spec, H, W))):
            args = [("in", x), ("in", w), ("in", lam), ("in", saved), ("out", glam), ("vptr", gw), ("f32", gh32),
                    ("f32", gx32), ("i32", N), ("i32", C), ("i32", G), ("i32", H), ("i32", W),
                    ("i32", _chunk_arg(spec)), ("i32", step)]
            self._launch(x.device, source, kn["ps_bwd_step"], names, grid, rc.PS_THREADS, 0, args)
        gx = gx32.to(x.dtype)
        if watom:
            gw = gw.to(x.dtype)
        gm = gm32.to(m.dtype) if m is not None else None
        return gx, gw, glam, gu, gs, gm
