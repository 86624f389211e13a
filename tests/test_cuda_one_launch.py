"""Every direction of a pass in one launch (ml=1; issue 13, item 4), run by the CPU emulator.

One grid holds every direction's blocks (direction d's after those of directions 0..d-1), each block
running its own direction's tuning; the directions write their own slices of the output (y, or gx),
summed afterwards. With cl=N the launch is made of clusters, and lines of at most 8 x 16 lanes split
into blocks of 16 threads (one partial warp): at 1x16x128^2 and 1x16x2048^2 one launch then has more
than two blocks per SM of an H100 or H200 (132 SMs). Every case matches the reference (forward and
every gradient, NaN-poisoned outputs) and gives the same bits under every schedule; the deliberate
bugs below must fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cuda_emu.emulator import AHEAD, AHEAD_LAST, RANDOM, RR, EmuError, EmuRunner
from gspngen.backends.cuda import CudaBackend
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from gspngen.testing import tolerance
from test_cuda_emu_teeth import _broken_source, atomic_outputs, bits
from test_cuda_emulated import err
from test_cuda_emulated import DTYPES, LIMITS, run

ROOT = Path(__file__).resolve().parents[1]
GSPN4 = load_spec(ROOT / "examples" / "gspn4.yaml")
H100 = (132, 227 * 1024)  # SMs and shared memory per block of an H100 or H200


def _variant(spec: Spec, **changes) -> Spec:
    return Spec.from_dict({**json.loads(spec.to_json()), **changes})


@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=RR, sm_count=LIMITS[0], opt="-O0")
    yield r
    r.close()


def backend(runner, key: str, poison: bool = True) -> CudaBackend:
    return CudaBackend(runner=runner, poison=poison).with_config(key, key)


def prebuild(emu: EmuRunner, spec: Spec, dname: str, shape, key: str) -> None:
    emu.build(rc.render_source(spec, dname), backend(emu, key).kernel_names(spec, dname, shape, LIMITS))


def check(emu: EmuRunner, spec: Spec, dname: str, shape, key: str, orders=(RR, AHEAD, AHEAD_LAST, RANDOM)):
    """Forward and every gradient match the reference under the first schedule; every other schedule
    gives the same bits (atomic sums aside)."""
    dtype = DTYPES[dname]
    first = None
    for order in orders:
        got, want = run(backend(emu.with_order(order), key), spec, dtype, shape)
        if first is None:
            bad = {k: e for k in want if not (e := err(got[k], want[k])) <= tolerance(dtype)}
            assert not bad, f"{key} {dname} {shape} order {order}: {bad}"
            first = got
            continue
        atomic = atomic_outputs(spec, shape[1])
        for k, v in got.items():
            if k in atomic:
                assert err(v, first[k]) <= tolerance(dtype), f"{k}: order {order} differs from order {orders[0]}"
            else:
                assert torch.equal(bits(v), bits(first[k])), f"{k}: order {order} differs from order {orders[0]}"


# (id, spec, dtype, shape, key): every case runs each pass as one launch
CASES = [
    # the default tunings (the same threads per block at this shape), no clusters
    ("gspn4", GSPN4, "fp32", (1, 2, 16, 16), "ml=1"),
    # 16-lane blocks of 16 threads (one partial warp) in clusters of 2; learned merge: a partial-warp block sum
    ("gspn4-cl2-subwarp", GSPN4, "fp32", (1, 2, 32, 32), "cl=2,ml=1"),
    ("gspn4-cl4-bf16", GSPN4, "bf16", (1, 2, 64, 64), "cl=4,ml=1"),
    # chunks: the directions of a non-square image have different step ranges from one chunks-per-block
    ("chunks-2d", _variant(GSPN4, chunk=5, directions=["tb", "lr"]), "fp32", (2, 2, 20, 28), "ml=1"),
    # stack: the forward writes y's own slices in place; shared weights: fp32 atomic gradients
    ("stack-shared-fp16", _variant(GSPN4, merge="stack", weight_groups="shared", connection=5,
                                   directions=["rl", "bt", "lr"]), "fp16", (1, 3, 32, 32), "cl=2,ml=1"),
    # nhwc: the step axis of each direction's blocks comes from its index (gs_stepw), two images, chunks
    ("nhwc-chunks", _variant(GSPN4, layout="nhwc", chunk=4), "fp32", (2, 8, 12, 20), "ml=1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_launch_matches_reference_under_every_schedule(case, emu):
    _, spec, dname, shape, key = case
    prebuild(emu, spec, dname, shape, key)
    check(emu, spec, dname, shape, key)
    probe = emu.with_order(RR)
    from test_cuda_emulated import inputs

    args = inputs(spec, DTYPES[dname], shape, 0)
    be = backend(probe, key)
    y, saved = be.forward(spec, *args)
    be.backward(spec, torch.ones_like(y), *args, saved)
    # no input needs a gradient: the instantiations without the h store (the emulator refuses a store into
    # the empty saved tensor), the same y
    y_ng, none = be.forward(spec, *args, need_saved=False)
    assert none.numel() == 0 and torch.equal(y_ng, y)
    names = [name for name, *_ in probe.launches]
    assert len(names) == 3 and names[0].startswith("gspn_fwd_ml") and names[1].startswith("gspn_bwd_ml"), names
    assert names[2].startswith("gspn_fwd_ml") and names[2] != names[0]
    if "cl=" in key:
        assert all("_ml_cl<" in n for n in names)


def test_partial_warp_blocks_at_128_lanes(emu):
    """The issue's small shape at one channel: 128-lane lines as 8 blocks of 16 lanes, 16 threads each."""
    spec, shape, key = GSPN4, (1, 1, 128, 128), "cl=8,ml=1"
    for dn in spec.directions:
        cfg = rc.cluster_config(spec, "fp32", dn, "fwd", 1, 128, 128, 8)
        assert (cfg.threads, cfg.cluster, cfg.lanes_covered(rc.thread_map(spec, dn))) == (16, 8, 128)
    prebuild(emu, spec, "fp32", shape, key)
    check(emu, spec, "fp32", shape, key, orders=(RR, RANDOM))


