"""The generated CUDA kernels, run on the CPU by the fiber emulator in tests/cuda_emu.

The real CUDA backends plan and launch exactly as on a GPU; only the runner
differs: the rendered source is compiled with g++ and every CUDA thread is a
fiber. Global accesses are bounds- and alignment-checked against the tensors
of each launch, shared memory starts NaN-filled, barriers and warp operations
are strict, and outputs are NaN-poisoned, so an unwritten element, a wrong
index, a missing barrier or a race (threads run in lockstep first-to-last,
or the last warp first, ahead of the others, its threads last-to-first)
shows as an error or a mismatch with the reference. Lines of several warps,
more schedules and the deliberate bugs they catch: tests/test_cuda_emu_teeth.py.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_emu.emulator import AHEAD_LAST, RR, EmuError, EmuRunner
from gspngen.backends.cuda import CudaBackend, CudaPerStepBackend
from gspngen.backends.reference import ReferenceBackend
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from gspngen.testing import make_inputs, rel_error, spec_strategy, tolerance

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARGS = ("x", "w", "lam", "u", "s", "m")
REF = ReferenceBackend()
LIMITS = (2, 227 * 1024)  # the emulated device: 2 multiprocessors (so chunks split over blocks), H100 shared memory


@pytest.fixture(scope="module")
def runners():
    """Key 0: lockstep, first thread to last; key 1: the last warp first, running ahead through its
    __syncwarp's, its threads last to first (tests/cuda_emu/emu.h, ORDER_*)."""
    made = {0: EmuRunner(order=RR, sm_count=LIMITS[0], opt="-O0"),
            1: EmuRunner(order=AHEAD_LAST, sm_count=LIMITS[0], opt="-O0")}
    yield made
    for r in made.values():
        r.close()


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to the reference, floored at 0.1 for gradients that are zero by construction."""
    return rel_error(a, b, floor=0.1)


def inputs(spec: Spec, dtype: torch.dtype, shape, seed: int):
    raw = make_inputs(spec, *shape, dtype=torch.float64, seed=seed)
    return [None if raw[k] is None else raw[k].to(dtype) for k in ARGS]


def names_for(runner: EmuRunner, spec: Spec, dname: str, shapes, choosers=(None,), per_step=False) -> list[str]:
    """Every instantiation the cases launch, so that one g++ build serves them (builds dominate the time)."""
    names = []
    for chooser in choosers:
        be = CudaBackend(runner=runner, configs=chooser)
        for shape in shapes:
            names += be.kernel_names(spec, dname, shape, LIMITS)
    if per_step:
        names += list(rc.per_step_names(False).values()) + list(rc.per_step_names(True).values())
    return names


def prebuild(runner: EmuRunner, spec: Spec, dname: str, shapes, choosers=(None,), per_step=False) -> None:
    runner.build(rc.render_source(spec, dname), names_for(runner, spec, dname, shapes, choosers, per_step))


def prebuild_all(runners, cases) -> None:
    """cases: (order, spec, dtype, shapes); the g++ builds run two at a time."""
    jobs = {0: [], 1: []}
    for order, spec, dname, shapes in cases:
        jobs[order].append((rc.render_source(spec, dname), names_for(runners[order], spec, dname, shapes)))
    for o in (0, 1):
        if jobs[o]:
            runners[o].build_many(jobs[o])


def run(backend, spec: Spec, dtype: torch.dtype, shape, seed: int = 0):
    """Forward and every gradient from the backend, and from the reference on the same (rounded) inputs."""
    args = inputs(spec, dtype, shape, seed)
    y, saved = backend.forward(spec, *args)
    ref_args = [None if a is None else a.double() for a in args]
    y_ref, _ = REF.forward(spec, *ref_args)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(dtype)
    grads = backend.backward(spec, gy, *args, saved)
    grads_ref = REF.backward(spec, gy.double(), *ref_args, None)
    got = {"y": y, **{f"g{n}": g for n, g in zip(ARGS, grads) if g is not None}}
    want = {"y": y_ref, **{f"g{n}": g for n, g in zip(ARGS, grads_ref) if g is not None}}
    assert got.keys() == want.keys()
    return got, want


def assert_matches(backend, spec, dname, shape, seed=0):
    dtype = DTYPES[dname]
    got, want = run(backend, spec, dtype, shape, seed)
    errors = {k: err(got[k], want[k]) for k in want}
    bad = {k: v for k, v in errors.items() if not v <= tolerance(dtype)}
    assert not bad, f"{spec.to_json()} {dname} {shape}: {bad}"


# -- every example spec, every dtype ------------------------------------------

EXAMPLE_SHAPES = [(2, 4, 6, 8), (1, 8, 11, 17)]  # vector-aligned rows; odd sizes with chunk tails


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).stem)
def test_examples_match_reference(path, runners):
    spec = load_spec(path)
    prebuild_all(runners, [(i % 2, spec, dname, EXAMPLE_SHAPES) for i, dname in enumerate(spec.precision)])
    for i, dname in enumerate(spec.precision):
        be = CudaBackend(runner=runners[i % 2], poison=True)  # alternate thread orders
        for j, shape in enumerate(EXAMPLE_SHAPES):
            assert_matches(be, spec, dname, shape, seed=j)


# -- every feature ------------------------------------------------------------

FEATURE_SPECS = [
    dict(connection=1, directions=["rl", "tb"], normalization="softmax", chunk=3, merge="stack", layout="nhwc"),
    dict(connection=9, directions=["lr", "bt"], normalization="none", merge="sum", modulation=False),
    dict(connection=5, directions=["bt", "lr", "rl"], weight_groups=2, merge="mean", layout="nhwc", skip=False),
    dict(connection=7, directions=["tb", "rl"], normalization="softmax", weight_groups="shared", chunk=1,
         modulation=False, skip=False, merge="learned"),
    dict(connection=3, directions=["rl", "lr", "bt", "tb"], normalization="none", chunk=4, merge="stack"),
]


@pytest.mark.parametrize("features", FEATURE_SPECS, ids=lambda d: f"k{d['connection']}-{d['merge']}")
def test_features_match_reference(features, runners):
    spec = Spec.from_dict({"name": "feat", "precision": ["fp32", "bf16"], **features})
    shapes = [(2, 4, 9, 7), (1, 6, 1, 5)]  # incl. one-lane and one-step scans
    prebuild_all(runners, [(0, spec, "fp32", shapes), (1, spec, "bf16", shapes)])
    for dname, order in (("fp32", 0), ("bf16", 1)):
        be = CudaBackend(runner=runners[order], poison=True)
        for j, shape in enumerate(shapes):
            assert_matches(be, spec, dname, shape, seed=j)


# -- concurrent directions (key cc=1): each direction into its own slice, summed ------------------

@pytest.mark.parametrize("features", [None, FEATURE_SPECS[0], FEATURE_SPECS[2], FEATURE_SPECS[3]],
                         ids=["gspn4", "nhwc-chunk-stack", "nhwc-groups-mean", "shared-chunk1-learned"])
def test_concurrent_directions_match_reference(features, runners):
    """Forward and backward with the directions run concurrently match the reference, in fp32 and bf16
    (sums in fp32), with learned, mean and stack merges and weight-gradient atomics; the outputs are
    poisoned, so a direction slice left unwritten or a missing sum shows."""
    spec = (load_spec(ROOT / "examples" / "gspn4.yaml") if features is None
            else Spec.from_dict({"name": "cc", "precision": ["fp32", "bf16"], **features}))
    shapes = [(2, 4, 6, 8), (1, 8, 11, 17)]
    prebuild_all(runners, [(0, spec, "fp32", shapes), (1, spec, "bf16", shapes)])
    for dname, order in (("fp32", 0), ("bf16", 1)):
        be = CudaBackend(runner=runners[order], poison=True).with_config("cc=1", "cc=1")
        assert be.concurrent == ("fwd", "bwd")
        for j, shape in enumerate(shapes):
            assert_matches(be, spec, dname, shape, seed=j)


TR_SPECS = [None,  # gspn4: lr, rl, tb, bt, learned merge
            dict(connection=5, directions=["rl", "lr"], weight_groups=2, merge="mean", chunk=4),  # only lr/rl
            dict(connection=3, directions=["tb", "rl"], normalization="softmax", merge="stack", skip=False),
            dict(connection=7, directions=["lr", "bt"], normalization="none", weight_groups="shared",
                 modulation=False, merge="sum"),
            # the first left/right direction is not direction 0: it must start the transposed output (acc 0)
            dict(connection=3, directions=["bt", "rl", "tb", "lr"], merge="learned", chunk=5)]


@pytest.mark.parametrize("features", TR_SPECS, ids=["gspn4", "lr-rl-groups-chunk", "stack", "shared-k7", "tb-first"])
def test_transposed_forward_matches_reference(features, runners):
    """tr=1: left/right scans as top/bottom ones on transposed planes, the output transposed back (added to
    the top/bottom directions' or into its stack slice). The backward is the default one reading the h
    the transposed forward saved, so every gradient checks that h lands in the same frame order."""
    spec = (load_spec(ROOT / "examples" / "gspn4.yaml") if features is None
            else Spec.from_dict({"name": "tr", "precision": ["fp32", "bf16"], **features}))
    shapes = [(2, 4, 6, 8), (1, 2, 37, 11)]  # non-square, odd sizes: partial 32 x 32 transpose tiles
    for dname, order in (("fp32", 0), ("bf16", 1)):
        be = CudaBackend(runner=runners[order], poison=True).with_config("tr=1", "")
        assert be.transposed
        for j, shape in enumerate(shapes):
            assert_matches(be, spec, dname, shape, seed=j)
            names = {n for n, *_ in runners[order].launches[-12:]}
            assert "gspn_tr<false>" in names


@pytest.mark.parametrize("features", TR_SPECS, ids=["gspn4", "lr-rl-groups-chunk", "stack", "shared-k7", "tb-first"])
def test_transposed_backward_matches_reference(features, runners):
    """tr=1 for both passes: the backward's left/right adjoint scans on transposed planes, their gradients
    transposed back into their slices, gx added back; every gradient against the reference (poisoned
    outputs: a slice left untransposed shows). Shared-weight gradients (fp32 atomics) take the transposed
    path in fp32 and the default one in bf16."""
    spec = (load_spec(ROOT / "examples" / "gspn4.yaml") if features is None
            else Spec.from_dict({"name": "tr", "precision": ["fp32", "bf16"], **features}))
    shapes = [(2, 4, 6, 8), (1, 2, 37, 11)]
    for dname, order in (("fp32", 0), ("bf16", 1)):
        be = CudaBackend(runner=runners[order], poison=True).with_config("tr=1", "tr=1")
        assert be.transposed_bwd
        for j, shape in enumerate(shapes):
            assert_matches(be, spec, dname, shape, seed=j)
            launched = [n for n, *_ in runners[order].launches]
            last_fwd = max(i for i, n in enumerate(launched) if n.startswith("gspn_fwd"))
            first_bwd = min(i for i, n in enumerate(launched) if i > last_fwd and n.startswith("gspn_bwd"))
            after = set(launched[first_bwd:])  # the backward's launches (its first is a scan)
            assert ("gspn_tr<false>" in after) == be.transpose_applies(spec, "bwd", dname, shape[1])


OC_SPECS = [None,  # gspn4
            dict(directions=["tb", "lr"], merge="sum", chunk=3),  # chunks: every one in the block
            dict(connection=5, weight_groups=2, normalization="softmax", directions=["rl", "bt", "lr"], merge="mean"),
            dict(connection=1, modulation=False, skip=False, directions=["bt", "rl"], merge="sum")]


@pytest.mark.parametrize("features", OC_SPECS, ids=["gspn4", "tb-lr-chunk", "k5-groups-softmax", "k1-plain"])
def test_onchip_forward_matches_reference(features, runners):
    """oc=1: one block per plane runs every direction, y accumulated in shared memory (NaN-filled by the
    emulator before each block: a pixel some direction leaves unwritten shows), written once at the end.
    The backward is the default one reading the h this forward saved."""
    spec = (load_spec(ROOT / "examples" / "gspn4.yaml") if features is None
            else Spec.from_dict({"name": "oc", "precision": ["fp32", "bf16"], **features}))
    # vector lr/rl steps; odd sizes (no vectors); vector tb/bt lanes too (W = 64 on 32 threads)
    shapes = [(2, 4, 6, 8), (1, 2, 37, 11), (1, 2, 8, 64)]
    for dname, order in (("fp32", 0), ("bf16", 1)):
        be = CudaBackend(runner=runners[order], poison=True).with_config("oc=1", "")
        assert be.onchip
        runners[order].build(rc.render_source(spec, dname),
                             [n for shape in shapes for n in be.kernel_names(spec, dname, shape, LIMITS)])
        for j, shape in enumerate(shapes):
            assert_matches(be, spec, dname, shape, seed=j)
            fwd = [n for n, *_ in runners[order].launches if n.startswith("gspn_fwd")]
            assert fwd[-1].startswith("gspn_fwd_oc<"), fwd[-3:]
            if j == 2:
                assert ", true, true, true>" in fwd[-1], fwd[-1]  # both mappings on whole vectors
                # without gradients: the variant with no h store, the same y
                args = inputs(spec, DTYPES[dname], shape, seed=j)
                y0, saved = be.forward(spec, *args, need_saved=False)
                assert saved.numel() == 0 and runners[order].launches[-1][0].endswith(", false>")
                assert torch.equal(y0, be.forward(spec, *args)[0])


def test_emulator_rejects_read_only_loads_of_shared_memory(runners, monkeypatch):
    """On a GPU an __ldg (ld.global.nc) of a generic address in shared memory is an illegal access: the
    on-chip forward's y must go through plain loads, and the emulator fails the launch otherwise."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    good = rc.kernel_source(spec, "fp32")
    bad = good.replace("gs_ld_run<V, VEC, false>(tl.y + sg * V,", "gs_ld_run<V, VEC, true>(tl.y + sg * V,", 1)
    assert bad != good
    monkeypatch.setattr(rc, "kernel_source", lambda spec_, dname: bad)
    be = CudaBackend(runner=runners[0]).with_config("oc=1", "")
    with pytest.raises(EmuError, match="read-only"):
        be.forward(spec, *inputs(spec, torch.float32, (1, 2, 6, 8), 0))


def test_onchip_key_and_where_it_applies():
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    be = CudaBackend()
    assert "oc=1" in be.candidates(spec, "fp32", "fwd", (1, 8, 128, 128))
    assert "oc=1" not in be.candidates(spec, "fp32", "bwd", (1, 8, 128, 128))  # a forward tuning
    assert "oc=1" not in be.candidates(spec, "fp32", "fwd", (1, 8, 256, 256))  # 256 KB of y: does not fit
    assert "oc=1" in be.candidates(spec, "bf16", "fwd", (1, 8, 256, 256))  # 128 KB in bf16
    for other in ({"layout": "nhwc"}, {"merge": "stack"}, {"directions": ["lr"]}):
        assert rc.onchip_plan(Spec.from_dict({**spec.to_dict(), **other}), "fp32", 64, 64) is None, other
    plan = rc.onchip_plan(spec, "fp32", 128, 128)
    line = max(rc.smem_bytes(spec, "fwd", rc.LANES, plan.lanes), rc.smem_bytes(spec, "fwd", rc.STEPS, plan.steps))
    assert plan.threads == 128 and plan.smem == 128 * 128 * 4 + -(-line // 16) * 16
    assert (plan.lanes.vec, plan.steps.vec) == (1, 4)  # tb/bt: a lane per thread; lr/rl: 4 steps a load
    for bad in ("oc=1,v=1", "oc=1,cc=1", "oc=1,tr=1", "oc=2"):
        with pytest.raises(ValueError, match="backend"):
            be.with_config(bad, "")
    with pytest.raises(ValueError, match="forward tuning"):
        be.with_config("", "oc=1")


def test_concurrent_key():
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    be = CudaBackend()
    assert be.candidates(spec, "fp32", "fwd", (1, 8, 16, 16))[:2] == ["", "cc=1"]
    one = Spec.from_dict({"name": "one", "directions": ["tb"]})
    assert "cc=1" not in be.candidates(one, "fp32", "fwd", (1, 8, 16, 16))
    stack = Spec.from_dict({"name": "st", "merge": "stack"})
    assert "cc=1" not in be.candidates(stack, "fp32", "fwd", (1, 8, 16, 16))
    assert "cc=1" in be.candidates(stack, "fp32", "bwd", (1, 8, 16, 16))
    tuned = be.with_config("v=2,cc=1", "")
    assert tuned.concurrent == ("fwd",) and tuned.configs is not None
    with pytest.raises(ValueError, match="do not combine"):
        be.with_config("cc=1,tr=1", "")
    for bad in ("cc=2", "w=1", "v=x,cc=1", "tr=2"):
        with pytest.raises(ValueError, match="cc=1"):
            be.with_config(bad, "")
    assert be.with_config("tr=1,v=1", "").transposed and "tr=1" in be.candidates(spec, "fp32", "fwd", (1, 8, 16, 16))
    assert "tr=1" in be.candidates(spec, "fp32", "bwd", (1, 8, 16, 16))
    shared = Spec.from_dict({"name": "sh", "weight_groups": "shared"})
    assert "tr=1" in be.candidates(shared, "fp32", "bwd", (1, 8, 16, 16))
    assert "tr=1" not in be.candidates(shared, "bf16", "bwd", (1, 8, 16, 16))  # fp32 atomic sums
    assert be.with_config("", "tr=1").transposed_bwd
    with pytest.raises(ValueError, match="do not combine"):
        be.with_config("", "cc=1,tr=1")
    nhwc = Spec.from_dict({"name": "nh", "layout": "nhwc"})
    assert "tr=1" not in be.candidates(nhwc, "fp32", "fwd", (1, 8, 16, 16))


# -- tunings: segments, prefetch depths, one line buffer, vector widths, several lines per block ----

def forced(lane_threads: int, vec: int, prefetch: int, bufs: int, chan_threads: int | None = None,
           stage: bool = False):
    """A chooser that forces a tiling; lines longer than a segment get several segments. ``stage``:
    sector tiles where they apply (the steps mapping's forward)."""
    def choose(spec, dname, direction, kind, C, H, W):
        mapping = rc.thread_map(spec, direction)
        L = H if direction in ("lr", "rl") else W
        v = vec
        if mapping == rc.CHAN:
            while C % v:
                v //= 2
        ct = chan_threads or max(1, 32 // lane_threads)
        lps = lane_threads * (v if mapping == rc.LANES else 1)
        st = stage and mapping == rc.STEPS and kind == "fwd"
        return rc.KernelConfig(lane_threads, ct, v, -(-L // lps), prefetch, bufs, st)
    choose.__name__ = f"lt{lane_threads}-v{vec}-p{prefetch}-b{bufs}" + ("-stage" if stage else "")
    return choose


# forced(4, 2, 2, 2): half-width vectors with a tile in flight over several segments, the long-line
# candidate of render.cuda.candidate_configs (the paper shape's lr/rl forward)
TUNINGS = [forced(8, 4, 1, 2), forced(4, 2, 3, 1), forced(32, 1, 2, 2), forced(16, 8, 2, 1), forced(2, 4, 2, 2, 16),
           forced(4, 2, 2, 2)]
# sector tiles (lr/rl forward): several lines per warp, several segments, every prefetch depth, one buffer
STAGED = [forced(8, 4, 1, 2, stage=True), forced(4, 2, 3, 1, stage=True), forced(32, 1, 2, 2, stage=True),
          forced(16, 8, 2, 1, stage=True), forced(2, 4, 4, 2, 16, stage=True)]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_tunings_match_reference(layout, runners):
    spec = Spec.from_dict({"name": "tune", "connection": 5, "chunk": 6, "layout": layout, "weight_groups": "channel",
                           "precision": ["fp32"]})
    shape = (1, 4, 13, 40)  # lines of 13 and 40 lanes: several segments at these tilings; chunk tails
    runner = runners[1 if layout == "nhwc" else 0]
    prebuild(runner, spec, "fp32", [shape], TUNINGS)
    for chooser in TUNINGS:
        be = CudaBackend(runner=runner, configs=chooser, poison=True)
        assert_matches(be, spec, "fp32", shape)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_sector_tiles_match_reference(dname, runners):
    """The sector-tiled lr/rl forward at every forced tiling: lines of 13 and 40 lanes (segments, rows of
    a row group past the line), W = 37 (tiles cut by the image end and by chunks of 6: element-wise
    masks), both step orders, accumulation into the earlier directions' y, both schedules."""
    spec = Spec.from_dict({"name": "stg", "connection": 5, "chunk": 6, "directions": ["lr", "tb", "rl"],
                           "weight_groups": "channel", "precision": [dname]})
    shapes = [(1, 4, 13, 40), (1, 3, 40, 37)]
    for order in (0, 1):
        prebuild(runners[order], spec, dname, shapes, STAGED)
        for chooser in STAGED:
            be = CudaBackend(runner=runners[order], configs=chooser, poison=True)
            names = be.kernel_names(spec, dname, shapes[0], LIMITS)
            assert any(n.startswith("gspn_fwd<1,") and n.split(", ")[9] == "true" for n in names), names
            for shape in shapes:
                assert_matches(be, spec, dname, shape)


def test_candidate_configs_match_reference(runners):
    """Every candidate an autotuner may pick for this spec and shape computes the same."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    shape = (1, 2, 8, 16)
    cands = {}
    for d in spec.directions:
        for kind in ("fwd", "bwd"):
            cands[(d, kind)] = rc.candidate_configs(spec, "fp32", d, kind, shape[1], shape[2], shape[3])
    most = max(len(v) for v in cands.values())
    choosers = [(lambda i: lambda sp, dn, d, kind, C, H, W: cands[(d, kind)][min(i, len(cands[(d, kind)]) - 1)])(i)
                for i in range(most)]
    prebuild(runners[0], spec, "fp32", [shape], choosers)
    for chooser in choosers:
        assert_matches(CudaBackend(runner=runners[0], configs=chooser, poison=True), spec, "fp32", shape)


# -- the per-step baseline ---------------------------------------------------------------------

@pytest.mark.parametrize("features", [FEATURE_SPECS[0], FEATURE_SPECS[2], FEATURE_SPECS[3]],
                         ids=["nhwc-chunk-stack", "nhwc-groups-mean", "shared-chunk1-learned"])
def test_per_step_matches_reference_and_fused(features, runners):
    spec = Spec.from_dict({"name": "ps", "precision": ["fp32"], **features})
    shape = (2, 4, 7, 9)
    prebuild(runners[0], spec, "fp32", [shape], per_step=True)
    ps = CudaPerStepBackend(runner=runners[0], poison=True)
    fused = CudaBackend(runner=runners[0], poison=True)
    assert_matches(ps, spec, "fp32", shape)
    a, _ = run(ps, spec, torch.float32, shape)
    b, _ = run(fused, spec, torch.float32, shape)
    for k in a:
        assert err(a[k], b[k]) <= tolerance(torch.float32), k


# -- random specs -------------------------------------------------------------------------------

@settings(max_examples=4, deadline=None)
@given(spec=spec_strategy(), shape=st.tuples(st.integers(1, 2), st.sampled_from([2, 4]), st.integers(1, 9),
                                             st.integers(1, 9)), order=st.integers(0, 1))
def test_random_specs_match_reference(spec, shape, order, runners):
    prebuild(runners[order], spec, "fp32", [shape])
    assert_matches(CudaBackend(runner=runners[order], poison=True), spec, "fp32", shape)


# -- the emulator has teeth ---------------------------------------------------------------------

def _fwd_launch(spec, shape, y_shape=None, smem=None, runner=None):
    """Launch direction 0's forward kernel directly, bypassing the backend's checks."""
    be = CudaBackend(runner=runner, poison=True)
    args = inputs(spec, torch.float32, shape, 0)
    x, w, lam, u, s, m = args
    N, C, H, W = shape
    plan = be.plan(spec, "fp32", "fwd", 0, shape, [], acc=False, watom=False, limits=LIMITS)
    y = torch.full(y_shape or x.shape, float("nan"))
    saved = torch.full((N, spec.num_directions, C, H * W), float("nan"))
    source = rc.render_source(spec, "fp32")
    kernel = runner.kernel(None, source, plan.name, [plan.name])
    runner.launch(kernel, None, plan.grid, plan.block, plan.smem if smem is None else smem,
                  [("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m), ("out", y), ("out", saved),
                   ("i32", N), ("i32", C), ("i32", spec.groups(C)), ("i32", H), ("i32", W), ("i32", 0), *plan.tail])
    return y


def test_emulator_reports_out_of_bounds(runners):
    spec = Spec.from_dict({"name": "oob", "directions": ["tb"], "merge": "sum"})
    with pytest.raises(EmuError, match="out-of-bounds"):
        _fwd_launch(spec, (1, 2, 4, 8), y_shape=(1, 2, 4, 7), runner=runners[0])


def test_kernel_traps_when_shared_memory_is_short(runners):
    """A host/kernel disagreement on shared memory fails the launch (a trap), never leaves y unwritten
    behind a launch that looks successful (the host check itself: tests/test_cuda_hazards.py)."""
    spec = Spec.from_dict({"name": "smem", "directions": ["tb"], "merge": "sum"})
    with pytest.raises(EmuError, match="__trap"):
        _fwd_launch(spec, (1, 2, 4, 8), smem=16, runner=runners[0])


def test_emulator_catches_a_missing_barrier(monkeypatch):
    """Without the per-step barrier, results depend on thread order: the emulator must see it."""
    spec = Spec.from_dict({"name": "race", "directions": ["tb"], "merge": "sum", "precision": ["fp32"]})
    needle = "                step(tl, oy, sm, t, p);\n                B_t::sync();\n"
    source = rc.render_source(spec, "fp32")
    assert source.count(needle) == 1
    broken = source.replace(needle, "                step(tl, oy, sm, t, p);\n")
    monkeypatch.setattr(rc, "render_source", lambda sp, dn: broken)  # what the backend now renders
    shape = (1, 2, 6, 64)  # 64 lanes: one line spans two warps, so the block barrier matters
    args = inputs(spec, torch.float32, shape, 0)
    y_ref, _ = REF.forward(spec, *[None if a is None else a.double() for a in args])
    worst = 0.0
    for order in (0, 1):
        runner = EmuRunner(order=order, sm_count=LIMITS[0], opt="-O0")
        try:
            y, _ = CudaBackend(runner=runner, poison=True).forward(spec, *args)
        finally:
            runner.close()
        worst = max(worst, err(y, y_ref))
    assert worst > 1e-3
