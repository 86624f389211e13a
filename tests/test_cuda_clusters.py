"""Lines split over thread block clusters (cl=N; issue 13, item 4), run by the CPU emulator.

A cluster's blocks run together in the emulator (tests/cuda_emu/emu.h): each has its own shared memory,
the cluster barrier waits for all their threads, and a store into another block's shared memory (DSMEM)
is checked: never before the storing thread has passed a cluster barrier, never into a block that has
exited. Every case matches the reference (forward and every gradient, NaN-poisoned outputs) and gives
the same bits under every schedule, and the deliberate bugs below must fail.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import pytest
import torch

from cuda_emu.emulator import AHEAD, AHEAD_LAST, CXX, HERE, ORDERS, RANDOM, RR, EmuError, EmuRunner
from gspngen.backends.cuda import CudaBackend
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from test_cuda_emu_teeth import _broken_source, check_case
from test_cuda_emulated import LIMITS, prebuild

ROOT = Path(__file__).resolve().parents[1]
GSPN4 = load_spec(ROOT / "examples" / "gspn4.yaml")


def _variant(spec: Spec, **changes) -> Spec:
    return Spec.from_dict({**json.loads(spec.to_json()), **changes})


def keyed(cl: int):
    """The chooser of the key cl=N (CudaBackend.with_config), forward and backward."""
    return CudaBackend(runner=object()).with_config(f"cl={cl}", f"cl={cl}").configs


def clustered(lane_threads: int, vec: int, prefetch: int, bufs: int, blocks: int, chan_threads: int = 1):
    """A chooser forcing a cluster tiling: each line over `blocks` blocks of lane_threads x chan_threads
    threads, segments where a block's share is longer than one; nhwc keeps the default."""
    def choose(spec, dname, direction, kind, C, H, W):
        mapping = rc.thread_map(spec, direction)
        if mapping == rc.CHAN:
            return None
        L = H if direction in ("lr", "rl") else W
        lps = lane_threads * (vec if mapping == rc.LANES else 1)
        nseg = -(-(-(-L // blocks)) // lps)
        return rc.KernelConfig(lane_threads, chan_threads, vec, nseg, prefetch, bufs,
                               cluster=-(-L // (nseg * lps)))
    choose.__name__ = f"cl{blocks}-lt{lane_threads}-v{vec}-p{prefetch}-b{bufs}-ct{chan_threads}"
    return choose


@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=RR, sm_count=LIMITS[0], opt="-O0")
    yield r
    r.close()


def cluster_launches(runner: EmuRunner) -> list[str]:
    return [name for name, *_ in runner.launches if "_cl<" in name]


# (id, spec, dtype, shape, chooser): every case launches cluster kernels in both passes (gspn4-cl4-bf16:
# its 33-lane tb/bt lines over 3 blocks of 16 threads, one partial warp each, the last owning one lane).
CASES = [
    ("gspn4-cl2", GSPN4, "fp32", (1, 2, 70, 72), keyed(2)),
    ("gspn4-cl4-bf16", GSPN4, "bf16", (1, 2, 130, 33), keyed(4)),
    ("k5-chunks-1buf", _variant(GSPN4, connection=5, chunk=3, directions=["bt", "rl"]), "fp32", (1, 2, 40, 40),
     clustered(32, 1, 1, 1, 3)),
    ("segments-2ch", _variant(GSPN4, directions=["tb", "lr"]), "fp32", (1, 3, 50, 48), clustered(16, 1, 3, 2, 2, 2)),
    ("shared-weights-stack", _variant(GSPN4, weight_groups="shared", merge="stack", directions=["rl", "tb"]),
     "fp16", (2, 2, 36, 66), clustered(32, 2, 2, 2, 2)),
    # 16-byte vectors along the line, radius 2 > one pad column: a block's two edge lanes both go out
    ("k5-vec4", _variant(GSPN4, connection=5, directions=["tb"]), "fp32", (1, 2, 16, 256), keyed(2)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cluster_lines_match_reference_under_every_schedule(case, emu):
    _, spec, dname, shape, chooser = case
    prebuild(emu, spec, dname, [shape], [chooser])
    runner = emu.with_order(RR)
    check_case(runner, spec, dname, shape, chooser, orders=(RR, AHEAD, AHEAD_LAST, RANDOM, RANDOM + 1))
    probe = emu.with_order(RR)
    CudaBackend(runner=probe, configs=chooser).forward(spec, *_inputs(spec, dname, shape))
    split = spec.num_directions
    if case[0] == "k5-vec4":
        cfg = chooser(spec, dname, "tb", "fwd", *shape[1:])
        assert cfg.vec == 4 and -(-spec.radius // cfg.vec) * cfg.vec > spec.radius > 1  # the point of it
    assert len(cluster_launches(probe)) == split


def _inputs(spec, dname, shape):
    from gspngen.testing import make_inputs
    from test_cuda_emulated import ARGS, DTYPES

    raw = make_inputs(spec, *shape, dtype=DTYPES[dname], seed=3)
    return [raw[k] for k in ARGS]


@pytest.mark.parametrize("key", ["cl=2,cc=1", "cl=2,tr=1"])
def test_clusters_combine_with_concurrent_and_transposed_passes(key, emu):
    """cc=1 (each direction into its own slice) and tr=1 (lr/rl as tb/bt on transposed planes) plan their
    launches through the same per-direction tunings, so cl=N applies to them too."""
    be = CudaBackend(runner=emu, poison=True).with_config(key, key)
    from test_cuda_emulated import assert_matches

    shape = (1, 2, 70, 72)
    emu.launches.clear()
    assert_matches(be, GSPN4, "fp32", shape)
    assert len(cluster_launches(emu)) == 8  # four directions, two passes


def test_all_six_schedules_give_the_same_bits(emu):
    _, spec, dname, shape, chooser = CASES[0]
    prebuild(emu, spec, dname, [shape], [chooser])
    check_case(emu, spec, dname, shape, chooser, orders=ORDERS)


# -- deliberate bugs: each must fail -------------------------------------------------------------

LEFT_SHARE = "if (ll < GS_R && rank > 0) gs_st_peer(pl + slot_ll(ll + LPB), rank - 1, v);"
CLUSTER_SYNC = "if (CL > 1) gs_sync_cluster();\n        else if (LINE_THREADS <= 32)"
FIRST_SYNC = "        kn = B.tb;\n        if constexpr (CL > 1) gs_sync_cluster();"


def test_bug_missing_halo_store_fails(emu, monkeypatch):
    """Without the store of a block's first lanes into its left neighbour, that neighbour reads its
    NaN-filled pad: the outputs are wrong."""
    _, spec, dname, shape, chooser = CASES[0]
    _broken_source(monkeypatch, LEFT_SHARE, "")
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(AssertionError, match="{'y'"):
        check_case(emu, spec, dname, shape, chooser, orders=(RR,))


def test_bug_block_barrier_for_the_cluster_barrier_fails(emu, monkeypatch):
    """A block barrier orders nothing between the blocks of a cluster: a block running ahead reads
    its neighbour's edge lanes before they are written."""
    _, spec, dname, shape, chooser = CASES[0]
    _broken_source(monkeypatch, CLUSTER_SYNC, "if (false) gs_sync_cluster();\n        else if (LINE_THREADS <= 32)")
    prebuild(emu, spec, dname, [shape], [chooser])
    # the block running ahead reads NaN pads (wrong y), or finishes while its neighbour still stores into it
    with pytest.raises(AssertionError, match="differs from order|{'y'|DSMEM store to a block of the cluster that has exited"):
        check_case(emu, spec, dname, shape, chooser, orders=(RR, AHEAD, RANDOM))


def test_bug_dsmem_store_before_the_first_cluster_barrier_fails(emu, monkeypatch):
    """A DSMEM store before any cluster barrier may reach a block that has not started."""
    _, spec, dname, shape, chooser = CASES[0]
    _broken_source(monkeypatch, FIRST_SYNC, "        kn = B.tb;")
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(EmuError, match="DSMEM store before a cluster barrier"):
        check_case(emu, spec, dname, shape, chooser, orders=(RR,))


# -- the emulator's cluster semantics on small kernels ---------------------------------------------

KERNELS = r'''
#include "emu.h"
#include <cstring>
typedef float gs_t;
#define GS_STORE 0
#include "gs_emu_impl.h"
// 0: a ring: each block stores its rank into the next block's shared memory, then reads what it got
// 1: the store before any cluster barrier
// 2: block 0 exits while block 1 still stores into it
// 3: block 1's threads exit without reaching the cluster barrier block 0 waits at
// 4: after a cluster barrier, block 0 exits and block 1 then stores into it (run ahead, lowest block first)
extern "C" int run(int which, int grid, int cluster, float* out, int order)
{
    return emu::launch(grid, 32, 128, order, [=] {
        float* sm = gs_smem();
        const int q = (int)(blockIdx.x % cluster), n = cluster;
        if (which == 1) gs_st_peer(sm + threadIdx.x, (q + 1) % n, (float)q);
        if (which == 2) {
            if (q == 0) return;
            gs_sync_cluster();
        }
        if (which == 3 && q == 1) return;
        if (which == 4) {
            gs_sync_cluster();
            if (q != 0) gs_st_peer(sm + threadIdx.x, 0, 1.0f);
            return;
        }
        gs_sync_cluster();
        gs_st_peer(sm + threadIdx.x, (q + 1) % n, (float)q);
        gs_sync_cluster();
        gs_st1f(out + blockIdx.x * 32 + threadIdx.x, sm[threadIdx.x]);
    }, cluster);
}
extern "C" const char* err() { return emu::g.err.c_str(); }
extern "C" void ranges(unsigned long long lo, unsigned long long hi) { emu_set_ranges(1, &lo, &hi); }
'''


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("cl")
    src = d / "cl.cpp"
    src.write_text(KERNELS)
    lib = d / "cl.so"
    subprocess.run([CXX, "-std=c++17", "-O0", "-shared", "-fPIC", "-w", f"-I{HERE}", str(src), "-o", str(lib)],
                   check=True)
    dll = ctypes.CDLL(str(lib))
    dll.err.restype = ctypes.c_char_p
    return dll


def _run(dll, which: int, grid: int, cluster: int, order: int = RANDOM):
    out = torch.full((grid * 32,), float("nan"))
    dll.ranges(ctypes.c_ulonglong(out.data_ptr()), ctypes.c_ulonglong(out.data_ptr() + 4 * out.numel()))
    rc_ = dll.run(which, grid, cluster, ctypes.c_void_p(out.data_ptr()), order)
    return rc_, dll.err().decode(), out


def test_emulated_dsmem_reaches_the_peer_block(small):
    rc_, msg, out = _run(small, 0, 8, 4)
    assert rc_ == 0, msg
    want = torch.tensor([float((b % 4 - 1) % 4) for b in range(8) for _ in range(32)])
    assert torch.equal(out, want)


@pytest.mark.parametrize("which, grid, cluster, order, message", [
    (1, 4, 2, RANDOM, "DSMEM store before a cluster barrier"),
    (2, 2, 2, RANDOM, "cluster barrier not reached by threads that exited"),
    (3, 2, 2, RANDOM, "cluster barrier not reached by threads that exited"),
    (4, 2, 2, AHEAD, "DSMEM store to a block of the cluster that has exited"),
    (0, 6, 4, RANDOM, "grid must be a multiple of the cluster size"),
])
def test_emulator_refuses_cluster_misuse(small, which, grid, cluster, order, message):
    rc_, msg, _ = _run(small, which, grid, cluster, order)
    assert rc_ != 0
    assert message in msg, msg


def test_gpu_source_uses_release_acquire_cluster_barriers_and_dsmem():
    """The emulator replaces gs_sync_cluster and gs_st_peer: what the GPU build runs is pinned here (a relaxed
    barrier would let a neighbour read a pad before the store into it is visible)."""
    src = rc.render_source(GSPN4, "fp32")
    prelude = src[src.index("GS_DEV void gs_sync_cluster()"):]
    assert "barrier.cluster.arrive.release.aligned;" in prelude[:400]
    assert "barrier.cluster.wait.acquire.aligned;" in prelude[:400]
    assert "__cluster_map_shared_rank(" in prelude[:800] and ".relaxed" not in prelude[:800]
    assert src.count("__cluster_dims__(CL, 1, 1)") == 4  # the cluster and one-launch entries, both passes


# -- host: the tuning, its key, and where it applies ------------------------------------------------

def test_cluster_config_splits_lines_into_whole_warp_blocks():
    cfg = rc.cluster_config(GSPN4, "fp32", "lr", "fwd", 16, 130, 20, 4)
    assert (cfg.cluster, cfg.lane_threads, cfg.chan_threads, cfg.nseg) == (3, 64, 1, 1)  # 130 = 3 blocks of 64
    tb = rc.cluster_config(GSPN4, "fp32", "tb", "fwd", 16, 128, 128, 4)
    assert (tb.cluster, tb.lane_threads, tb.vec) == (4, 32, 1)  # 32 lanes a block: one lane a thread
    big = rc.cluster_config(GSPN4, "fp32", "tb", "bwd", 8, 2048, 2048, 8)
    assert big.cluster == 8 and big.lanes_covered(rc.LANES) >= 2048 and big.vec == 4
    odd = rc.cluster_config(GSPN4, "fp32", "tb", "fwd", 16, 128, 40, 2)  # shares of 20: 32 scalar lanes a block
    assert (odd.cluster, odd.lane_threads, odd.vec) == (2, 32, 1)
    assert rc.cluster_config(GSPN4, "fp32", "tb", "fwd", 16, 128, 20, 2) is None  # a line under 32 lanes
    assert rc.cluster_config(_variant(GSPN4, layout="nhwc"), "fp32", "tb", "fwd", 16, 128, 128, 2) is None
    assert rc.cluster_config(GSPN4, "fp32", "tb", "fwd", 16, 128, 128, 3) is None  # keys are 2, 4, 8
    with pytest.raises(ValueError, match="invalid CUDA kernel config"):
        rc.KernelConfig(32, 1, 1, 1, cluster=2, stage=True).check(rc.STEPS)
    with pytest.raises(ValueError, match="invalid CUDA kernel config"):
        rc.KernelConfig(32, 1, 1, 1, cluster=16).check(rc.LANES)


def test_cluster_names_and_grid():
    cfg = rc.cluster_config(GSPN4, "fp32", "tb", "fwd", 16, 128, 128, 4)
    assert rc.fused_name("fwd", rc.LANES, False, cfg, False, save_h=False) == \
        "gspn_fwd_cl<0, false, 32, 1, 1, 1, 2, 2, false, false, 4>"
    assert rc.fused_name("bwd", rc.LANES, True, cfg, False, watom=True).startswith("gspn_bwd_cl<0, false, ")
    cpb, grid = rc.chunks_per_block(GSPN4, "tb", 1, 16, 128, 128, cfg, 132)
    assert (cpb, grid) == (1, 64)  # 16 channels x 4 blocks, against 4 blocks of 4 channels by default
    d = rc.default_config(GSPN4, "fp32", "tb", "fwd", 16, 128, 128)
    assert rc.chunks_per_block(GSPN4, "tb", 1, 16, 128, 128, d, 132)[1] == 4


def test_cluster_keys(emu):
    be = CudaBackend(runner=emu)
    keys = be.candidates(GSPN4, "fp32", "fwd", (1, 16, 128, 128))
    # 128-lane lines: 2 or 4 blocks of whole warps, or 8 blocks of 16 threads (one partial warp each)
    assert {"cl=2", "cl=4", "cl=8"} <= set(keys)
    assert rc.cluster_config(GSPN4, "fp32", "lr", "fwd", 16, 128, 128, 8).threads == rc.SUBWARP_THREADS
    for bad in ("cl=3", "cl=16", "cl=4,v=1", "cl=2,oc=1"):
        with pytest.raises(ValueError, match="backend"):
            be.with_config(bad, "")
    assert "cl=2" not in be.candidates(_variant(GSPN4, layout="nhwc"), "fp32", "fwd", (1, 16, 128, 128))


def test_a_cluster_whose_last_block_owns_no_lane_is_refused(emu):
    """Four blocks of 32 lanes for a line of 70: the fourth would own nothing (a wasted block that still
    waits at every barrier); the host refuses such a tuning before any launch."""
    def four(spec, dname, direction, kind, C, H, W):
        return rc.KernelConfig(32, 1, 1, 1, cluster=4)

    with pytest.raises(ValueError, match="the last block of each cluster would own no lane of a line of 70"):
        CudaBackend(runner=emu, configs=four).forward(GSPN4, *_inputs(GSPN4, "fp32", (1, 2, 70, 72)))


def test_clusters_refused_on_a_gpu_without_them(emu):
    """Before sm_90 the cl=N plan is refused on the host (the autotuner rejects the candidate)."""
    class Older:
        def __init__(self, inner):
            self.inner = inner

        def limits(self, device):
            return self.inner.limits(device)

        def clusters(self, device):
            return False

    be = CudaBackend(runner=Older(emu)).with_config("cl=2", "")
    be._runner = Older(emu)
    args = _inputs(GSPN4, "fp32", (1, 2, 70, 72))
    with pytest.raises(ValueError, match="compute capability 9.0"):
        be.forward(GSPN4, *args)