@pytest.mark.parametrize("shape", [(1, 16, 128, 128), (1, 16, 2048, 2048)])
@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_one_launch_has_two_blocks_per_sm(shape, dname):
    """Issue 13, item 4: at 1x16x128^2 and 1x16x2048^2 a launch has at least 2 CTAs per SM (H100/H200:
    132 SMs), forward and backward, with the key the autotuner offers (cl=8,ml=1)."""
    be = CudaBackend(runner=object())
    assert "cl=8,ml=1" in be.candidates(GSPN4, dname, "fwd", shape)
    assert "cl=8,ml=1" in be.candidates(GSPN4, dname, "bwd", shape)
    tuned = be.with_config("cl=8,ml=1", "cl=8,ml=1")
    for kind in ("fwd", "bwd"):
        launch, parts = tuned._plan_one_launch(GSPN4, dname, kind, shape, [], False, H100)
        assert launch.grid >= 2 * H100[0], (kind, launch.grid)
        assert launch.grid == sum(b for _, b in parts) and launch.cluster == 8
        # every direction's own launch is smaller: one launch per direction stays under 2 per SM
        assert all(b < 2 * H100[0] for _, b in parts)


def test_refusals():
    be = CudaBackend(runner=object())
    for key in ("ml=1,cc=1", "ml=1,tr=1", "ml=1,oc=1"):
        with pytest.raises(ValueError, match="backend: .*ml=1"):
            be.with_config(key, "")
    # v=i keeps each direction's own i-th tuning: at 256^2, tb's have 64 threads and lr's 256
    with pytest.raises(ValueError, match="backend: ml=1 .*same threads per block.*lr: 256 threads.*tb: 64 threads"):
        be.with_config("ml=1,v=1", "ml=1,v=1")._plan_one_launch(GSPN4, "fp32", "fwd", (1, 2, 256, 256), [], False,
                                                                H100)
    # cl=8 splits 130-lane lines over 5 blocks and 33-lane ones over 3: no common cluster size
    with pytest.raises(ValueError, match="backend: ml=1 .*same threads per block and cluster size.*none fit"):
        be.with_config("cl=8,ml=1", "")._plan_one_launch(GSPN4, "fp32", "fwd", (1, 3, 130, 33), [], False, H100)
    assert not any("ml=1" in k for k in be.candidates(GSPN4, "fp32", "fwd", (1, 3, 130, 33)) if "cl=8" in k)
    # one direction: nothing to put together
    assert not any("ml=1" in k for k in be.candidates(_variant(GSPN4, directions=["tb"]), "fp32", "fwd",
                                                     (1, 2, 16, 16)))


def test_plan_matches_the_kernel_ranges():
    """The host's grid is the sum of the ranges gs_dir_blocks derives in the kernel (same formula:
    images x channel tiles x cluster x step ranges of one chunks-per-block)."""
    spec = _variant(GSPN4, chunk=3)
    be = CudaBackend(runner=object()).with_config("ml=1", "ml=1")
    launch, parts = be._plan_one_launch(spec, "fp32", "fwd", (2, 3, 20, 20), [], False, (2, 227 * 1024))
    cpb = launch.cpb
    for (p, blocks), dn in zip(parts, spec.directions):
        cfg = p.part[2]
        T = 20
        ncb = -(-3 // cfg.channels_per_block(rc.thread_map(spec, dn)))
        assert blocks == 2 * ncb * cfg.cluster * -(-(-(-T // 3)) // cpb)


# -- deliberate bugs: each must fail -------------------------------------------------------------

def test_bug_direction_ranges_without_the_cluster_factor_fail(emu, monkeypatch):
    """If the kernel counted a direction's range without its cluster's blocks, blocks would run the
    wrong direction: outputs stay NaN or wrong."""
    _, spec, dname, shape, key = CASES[1]
    _broken_source(monkeypatch, "* F::B_t::CL * nsr;", "* nsr;")
    prebuild(emu, spec, dname, shape, key)
    with pytest.raises((AssertionError, EmuError)):
        check(emu, spec, dname, shape, key, orders=(RR,))


def test_bug_full_warp_mask_in_a_partial_warp_fails(emu, monkeypatch):
    """A 16-thread block's block sum shuffling with the full-warp mask names lanes that do not exist."""
    _, spec, dname, shape, key = CASES[1]
    _broken_source(monkeypatch, "gs_shfl_xor(v, o, (1u << NT) - 1u)", "gs_shfl_xor(v, o)")
    prebuild(emu, spec, dname, shape, key)
    with pytest.raises(EmuError, match="warp operation names a lane that does not exist"):
        check(emu, spec, dname, shape, key, orders=(RR,))


def test_bug_direction_into_the_shared_output_fails(emu, monkeypatch):
    """Without the slice offset every direction writes the same y at once: the emulator's cross-block
    write check (or the sum) catches it."""
    _, spec, dname, shape, key = CASES[0]
    _broken_source(monkeypatch, "f.py = p_y + (slice ? d * ((long long)N * C * H * W) : 0ll);", "f.py = p_y;")
    prebuild(emu, spec, dname, shape, key)
    with pytest.raises((AssertionError, EmuError)):
        check(emu, spec, dname, shape, key, orders=(RR,))
