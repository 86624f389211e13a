"""The static performance model (gspngen/perfmodel.py): its counts for gspn4 fp32 on sm_90 (H100) are
pinned at the paper shape and at 1x16x128x128, so a change that moves more bytes, costs more
instructions, registers or occupancy fails here; one that improves them updates the pins (and the
README's table). Predictions, not GPU measurements.

Builds with NVRTC (the cupy-cuda13x extra) and disassembles with cuobjdump (the Triton wheel's will
do); without them the tests skip, except under CI, where that is a failure.
"""

from __future__ import annotations

import os

import pytest

from gspngen import perfmodel as pm
from gspngen.bench import BenchConfig, format_table, minimal_bytes, run_bench
from gspngen.cli import main
from gspngen.render import cuda as render_cuda
from gspngen.spec import Spec, load_spec
from test_cuda_byte_counts import ELEMENT_BYTES, PINNED, SHAPE

PAPER, SMALL = (16, 8, 1024, 1024), (1, 16, 128, 128)
# pass: (bytes moved / minimal, SASS instructions per element, max registers, max shared bytes,
#        min warps per SM, min CTAs per launch, predicted % of copy)
PINS = {
    PAPER: {
        "forward": (1.500, 93.8, 211, 8256, 8, 128, 14.4),
        "forward_no_grad": (1.346, 87.0, 203, 8256, 8, 128, 16.0),
        "backward": (1.314, 181.9, 254, 33152, 8, 128, 8.62),
    },
    SMALL: {
        "forward": (1.500, 98.1, 128, 4352, 16, 4, 3.08),
        "forward_no_grad": (1.346, 93.6, 128, 4352, 16, 4, 3.38),
        "backward": (1.314, 176.4, 156, 17536, 12, 4, 3.59),
    },
}


def _figures(shape):
    try:
        return pm.static_figures(load_spec("examples/gspn4.yaml"), "fp32", shape, "h100")
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def figures():
    return {shape: _figures(shape) for shape in PINS}


# -- bytes: the model's count is the emulator's count ---------------------------------------------

@pytest.mark.parametrize("name", sorted(PINNED))
def test_bytes_model_equals_the_emulator_count(name):
    """PINNED is what the CPU emulator counts from the kernels' own accesses (test_cuda_byte_counts)."""
    spec = load_spec(f"examples/{name}.yaml")
    planes = []
    for kind, save_h in (("fwd", True), ("fwd", False), ("bwd", True)):
        total = sum(pm.total_bytes(pm.launch_bytes(spec, kind, d, SHAPE, "fp32", save_h))
                    for d in range(spec.num_directions))
        planes.append(total / ELEMENT_BYTES)
    assert planes == pytest.approx(PINNED[name], abs=0.01)


def test_bytes_scale_with_storage_dtype():
    spec = load_spec("examples/gspn4.yaml")
    f32 = pm.launch_bytes(spec, "fwd", 1, SMALL, "fp32")
    b16 = pm.launch_bytes(spec, "fwd", 1, SMALL, "bf16")
    assert pm.total_bytes(b16) * 2 == pm.total_bytes(f32)
    assert set(f32["read"]) == {"x", "lam", "u", "s", "w", "y", "m"} and set(f32["write"]) == {"y", "h"}
    assert "h" not in pm.launch_bytes(spec, "fwd", 0, SMALL, "fp32", save_h=False)["write"]
    with pytest.raises(ValueError, match="kind"):
        pm.launch_bytes(spec, "both", 0, SMALL, "fp32")


# -- the pinned counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(PINS), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pass_", ["forward", "forward_no_grad", "backward"])
def test_gspn4_fp32_sm90_counts_are_pinned(figures, shape, pass_):
    got = figures[shape][pass_]
    moved, ipe, regs, smem, warps, ctas, pct = PINS[shape][pass_]
    what = {k: v for k, v in got.items() if k != "kernels"}
    assert got["bytes_moved_over_minimal"] == pytest.approx(moved, abs=0.005), what
    assert got["instructions_per_element"] == pytest.approx(ipe, rel=0.05), what
    assert got["registers"] == pytest.approx(regs, abs=8), what
    assert got["shared_bytes"] == smem and got["warps_per_sm"] == warps and got["ctas"] == ctas, what
    assert got["spill_bytes"] == 0, what
    assert got["predicted_pct_copy"] == pytest.approx(pct, rel=0.1), what
    assert got["gpu"] == "h100" and got["sms"] == 132
    assert len(got["kernels"]) == 4 and all(k["registers"] <= 255 for k in got["kernels"])


def test_pass_figures_are_consistent(figures):
    f = figures[PAPER]
    spec = load_spec("examples/gspn4.yaml")
    fwd_min = minimal_bytes(spec, *PAPER, "fp32", "forward")
    assert f["forward"]["bytes_moved"] == sum(k["bytes_moved"] for k in f["forward"]["kernels"])
    assert f["forward"]["bytes_moved_over_minimal_no_grad"] == pytest.approx(
        f["forward_no_grad"]["bytes_moved"] / fwd_min)
    assert f["backward"]["bytes_moved_over_minimal_no_grad"] is None
    # the paper shape: lr/rl bound by their scattered partial-sector requests, tb/bt by bandwidth
    assert [k["bound"] for k in f["forward"]["kernels"]] == ["scattered requests"] * 2 + ["memory"] * 2
    assert 15 < f["forward"]["predicted_pct_copy_moved"] < 30
    # the small image fits in L2 (no scattered term) but leaves most SMs idle: predicted far below copy
    assert all(k["bound"] != "scattered requests" for k in figures[SMALL]["forward"]["kernels"])
    assert figures[SMALL]["forward"]["predicted_pct_copy"] < 5


# -- the parts --------------------------------------------------------------------------------------

def test_ptxas_report_is_parsed():
    log = ("ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1kPf\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem\n"
           "ptxas info    : Compiling entry function '_Z1jPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1jPf\n"
           "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 12 registers\n")
    assert pm.parse_ptxas(log) == {"_Z1kPf": (40, 16, 8, 256), "_Z1jPf": (12, 0, 0, 0)}


def test_sass_tile_loop_is_the_widest_backward_branch():
    sass = """
		Function : _Z1kPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   FFMA R3, R3, R3, R3 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/              @P0 BRA 0x20 ;
        /*0050*/              @!P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""
    assert pm.parse_sass(sass) == {"_Z1kPf": (5, 8)}


def test_occupancy_rules():
    h100 = pm.GPUS["h100"]
    assert pm.occupancy(h100, 256, 194, 8256) == (1, 8)  # registers: 6400 per warp -> 10 warps -> 8
    assert pm.occupancy(h100, 256, 32, 0) == (8, 64)  # the warp limit
    assert pm.occupancy(h100, 128, 32, 100 * 1024) == (2, 8)  # shared memory: 2 x (100 KB + 1 KB)
    assert pm.occupancy(h100, 1024, 128, 0) == (0, 0)  # does not fit at all


def test_prediction_derates_for_few_ctas():
    h100 = pm.GPUS["h100"]
    full, mem = pm.predict_launch(h100, 264, 8, 16, 1 << 20, 1.0, 1 << 30)
    assert full == pytest.approx(mem + pm.LAUNCH_US * 1e-3)  # memory bound
    assert mem == pytest.approx((1 << 30) / (0.9 * 3350e9) * 1e3)
    few, _ = pm.predict_launch(h100, 13, 8, 16, 1 << 20, 1.0, 1 << 30)
    assert few == pytest.approx((full - pm.LAUNCH_US * 1e-3) * 132 / 13 + pm.LAUNCH_US * 1e-3)
    busy, _ = pm.predict_launch(h100, 264, 8, 16, 1 << 30, 400.0, 1 << 20)  # instruction bound
    assert busy > mem


def test_scattered_requests_term():
    """Partial-sector accesses beyond L2 cost one request each at the fitted rate; whole sectors and data
    that fits in L2 cost nothing extra (the H200 measurements it reproduces: README)."""
    h200 = pm.GPUS["h200"]
    big = 1 << 30
    assert pm.scattered_ms(h200, 132, big, 1.0) == 0.0
    assert pm.scattered_ms(h200, 132, h200.l2_bytes, 0.5) == 0.0
    half = pm.scattered_ms(h200, 132, big, 0.5)
    assert half == pytest.approx(big / 16 / pm.SCATTERED_SECTORS_PER_S_H200 * 1e3)
    assert pm.scattered_ms(h200, 132, big, 0.25) == pytest.approx(2 * half)
    assert pm.scattered_ms(h200, 66, big, 0.5) == pytest.approx(2 * half)  # half the SMs busy
    slow, mem = pm.predict_launch(h200, 132, 8, 8, 1 << 20, 1.0, big, 0.5)
    assert slow == pytest.approx(half + pm.LAUNCH_US * 1e-3) and mem < half
    # bf16 lr/rl: half the bytes at half the sector use of fp32 -> the same prediction (as measured)
    spec = load_spec("examples/gspn4.yaml")
    f32 = pm.static_figures(spec, "fp32", PAPER, "h200")["forward"]["kernels"][0]
    b16 = pm.static_figures(spec, "bf16", PAPER, "h200")["forward"]["kernels"][0]
    assert f32["direction"] == "lr" and b16["predicted_ms"] == pytest.approx(f32["predicted_ms"], rel=0.01)


def test_transposed_passes_are_modelled():
    """tr=1: lr/rl as coalesced top/bottom launches plus the plane transposes; the model predicts it faster
    where the scattered requests held the time and slower where the data fits in L2 (both are predictions:
    the GPU probe measures them)."""
    spec = load_spec("examples/gspn4.yaml")
    base = pm.static_figures(spec, "fp32", PAPER, "h200")["forward"]
    tr = pm.static_figures(spec, "fp32", PAPER, "h200", transposed=True)["forward"]
    names = [k["direction"] for k in tr["kernels"]]
    assert names == ["tb", "bt", "lr transposes", "lr", "rl transposes", "rl", "transpose back"]
    assert all(k["bound"] != "scattered requests" for k in tr["kernels"])
    plane = 16 * 8 * 1024 * 1024 * 4
    moved = {k["direction"]: k["bytes_moved"] for k in tr["kernels"]}
    assert moved["lr transposes"] == 2 * (3 + 1 + 1 + 1 + 1) * plane  # w (3, one group per channel), lam, u, s, x
    assert moved["rl transposes"] == 2 * 6 * plane and moved["transpose back"] == 3 * plane
    assert tr["bytes_moved"] > base["bytes_moved"] and tr["predicted_ms"] < base["predicted_ms"] / 2
    small = (1, 32, 128, 128)
    assert (pm.static_figures(spec, "fp32", small, "h200", transposed=True)["forward"]["predicted_ms"]
            > pm.static_figures(spec, "fp32", small, "h200")["forward"]["predicted_ms"])
    # the backward: inputs (gy and x once) and the direction's own gradients transposed, gx added back
    bwd = pm.static_figures(spec, "fp32", PAPER, "h200", transposed=True)["backward"]
    moved = {k["direction"]: k["bytes_moved"] for k in bwd["kernels"]}
    # lr: x, gy, w (3), lam, u, s in; gw (3), glam, gu, gs back; each read and written
    assert moved["lr transposes"] == 2 * (2 + 6 + 6) * plane and moved["rl transposes"] == 2 * 12 * plane
    assert moved["transpose back"] == 3 * plane
    assert bwd["predicted_ms"] < pm.static_figures(spec, "fp32", PAPER, "h200")["backward"]["predicted_ms"] / 3


def test_onchip_forward_is_modelled():
    """oc=1: one launch of a block per (n, channel) plane; the bytes the emulator counts for it (26 planes
    without gradients, 30 with h: test_cuda_byte_counts), every direction's element updates, the tile loops
    of the per-direction kernels with its tunings; the backward as without it; planes that do not fit keep
    the launches per direction."""
    spec = load_spec("examples/gspn4.yaml")
    planes = {p: sum(pm.total_bytes(l.bytes) for l in ls) / ELEMENT_BYTES
              for p, ls in pm.plan_launches(spec, "fp32", SHAPE, pm.GPUS["h100"], onchip=True).items()}
    assert planes["forward_no_grad"] == pytest.approx(26.0, abs=0.01)
    assert planes["forward"] == pytest.approx(30.0, abs=0.01)
    try:
        base = pm.static_figures(spec, "fp32", SMALL, "h100")
        oc = pm.static_figures(spec, "fp32", SMALL, "h100", onchip=True)
        paper = pm.static_figures(spec, "fp32", PAPER, "h100", onchip=True)
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))
    plan = pm.plan_launches(spec, "fp32", SMALL, pm.GPUS["h100"], onchip=True)
    for pass_, save_h in (("forward", True), ("forward_no_grad", False)):
        (k,) = oc[pass_]["kernels"]
        (launch,) = plan[pass_]
        assert k["direction"] == "onchip" and k["kernel"].startswith("gspn_fwd_oc<") and k["ctas"] == 16
        assert oc[pass_]["bytes_moved_over_minimal"] == pytest.approx(30 / 26 if save_h else 1.0)
        assert launch.directions == 4 and len(launch.loops) == 4
        # lr and rl: the steps kernels (reversed for rl); tb and bt: one lanes kernel
        assert len({n for n, _ in launch.loops}) == 3 and launch.loops[2] == launch.loops[3]
        facts = pm.kernel_facts(render_cuda.kernel_source(spec, "fp32"),
                                [n for n, _ in launch.loops], "sm_90")
        want = sum(facts[n].loop_instructions / e for n, e in launch.loops) / 4
        assert k["instructions_per_element"] == pytest.approx(want)
        # four directions' element updates: the instruction term of four launches of the same loops
        t_inst = 4 * 16 * 128 * 128 * want / 32 / (16 * min(4, 4 / 4) * 1.98e9) * 1e3
        assert k["predicted_ms"] >= t_inst
        assert k["spill_bytes"] == 0 and k["shared_bytes"] >= 128 * 128 * 4
    assert oc["backward"] == base["backward"]
    assert [k["direction"] for k in paper["forward"]["kernels"]] == ["lr", "rl", "tb", "bt"]  # 1024^2: no fit


def test_concurrent_directions_are_modelled():
    """cc=1: every direction's launch writes its own slice (nothing read back) and a sum follows: two planes
    more per pass in fp32 (37 against 35 without gradients at the emulator's shape), six in bf16 (an fp32
    sum, then a copy); the launches are predicted together, none faster than alone, what they share
    adding up."""
    spec = load_spec("examples/gspn4.yaml")
    h100 = pm.GPUS["h100"]
    for dname, extra in (("fp32", 2), ("bf16", 6)):
        base = pm.plan_launches(spec, dname, SHAPE, h100)
        cc = pm.plan_launches(spec, dname, SHAPE, h100, concurrent=("fwd", "bwd"))
        for pass_ in pm.PASSES:
            planes = [sum(pm.total_bytes(l.bytes) for l in ls[pass_]) / (ELEMENT_BYTES * (2 if dname == "bf16"
                                                                                          else 4) // 4)
                      for ls in (base, cc)]
            assert planes[1] == pytest.approx(planes[0] + extra, abs=0.01)
            assert [l.group for l in cc[pass_]] == ["cc"] * 4 + [""] and cc[pass_][-1].external
            assert [l.name for l in cc[pass_][:4]] == [l.name for l in base[pass_]]
            assert all("y" not in l.bytes["read"] and "gx" not in l.bytes["read"] for l in cc[pass_][:4])
    assert all(not l.group for l in pm.plan_launches(spec, "fp32", SHAPE, h100, concurrent=("bwd",))["forward"])
    stack = pm.plan_launches(Spec.from_dict({"name": "stk", "merge": "stack"}), "fp32", SHAPE, h100,
                             concurrent=("fwd", "bwd"))  # stack's forward has nothing to sum: no cc
    assert not any(l.group for l in stack["forward"]) and all(l.group for l in stack["backward"][:4])
    # a group: a member with few CTAs holds it to its time alone
    few = dict(ctas=4, warps_per_block=4, warps_per_sm=16, elements=1 << 20, instructions_per_element=100.0,
               nbytes=1 << 20, sector_use=1.0, scattered_share=1.0)
    alone = pm.predict_launch(h100, 4, 4, 16, 1 << 20, 100.0, 1 << 20)[0]
    ms, bound = pm.predict_group(h100, [few, dict(few, ctas=64)])
    assert ms == pytest.approx(alone) and bound == "its slowest launch"
    # memory: their bytes add up over the SMs their CTAs cover
    big = dict(few, ctas=132, nbytes=10 << 30)
    ms, bound = pm.predict_group(h100, [big, big])
    assert bound == "memory" and ms == pytest.approx(pm.copy_ms(h100, 20 << 30) + pm.LAUNCH_US * 1e-3)
    # instructions: more CTAs than SMs share every SM; with no room for more resident warps (one block of 4
    # per SM), two launches of 132 CTAs take twice one alone's instruction term (with room, the extra warps
    # raise the issue rate instead: the same time as one)
    busy = dict(few, ctas=132, warps_per_sm=4, elements=1 << 30, nbytes=1 << 20)
    one = pm.predict_launch(h100, 132, 4, 4, 1 << 30, 100.0, 1 << 20)[0] - pm.LAUNCH_US * 1e-3
    assert pm.predict_group(h100, [dict(busy, warps_per_sm=16)] * 2)[0] == pytest.approx(
        pm.predict_launch(h100, 132, 4, 16, 1 << 30, 100.0, 1 << 20)[0])
    ms, bound = pm.predict_group(h100, [busy, busy])
    assert bound == "instructions" and ms == pytest.approx(2 * one + pm.LAUNCH_US * 1e-3)
    # scattered requests: only members whose own data exceeds L2 (here 40 MB each: none; 80 MB: both)
    part = dict(few, ctas=132, nbytes=40 << 20, sector_use=0.5)
    assert pm.predict_group(h100, [part, part, part])[1] != "scattered requests"
    part = dict(part, nbytes=80 << 20)
    ms, bound = pm.predict_group(h100, [part, part])
    rate = pm.scattered_sectors_per_s(h100)
    assert bound == "scattered requests" and ms == pytest.approx(
        2 * (80 << 20) / (pm.SECTOR * 0.5) / rate * 1e3 + pm.LAUNCH_US * 1e-3)
    try:
        small = [pm.static_figures(spec, "fp32", SMALL, "h200", concurrent=c) for c in ((), ("fwd", "bwd"))]
        bf16 = pm.static_figures(spec, "bf16", SMALL, "h200", concurrent=("fwd",))["forward"]
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))
    for pass_ in ("forward", "backward"):
        p = small[1][pass_]
        ks = p["kernels"]
        assert [k["concurrent"] for k in ks] == [True] * 4 + [False] and ks[-1]["external"]
        span = ks[0]["group_ms"]
        assert all(k["predicted_ms"] == k["group_ms"] == span for k in ks[:4])
        assert span >= max(k["alone_ms"] for k in ks[:4])
        assert p["predicted_ms"] == pytest.approx(span + ks[-1]["predicted_ms"])
        want, _ = pm.predict_group(pm.GPUS["h200"], [dict(
            ctas=k["ctas"], warps_per_block=k["threads"] // 32, warps_per_sm=k["warps_per_sm"],
            elements=1 * 16 * 128 * 128, instructions_per_element=k["instructions_per_element"],
            nbytes=k["bytes_moved"], sector_use=k["sector_use"], scattered_share=1.0) for k in ks[:4]])
        assert span == pytest.approx(want)
        # the sum is left out of the pass's kernel figures
        assert p["instructions_per_element"] == pytest.approx(small[0][pass_]["instructions_per_element"])
        assert p["ctas"] == small[0][pass_]["ctas"]
        # 1x16x128^2: one direction's launch leaves most SMs idle; together they are predicted faster
        assert p["predicted_ms"] < small[0][pass_]["predicted_ms"] / 1.5
    # bf16: the fp32 sum and its copy, two launches
    assert bf16["kernels"][-1]["predicted_ms"] > pm.LAUNCH_US * 2e-3


def test_cluster_lines_are_modelled():
    """cl=N: the same bytes, N times the CTAs (one channel per block, the line over up to N blocks), and a
    floor of the steps times the assumed cluster-barrier cost. At 1x8x2048^2 the eight lines of the default
    use 8 of 132 SMs; split eight ways they use 64, which the model predicts several times faster."""
    spec = load_spec("examples/gspn4.yaml")
    h200 = pm.GPUS["h200"]
    base = pm.plan_launches(spec, "fp32", (1, 8, 2048, 2048), h200)
    cl = pm.plan_launches(spec, "fp32", (1, 8, 2048, 2048), h200, cluster=8)
    for pass_ in pm.PASSES:
        assert [l.bytes for l in cl[pass_]] == [l.bytes for l in base[pass_]]
        assert [l.ctas for l in base[pass_]] == [8] * 4 and [l.ctas for l in cl[pass_]] == [64] * 4
        assert all("_cl<" in l.name and l.cluster_steps == 2048 for l in cl[pass_])
    with pytest.raises(ValueError, match="cluster: thread block clusters need sm_90"):
        pm.plan_launches(spec, "fp32", SMALL, pm.GPUS["a100"], cluster=2)
    try:
        small = pm.static_figures(spec, "fp32", (1, 16, 128, 128), "h200", cluster=4)
        big = [pm.static_figures(spec, "fp32", (1, 8, 2048, 2048), "h200", cluster=c) for c in (1, 8)]
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))
    for k in small["forward"]["kernels"]:  # 128 steps: the barrier floor binds at this size
        assert k["ctas"] == 64 and k["spill_bytes"] == 0
        assert k["predicted_ms"] >= 128 * pm.CLUSTER_STEP_US * 1e-3
    assert {k["bound"] for k in small["forward"]["kernels"]} == {"cluster barriers"}
    for pass_ in ("forward", "backward"):
        assert big[1][pass_]["ctas"] == 64 and big[1][pass_]["spill_bytes"] == 0
        assert big[1][pass_]["predicted_ms"] < big[0][pass_]["predicted_ms"] / 5


def test_one_launch_is_modelled():
    """ml=1: every direction's blocks in one launch (group "ml", predicted together as cc=1's side-stream
    launches), each direction writing its own slice (no read-back of the output), plus the sum of the slices.
    Issue 13's two CTAs per SM in one launch: cl=8,ml=1 gives 512 at 1x16x128^2 and at 1x16x2048^2."""
    spec = load_spec("examples/gspn4.yaml")
    h200 = pm.GPUS["h200"]
    for shape in ((1, 16, 128, 128), (1, 16, 2048, 2048)):
        ml = pm.plan_launches(spec, "fp32", shape, h200, cluster=8, one_launch=("fwd", "bwd"))
        for pass_ in pm.PASSES:
            own = [l for l in ml[pass_] if not l.external]
            assert [l.group for l in own] == ["ml"] * 4 and len({l.entry for l in own}) == 1
            assert own[0].entry.startswith("gspn_fwd_ml_cl<8, " if pass_ != "backward" else "gspn_bwd_ml_cl<8, ")
            assert sum(l.ctas for l in own) == 512 >= 2 * h200.sms
            assert all(not l.bytes["read"].get("y") and not l.bytes["read"].get("gx") for l in own)
            assert [l.direction for l in ml[pass_] if l.external] == ["sum of slices"]
    try:
        small = pm.static_figures(spec, "fp32", (1, 16, 128, 128), "h200", cluster=8, one_launch=("fwd", "bwd"))
        base = pm.static_figures(spec, "fp32", (1, 16, 128, 128), "h200")
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))
    for pass_ in ("forward", "backward"):
        f = small[pass_]
        assert f["ctas"] == 512 and f["spill_bytes"] == 0 and f["registers"] > 0
        assert all(k["launch_ctas"] == 512 for k in f["kernels"] if not k["external"])
        assert f["predicted_ms"] < base[pass_]["predicted_ms"] / 2


def test_gpu_and_dtype_errors_name_the_argument():
    spec = load_spec("examples/gspn4.yaml")
    with pytest.raises(ValueError, match="gpu: expected one of a100, h100, h200"):
        pm.static_figures(spec, "fp32", SMALL, "v100")
    with pytest.raises(ValueError, match="dtype"):
        pm.static_figures(spec, "fp64", SMALL, "h100")


def test_other_gpus_plan_for_their_own_limits(figures):
    a100 = _figures_for("a100")
    assert a100["forward"]["sms"] == 108 and a100["forward"]["gpu"] == "a100"
    h200 = _figures_for("h200")
    h100 = figures[SMALL]
    # same sm_90 kernels, more bandwidth: never slower
    assert h200["forward"]["predicted_ms"] <= h100["forward"]["predicted_ms"]


def _figures_for(gpu):
    try:
        return pm.static_figures(load_spec("examples/gspn4.yaml"), "fp32", SMALL, gpu)
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))


# -- gspngen bench without a GPU ------------------------------------------------------------------

def test_bench_reports_static_figures_without_a_gpu(figures):
    spec = load_spec("examples/gspn4.yaml")
    cfg = BenchConfig(shapes=[SMALL], dtypes=["fp32"], backends=["cuda"], device="cpu", copy_bytes=1 << 20)
    report = run_bench(spec, cfg)
    (row,) = report["results"]
    assert row["status"] == "not_measured" and row["forward"] is None and row["shape"] == list(SMALL)
    for pass_ in ("forward", "backward"):
        st = row["static"][pass_]
        for key in ("instructions_per_element", "bytes_moved", "bytes_moved_over_minimal",
                    "bytes_moved_over_minimal_no_grad", "registers", "shared_bytes", "spill_bytes",
                    "warps_per_sm", "ctas", "sms", "predicted_ms", "predicted_pct_copy", "gpu"):
            assert key in st
        assert st["predicted_ms"] == pytest.approx(figures[SMALL][pass_]["predicted_ms"])
    text = format_table(report)
    assert "not measured" in text and "predicted (static model)" in text and " bwd " in text


def test_cli_gpu_option(tmp_path, capsys):
    rc = main(["bench", "examples/gspn4.yaml", "--backend", "cuda", "--shape", "1,16,128,128", "--dtype", "fp32",
               "--gpu", "nope", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--gpu" in err and err.count("\n") == 1


# -- issue 13, item 3: instruction targets --------------------------------------------------------

# Target: <= 110 SASS instructions per element forward and <= 200 backward (gspn4 fp32, sm_90), for every
# kernel. Each kernel is also held at what it reaches now (KERNEL_IPE, 2% slack), so that a regression
# fails before it crosses the target. What got lr/rl there: the chunk start from a running counter, not
# t % K per step (a runtime modulo, ~25 instructions a step); the chunk-start and next-step flags as
# opaque lane bounds (NVVM had duplicated the whole step body on them); the line-buffer parity from the
# image coordinate (constant in the unrolled tile walk); one full/partial decision per segment for the
# backward's stores, with the addresses computed once before it (not a branch per tensor).
TARGET = {"forward": 110, "forward_no_grad": 110, "backward": 200}
KERNEL_IPE = {
    PAPER: {
        "forward": {"lr": 94.6, "rl": 94.8, "tb": 93.0, "bt": 93.0},
        "forward_no_grad": {"lr": 85.2, "rl": 85.6, "tb": 88.5, "bt": 88.5},
        "backward": {"lr": 192.4, "rl": 192.9, "tb": 171.2, "bt": 171.2},
    },
    SMALL: {
        "forward": {"lr": 106.0, "rl": 107.5, "tb": 89.5, "bt": 89.5},
        "forward_no_grad": {"lr": 101.0, "rl": 102.8, "tb": 85.2, "bt": 85.2},
        "backward": {"lr": 183.8, "rl": 184.5, "tb": 168.8, "bt": 168.8},
    },
}


@pytest.mark.parametrize("shape", list(PINS), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pass_", list(TARGET))
def test_instructions_per_element_targets(figures, shape, pass_):
    for k in figures[shape][pass_]["kernels"]:
        got, pin = k["instructions_per_element"], KERNEL_IPE[shape][pass_][k["direction"]]
        assert got <= TARGET[pass_], (shape, pass_, k["direction"], got)
        assert got <= pin * 1.02, (shape, pass_, k["direction"], got, pin)


# -- issue 13, item 5: lr/rl sector tiles ----------------------------------------------------------

def staged(spec, dname, direction, kind, C, H, W):
    """The default tuning with sector tiles for the lr/rl forward (an autotuner candidate, not the default)."""
    from dataclasses import replace

    from gspngen.render import cuda as rc

    if kind != "fwd" or direction not in ("lr", "rl"):
        return None
    return replace(rc.default_config(spec, dname, direction, kind, C, H, W), stage=True)


# (dtype, pass): per lr/rl kernel (sector use, SASS instructions per element, registers) with sector tiles
# at 1x16x128x128; without them the same kernels use half of each sector (fp32 and bf16: 16-byte runs)
# at KERNEL_IPE's counts (fp32).
STAGED_PINS = {
    ("fp32", "forward"): (1.0, 149.1, 135),
    ("fp32", "forward_no_grad"): (1.0, 144.9, 132),
    ("bf16", "forward"): (1.0, 168.9, 208),
    ("bf16", "forward_no_grad"): (1.0, 151.9, 202),
}


def test_sector_use_of_the_default_tunings(figures):
    """tb/bt use whole sectors; lr/rl without sector tiles half of each (16-byte runs), a quarter in the
    paper-shape backward (8-byte runs)."""
    for shape, want_lr in ((SMALL, {"forward": 0.5, "backward": 0.5}), (PAPER, {"forward": 0.5, "backward": 0.25})):
        for pass_, lr in want_lr.items():
            for k in figures[shape][pass_]["kernels"]:
                assert k["sector_use"] == (1.0 if k["direction"] in ("tb", "bt") else lr), (shape, pass_, k)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_sector_tiles_use_whole_sectors(dname):
    try:
        got = pm.static_figures(load_spec("examples/gspn4.yaml"), dname, SMALL, "h100", configs=staged)
    except pm.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"static model tools missing in CI: {exc}")
        pytest.skip(str(exc))
    for pass_ in ("forward", "forward_no_grad"):
        use, ipe, regs = STAGED_PINS[(dname, pass_)]
        for k in got[pass_]["kernels"]:
            assert k["spill_bytes"] == 0 and k["registers"] <= 255, k
            if k["direction"] not in ("lr", "rl"):
                continue
            assert k["kernel"].split(", ")[9] == "true", k["kernel"]  # the sector-tiled instantiation
            assert k["sector_use"] == use and k["elements_per_iteration"] == 2 * 4 * (2 if dname == "bf16" else 1)
            assert k["instructions_per_element"] <= ipe * 1.02, (pass_, k["direction"], k["instructions_per_element"])
            assert k["registers"] == pytest.approx(regs, abs=8), k
    assert got["backward"]["sector_use"] == 0.5  # the backward has no sector tiles yet


def test_perfmodel_vs_measured_reproduces_the_fit(capsys):
    """scripts/perfmodel_vs_measured.py on the committed H200 runs: the figures the fitted rate is quoted with."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec_ = importlib.util.spec_from_file_location("pvm", root / "scripts" / "perfmodel_vs_measured.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    runs = root / "benchmarks" / "results" / "device_check_2026-12-04_h200_pm"
    assert mod.main([str(root / "examples" / "gspn4.yaml"), "h200", str(runs / "bench_fp32.json"),
                     str(runs / "bench_bf16.json")]) == 0
    out = capsys.readouterr().out
    assert "16 pass times; rms log error x1.22; ratios 0.70-1.46" in out
