"""The CPU backend (generated C++, OpenMP, SIMD) against the reference: forward and every gradient.

Every distinct spec builds one library (a few seconds), so the tests share a
handful of specs and run several dtypes and shapes per build; built
libraries are cached in one folder for the whole session (all xdist
workers). Outputs are NaN-poisoned before each call, so an element a kernel
forgets to write shows up. Without a C++ compiler the tests are skipped,
except under CI, where that is a failure.
"""

from __future__ import annotations

import os
import multiprocessing
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gspngen
from gspngen.backends.cpu import CpuBackend
from gspngen.backends.reference import ReferenceBackend
from gspngen.render import cpu as render_cpu
from gspngen.runtime import cpu_build
from gspngen.spec import Spec, load_spec
from gspngen.testing import ARG_NAMES, make_inputs, rel_error, spec_strategy, tolerance

GRAD_NAMES = ("gx", "gw", "glam", "gu", "gs", "gm")


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One library cache for the session, shared by the xdist workers (builds are locked)."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if root.name.startswith("popen-gw") else root
    folder = root / "gspngen-cpu-cache"
    folder.mkdir(exist_ok=True)
    old = os.environ.get("GSPNGEN_CACHE_DIR")
    os.environ["GSPNGEN_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("GSPNGEN_CACHE_DIR", None)
    else:
        os.environ["GSPNGEN_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def compiler():
    why = cpu_build.unavailable_reason()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the cpu backend cannot build here: {why}")
        pytest.skip(f"the cpu backend cannot build here: {why}")


_REFERENCE: dict = {}


def _reference(spec: Spec, shape, dtype, seed: int, args, gy):
    """The float64 reference on the same (rounded) inputs; memoised: the reference is the slow part."""
    key = (spec.hash, shape, dtype, seed)
    if key not in _REFERENCE:
        ref = ReferenceBackend()
        args64 = [None if a is None else a.double() for a in args]
        y_ref, _ = ref.forward(spec, *args64)
        _REFERENCE[key] = (y_ref, ref.backward(spec, gy.double(), *args64, None))
    return _REFERENCE[key]


def check_against_reference(spec: Spec, N: int, C: int, H: int, W: int, dtype=torch.float32, key: str = "",
                            seed: int = 0, threads: int | None = None):
    """Forward and all gradients equal the float64 reference within tolerance(dtype); returns the results."""
    inputs = make_inputs(spec, N, C, H, W, dtype=dtype, seed=seed)
    args = [inputs[name] for name in ARG_NAMES]
    backend = CpuBackend(key, key, poison=True)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        y, saved = backend.forward(spec, *args)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
        grads = backend.backward(spec, gy, *args, saved)
    finally:
        torch.set_num_threads(old)
    assert not saved.isnan().any(), "stored h has unwritten elements"

    y_ref, grads_ref = _reference(spec, (N, C, H, W), dtype, seed, args, gy)
    tol = tolerance(dtype)

    def error(got, want):
        # gradients that are zero by construction (gw for k = 1) are ~1e-17 in the reference
        if want.abs().max().item() < 1e-12:
            return float((got.detach().double() - want).abs().max())
        return rel_error(got, want)

    where = f"spec={spec.to_json()} shape={(N, C, H, W)} dtype={dtype} key={key!r}"
    assert y.dtype == dtype and y.shape == y_ref.shape
    err = error(y, y_ref)
    assert err <= tol, f"forward: rel error {err:.3g} > {tol} for {where}"
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
        if g_ref is None:
            assert g is None, f"{name}: expected None for an unused input"
            continue
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        err = error(g, g_ref)
        assert err <= tol, f"{name}: rel error {err:.3g} > {tol} for {where}"
    return y, saved, grads


# --- random specs (one build each: few examples, several dtypes and shapes per example) ---

@settings(max_examples=4)
@given(spec=spec_strategy(precision=["fp32", "fp16", "bf16"], backends=["cpu"]), data=st.data())
def test_random_specs_match_reference(spec, data):
    even = spec.weight_groups == 2
    C = data.draw(st.sampled_from([2, 4] if even else [1, 2, 3, 4]), label="C")
    for dtype in (torch.float64, torch.float32, data.draw(st.sampled_from([torch.float16, torch.bfloat16]))):
        # odd sizes: H or W may be 1 (k wider than the line), chunks 1..3 against 1..7 steps
        N = data.draw(st.integers(1, 2), label="N")
        H = data.draw(st.integers(1, 7), label="H")
        W = data.draw(st.integers(1, 7), label="W")
        check_against_reference(spec, N, C, H, W, dtype=dtype)


@settings(max_examples=4)
@given(spec=spec_strategy(precision=["fp32", "fp16", "bf16"], backends=["cpu"]), data=st.data())
def test_random_specs_on_image_rows_match_reference(spec, data):
    """lr/rl in nchw with fp32 math and lines (H) a multiple of 16: the output block and its adjoint run on
    image rows (gs_fwd_output_rows, gs_bwd_output_rows, gs_bwd_local_rows) for every tile of a multiple
    of 16 steps, and through the tiles for the others (W not a multiple of the tile); random specs, every
    merge, chunks, fp32 and 16-bit storage."""
    spec = Spec.from_dict({**spec.to_dict(), "layout": "nchw",
                           "directions": data.draw(st.sampled_from([["lr", "tb"], ["rl", "lr"], ["tb", "rl"],
                                                                    ["bt", "rl", "tb", "lr"]]), label="directions")})
    C = data.draw(st.sampled_from([2, 4] if spec.weight_groups == 2 else [1, 2, 3, 4]), label="C")
    H = data.draw(st.sampled_from([16, 32]), label="H")
    W = data.draw(st.sampled_from([16, 21, 32, 37, 40]), label="W")  # whole tiles, and a short last one
    tile = data.draw(st.sampled_from([16, 32]), label="tile")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="dtype")
    check_against_reference(spec, 1, C, H, W, dtype=dtype, key=f"tile={tile}")


@pytest.mark.parametrize("merge", ["stack", "learned", "mean", "sum"])
def test_image_rows_every_merge_matches_reference(merge):
    # every merge through the image-row paths (lines of 16 lanes; W = 37: a whole tile of 32, a partial one)
    spec = Spec.from_dict({"name": f"rows_{merge}", "precision": ["fp32", "bf16", "fp16"], "merge": merge,
                           "directions": ["rl", "tb", "lr"], "chunk": 20})
    for dtype, key in ((torch.float32, ""), (torch.bfloat16, "tile=16"), (torch.float16, "tile=32")):
        check_against_reference(spec, 2, 3, 16, 37, dtype=dtype, key=key)


# --- a few fixed specs covering every feature, at sizes where the SIMD and transpose paths run ---

FEATURES = [
    # paper layer, nchw: lr/rl run through the 16 x 16 transposes, a partial tile and partial lane block
    {"connection": 3},
    # nhwc, k = 5, softmax, weight groups (summed per group), chunk, stack
    {"connection": 5, "normalization": "softmax", "weight_groups": 2, "chunk": 5, "merge": "stack",
     "layout": "nhwc"},
    # shared weights, none, mean, no modulation, k wider than short lines, every step a chunk start
    {"connection": 9, "normalization": "none", "weight_groups": "shared", "chunk": 1, "merge": "mean",
     "modulation": False, "directions": ["bt", "lr"]},
    # k = 1 (the weight normalises to 1), no skip, sum, nchw, chunk longer than the scan
    {"connection": 1, "skip": False, "merge": "sum", "chunk": 50, "directions": ["rl", "tb"]},
]
SHAPES = [(1, 2, 1, 5), (2, 3, 4, 1), (1, 4, 35, 33), (2, 2, 16, 48)]


def feature_spec(i: int) -> Spec:
    return Spec.from_dict({"name": f"feat{i}", "precision": ["fp32", "fp16", "bf16"], **FEATURES[i]})


@pytest.mark.parametrize("i", range(len(FEATURES)))
def test_features_all_dtypes(i):
    spec = feature_spec(i)
    for shape in SHAPES:
        N, C, H, W = shape
        if spec.weight_groups == 2 and C % 2:
            C += 1
        for dtype in (torch.float64, torch.float32):
            check_against_reference(spec, N, C, H, W, dtype=dtype, seed=sum(shape))
    for dtype in (torch.float16, torch.bfloat16):
        check_against_reference(spec, 1, 4, 19, 17, dtype=dtype)


@pytest.mark.parametrize("i", [0, 1])
def test_every_candidate_config(i):
    spec = feature_spec(i)
    backend = CpuBackend()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        keys = backend.candidates(spec, "fp32", "fwd", (1, 4, 35, 33))
    finally:
        torch.set_num_threads(old)
    assert keys[0] == "" and 3 <= len(keys) <= 8  # the default first, by the protocol's name ""
    assert any("threads=1" in k for k in keys)  # one thread is a candidate where there are more
    assert render_cpu.default_config(spec).key(spec) not in keys  # and not twice
    for key in keys:
        check_against_reference(spec, 1, 4, 35, 33, dtype=torch.float32, key=key)


def test_nhwc_groups_split_over_items():
    # cb=4 with 8 channels per weight group: a group spans two items, so the weight
    # gradients go through the per-channel buffer and the ordered group sum
    spec = feature_spec(1)
    check_against_reference(spec, 1, 16, 5, 6, dtype=torch.float64, key="cb=4,tile=16")
    check_against_reference(spec, 1, 16, 5, 6, dtype=torch.float32, key="cb=8,tile=32")


@pytest.mark.parametrize("C,key", [(8, "cb=4"), (40, ""), (6, "")])
def test_nhwc_channel_weights_over_several_items(C, key):
    # one weight per channel (G == C) and more channels than an item holds: each item reads its own
    # channels' weights (every item after the first read the first item's weights before); C = 6 in
    # one item: tb/bt read every tensor's rows where they lie, the weights too
    spec = Spec.from_dict({"name": "nhwcw", "connection": 3, "layout": "nhwc", "weight_groups": "channel",
                           "precision": ["fp32"]})
    check_against_reference(spec, 2, C, 5, 6, dtype=torch.float64, key=key)
    check_against_reference(spec, 1, C, 7, 4, dtype=torch.float32, key=key)


def test_threads_config_is_a_cap():
    cfg = render_cpu.parse_config(feature_spec(0), "threads=1,tile=32")
    assert (cfg.threads, cfg.tile) == (1, 32) and cfg.key(feature_spec(0)) == "threads=1,tile=32"
    assert cfg.thread_count(8) == 1 and render_cpu.CpuConfig(threads=4).thread_count(2) == 2
    assert render_cpu.CpuConfig().thread_count(3) == 3  # 0: all of torch.get_num_threads()


def test_threads_give_identical_results():
    # Work items (batch x channel block) never share an output element, and every
    # reduction across items (dL/dm, group-shared weight gradients) runs in a fixed
    # order after the parallel part: results are bitwise the same for any thread count.
    for i in (0, 2):
        spec = feature_spec(i)
        one = check_against_reference(spec, 2, 4, 20, 18, dtype=torch.float32, threads=1)
        two = check_against_reference(spec, 2, 4, 20, 18, dtype=torch.float32, threads=2)
        for a, b in zip([one[0], one[1], *one[2]], [two[0], two[1], *two[2]]):
            if a is not None:
                assert torch.equal(a, b)


def test_nan_and_inf_logits_behave_as_the_reference():
    spec = feature_spec(0)
    ref = ReferenceBackend()
    for dtype in (torch.float64, torch.float32):
        inputs = make_inputs(spec, 1, 2, 6, 5, dtype=dtype, seed=3)
        args = [inputs[n] for n in ARG_NAMES]
        w = args[1]
        # non-existing neighbours: o = -1 of lane 0 (row 0 for lr/rl, column 0 for tb/bt),
        # o = +1 of the last lane
        w[:, :2, 0, :, 0, :] = float("nan")
        w[:, 2:, 0, :, :, 0] = float("inf")
        w[:, :2, 2, :, -1, :] = float("-inf")
        w[:, 2:, 2, :, :, -1] = float("nan")
        y, saved = CpuBackend(poison=True).forward(spec, *args)
        args64 = [None if a is None else a.double() for a in args]
        y_ref, _ = ref.forward(spec, *args64)
        assert torch.isfinite(y_ref).all() and torch.isfinite(y).all()
        assert rel_error(y, y_ref) <= tolerance(dtype)
        gy = torch.ones_like(y)
        grads = CpuBackend(poison=True).backward(spec, gy, *args, saved)
        grads_ref = ref.backward(spec, gy.double(), *args64, None)
        for name, g, r in zip(GRAD_NAMES, grads, grads_ref):
            assert torch.isfinite(g).all(), name
            assert rel_error(g, r) <= tolerance(dtype), name
        # a NaN logit of an existing neighbour: NaN where the reference has NaN
        w[0, 2, 1, 0, 3, 2] = float("nan")
        y, _ = CpuBackend().forward(spec, *args)
        y_ref, _ = ref.forward(spec, *[None if a is None else a.double() for a in args])
        assert torch.isnan(y_ref).any()
        assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
        finite = ~torch.isnan(y_ref)
        assert rel_error(y[finite], y_ref[finite]) <= tolerance(dtype)


def test_nan_logits_at_a_chunk_start_are_unused():
    # The first step of a chunk has no previous line, so its weights are unused: the
    # output is the reference's, and their gradient is 0 (DESIGN section 4: weights of
    # missing neighbours get gradient 0). The reference back-propagates through the
    # normalisation of those unused weights too, so its gradient there is NaN.
    spec = feature_spec(0)
    inputs = make_inputs(spec, 1, 2, 6, 5, dtype=torch.float64, seed=4)
    args = [inputs[n] for n in ARG_NAMES]
    w = args[1]
    w[:, 0, :, :, :, 0] = float("nan")  # lr's first step: column 0
    w[:, 2, :, :, 0, :] = float("inf")  # tb's first step: row 0
    y, saved = CpuBackend(poison=True).forward(spec, *args)
    y_ref, _ = ReferenceBackend().forward(spec, *args)
    assert torch.isfinite(y).all() and rel_error(y, y_ref) <= 1e-10
    gw = CpuBackend(poison=True).backward(spec, torch.ones_like(y), *args, saved)[1]
    assert (gw[:, 0, :, :, :, 0] == 0).all() and (gw[:, 2, :, :, 0, :] == 0).all()
    assert torch.isfinite(gw).all()


def test_large_logits_and_gs_exp_range():
    # exp saturates (sigmoid of +-100, softmax over logits 80 apart) exactly as in the reference
    spec = feature_spec(1)
    inputs = make_inputs(spec, 1, 4, 9, 7, dtype=torch.float32, seed=5, logit_scale=60.0)
    args = [inputs[n] for n in ARG_NAMES]
    y, _ = CpuBackend().forward(spec, *args)
    y_ref, _ = ReferenceBackend().forward(spec, *[None if a is None else a.double() for a in args])
    assert rel_error(y, y_ref) <= tolerance(torch.float32)


# --- integration: the registry, auto, configs, errors ---

def test_auto_picks_cpu_and_configs_resolve():
    spec = feature_spec(0)
    x = torch.randn(1, 2, 3, 3)
    assert gspngen.compile(spec).resolve_backend(x) == "cpu"
    assert gspngen.compile(spec).resolve_backend(x.double()) == "cpu"
    no_cpu = Spec.from_dict({"name": "gpu_only", "backends": ["cuda", "triton"]})
    assert gspngen.compile(no_cpu).resolve_backend(x) == "reference"
    with pytest.raises(ValueError, match="not generated"):
        gspngen.compile(no_cpu, backend="cpu")
    # fp16 is not in this spec's precision: auto falls back, an explicit cpu says why
    bf16_only = Spec.from_dict({"name": "bf16_only", "precision": ["bf16"]})
    assert gspngen.compile(bf16_only).resolve_backend(x.half()) == "reference"
    inputs = make_inputs(bf16_only, 1, 2, 5, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtypes"):
        gspngen.compile(bf16_only, backend="cpu")(**inputs)
    # a tuned name goes through the custom op and autograd
    inputs = make_inputs(spec, 1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    y = gspngen.compile(spec, backend="cpu@tile=8|tile=32")(**inputs)
    y_ref = gspngen.compile(spec, backend="reference")(**inputs)
    assert rel_error(y, y_ref) <= 1e-10
    y.sum().backward()


@pytest.mark.parametrize("key", ["tile=7", "cb=3", "bogus=1", "tile=16,tile=16", "tile", "threads=3", "threads=0"])
def test_invalid_config_keys_are_rejected(key):
    with pytest.raises(ValueError, match="backend"):
        CpuBackend().with_config(key, "")
    with pytest.raises(ValueError):
        gspngen.compile(feature_spec(0), backend=f"cpu@{key}")(**make_inputs(feature_spec(0), 1, 1, 2, 2))


def test_cb_is_rejected_for_nchw_specs():
    spec = feature_spec(0)
    with pytest.raises(ValueError, match="cb"):
        CpuBackend("cb=8").forward(spec, *[make_inputs(spec, 1, 1, 2, 2)[n] for n in ARG_NAMES])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_transposed_staging_is_exact(dtype):
    """lr/rl rows of 16-bit tensors move through 16 x 16 register transposes (converted to fp32 on the
    way in, rounded as gs_put rounds on the way out) where a tile holds a multiple of 16 steps (tile=32),
    element by element otherwise (tile=8): the two must agree bit for bit, forward (y, h) and every
    gradient, NaN and infinity included; gx and gm within the dtype's tolerance (at tile=32 the lr/rl
    tiles also run the output block and its adjoint on image rows, which add gx's two parts, and gm's
    terms, in another order), their NaNs in the same places."""
    spec = Spec.from_dict({"name": "st16", "precision": ["fp32", "bf16", "fp16"], "chunk": 24})
    inputs = make_inputs(spec, 2, 3, 32, 48, dtype=dtype, seed=7)
    args = [inputs[n] for n in ARG_NAMES]
    args[0][0, 0, 5, 17] = float("nan")
    args[0][1, 2, 20, 33] = float("inf")
    outs = []
    for key in ("tile=8", "tile=32"):
        be = CpuBackend(key, key, poison=True)
        y, saved = be.forward(spec, *args)
        gy = torch.linspace(-2, 2, y.numel()).reshape(y.shape).to(dtype)
        outs.append([y, saved, *be.backward(spec, gy, *args, saved)])
    names = ["y", "h", "gx", "gw", "glam", "gu", "gs", "gm"]
    for name, a, b in zip(names, *outs):
        assert a.dtype == b.dtype, name
        if name in ("gx", "gm"):
            # one 16-bit rounding step apart at most, element by element
            assert torch.equal(a.isnan(), b.isnan()), name
            fa, fb = a.float().nan_to_num(0.0), b.float().nan_to_num(0.0)
            step = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            assert ((fa - fb).abs() <= step * torch.maximum(fa.abs(), fb.abs())).all(), name
        else:
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
    assert outs[0][0].isnan().any() and outs[0][0].isfinite().any()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bits with every NaN made the same NaN (payloads and signs of NaNs may differ)."""
    return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int32)


def _vector_blocks(source: str) -> int:
    """GS_VECTOR_BLOCKS as the library built from ``source`` has it (1: the 16-lane loops are in)."""
    return int(cpu_build.load_library(source, "a test source").gspn_vector_blocks())


@pytest.mark.parametrize("case", [
    ({}, (2, 3, 21, 37)),
    ({}, (1, 2, 9, 150)),  # tb/bt lines of 150: the interior path, between two end blocks
    ({"connection": 1, "merge": "mean"}, (1, 2, 18, 17)),
    ({"connection": 9, "normalization": "none", "chunk": 5, "modulation": False}, (1, 2, 19, 40)),
    ({"connection": 5, "normalization": "softmax", "layout": "nhwc", "weight_groups": 2, "merge": "stack",
      "skip": False}, (2, 6, 13, 35)),
    ({"connection": 7, "layout": "nhwc", "merge": "learned", "directions": ["bt", "rl"]}, (1, 3, 22, 11)),
    # lines of 16 and 32 lanes: lr/rl tiles of 32 steps run the output blocks on image rows, the last ones not
    ({}, (2, 3, 32, 40)),
    ({"connection": 9, "normalization": "none", "chunk": 5, "modulation": False, "merge": "stack"}, (1, 2, 16, 37)),
], ids=["gspn4-like", "gspn4-long-lines", "k1", "k9-none-chunk", "k5-softmax-nhwc", "k7-nhwc", "gspn4-image-rows",
        "k9-stack-image-rows"])
def test_vector_lines_match_the_scalar_lines(monkeypatch, case):
    """The fp32 line loops on 16 lanes (GS_VECTOR_BLOCKS) against the same source built without them:
    every output and gradient the same bits (any NaN for a NaN), with extreme logits, and again with an
    infinity and a NaN in x; the learned merge's gradient (finite without the NaN) within fp32's
    tolerance: its lanes are summed in another order. Odd line lengths leave elements after the last whole vector of
    a range to the scalar loop."""
    overrides, shape = case
    spec = Spec.from_dict({"name": "vl", "precision": ["fp32"], **overrides})
    text = render_cpu.render_source(spec)
    sources = (text, "#define GS_VECTOR_BLOCKS 0\n" + text)
    if _vector_blocks(sources[0]) != 1:
        pytest.skip("the compiler builds no 16-lane loops here (they need AVX-512 and GCC)")
    assert _vector_blocks(sources[1]) == 0
    inputs = make_inputs(spec, *shape, dtype=torch.float32, seed=11)
    args = [inputs[n] for n in ARG_NAMES]
    w = args[1].view(-1)
    w[::7] = 60.0
    w[3::11] = -90.0
    w[5::13] = -1e4
    w[6::17] = 130.0
    w[8::19] = -0.0
    nonfinite = [a.clone() if a is not None else None for a in args]
    nonfinite[0].view(-1)[5] = float("nan")
    nonfinite[0].view(-1)[-9] = float("inf")
    names = ["y", "y (no h)", "h", "gx", "gw", "glam", "gu", "gs", "gm"]
    for run_args in (args, nonfinite):
        outs = []
        for source in sources:
            monkeypatch.setattr(render_cpu, "kernel_source", lambda _spec, s=source: s)
            be = CpuBackend(poison=True)
            y, saved = be.forward(spec, *run_args)
            y0, _ = be.forward(spec, *run_args, need_saved=False)
            gy = torch.linspace(-2, 2, y.numel()).reshape(y.shape)
            outs.append([y, y0, saved, *be.backward(spec, gy, *run_args, saved)])
        for name, a, b in zip(names, *outs):
            if a is None:
                assert b is None
            elif name != "gm":
                assert torch.equal(_bits(a), _bits(b)), name
            elif run_args is args:
                # fp32's tolerance, relative to the largest magnitude: a sum of thousands of terms
                assert a.isfinite().all() and ((a - b).abs().max() <= 1e-5 * a.abs().max())
        assert outs[0][0].isfinite().all() if run_args is args else outs[0][0].isnan().any()


def test_local_adjoint_cut_holds_only_where_it_is_exact():
    """lr/rl compute the adjoint's glam and gx on image rows from gh, x and lam alone, and run the lines
    without x and lam: the cut is taken only where no other output reads them."""
    import dataclasses

    import sympy as sp

    from gspngen.lower import lower

    adj = lower(load_spec("examples/gspn4.yaml")).adjoint
    cut = render_cpu.local_adjoint(adj)
    assert cut.outputs == ("glam", "gx") and set(cut.used_inputs) == {"gh", "x", "lam"}
    assert {s.name for s, _ in cut.assigns} == {"glam", "gx"}  # no intermediate of the weights
    assert "GS_LOCAL_ADJ = true" in render_cpu.render_source(load_spec("examples/gspn4.yaml"))

    def changed(name, f):
        return dataclasses.replace(adj, assigns=tuple((s, f(e) if s.name == name else e) for s, e in adj.assigns))

    x, w0 = sp.Symbol("x"), sp.Symbol("w0")
    assert render_cpu.local_adjoint(changed("gw1", lambda e: e * x)) is None     # a weight gradient reads x
    assert render_cpu.local_adjoint(changed("glam", lambda e: e + w0)) is None   # glam reads a weight
    lam = sp.Symbol("lam")
    assert render_cpu.local_adjoint(changed("ghp0", lambda e: e * lam)) is None   # another output reads lam
    assert render_cpu.local_adjoint(changed("ghp0", lambda e: e)) is not None


def test_channels_not_in_whole_weight_groups_are_an_error_not_a_crash():
    # the public API checks first; a direct backend call must not reach the kernels' C / G division
    spec = load_spec("examples/wide5.yaml")
    x = torch.randn(1, 8, 8, 3)  # nhwc: C = 3, weight_groups 4
    args = [make_inputs(spec, 1, 4, 8, 8)[n] for n in ARG_NAMES]
    args[0] = x
    with pytest.raises(ValueError, match="x: weight_groups=4 must divide the channel count, got C=3"):
        CpuBackend().forward(spec, *args)
    saved = torch.zeros(1, 4, 8, 8, 3)  # the h a forward at C = 3 would have stored
    with pytest.raises(ValueError, match="x: weight_groups=4 must divide the channel count, got C=3"):
        CpuBackend().backward(spec, torch.ones(1, 8, 8, 3), *args, saved)


@pytest.mark.parametrize("groups", ["channel", 2])
@pytest.mark.parametrize("shape", [(2, 6, 9, 20), (1, 4, 6, 16)])  # the second: rows of 64, streamed out
def test_nhwc_direct_rows_match_staged_ones(groups, shape):
    """nhwc tb/bt rows read where they lie and their gradients written to their rows (an item holds every
    channel: cb=32) or staged through tiles (cb=4): the same math per element, so the same bits for y, h
    and glam; gx and the weight gradients within a rounding (the 16-lane loop's ranges change with the
    line length; shared groups sum in another order)."""
    spec = Spec.from_dict({"name": f"nd{groups}", "connection": 5, "layout": "nhwc", "weight_groups": groups,
                           "directions": ["tb", "bt", "lr"], "merge": "learned", "precision": ["fp32"]})
    args = [make_inputs(spec, *shape, dtype=torch.float32, seed=3)[n] for n in ARG_NAMES]
    outs = []
    for key in ("cb=32", "cb=4"):
        be = CpuBackend(key, key, poison=True)
        y, saved = be.forward(spec, *args)
        gx, gw, glam, *_ = be.backward(spec, torch.linspace(-1, 1, y.numel()).reshape(y.shape), *args, saved)
        outs.append((y, saved, gx, glam, gw))
    for i in (0, 1, 3):
        assert torch.equal(outs[0][i], outs[1][i])
    for i in (2, 4):
        assert rel_error(outs[0][i], outs[1][i]) <= 1e-6


def test_saved_and_gy_are_checked():
    spec = feature_spec(0)
    args = [make_inputs(spec, 1, 2, 3, 4)[n] for n in ARG_NAMES]
    y, saved = CpuBackend().forward(spec, *args)
    with pytest.raises(ValueError, match="saved"):
        CpuBackend().backward(spec, y, *args, saved[:, :1])
    with pytest.raises(ValueError, match="gy"):
        CpuBackend().backward(spec, y[:, :1], *args, saved)


@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/c++"}, {"PATH": "", "CXX": ""}])
def test_unavailable_without_a_compiler(monkeypatch, env):
    for name, value in env.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
            if name == "PATH":
                monkeypatch.setenv("PATH", "")
    why = CpuBackend().unavailable_reason(torch.device("cpu"))
    assert why and ("compiler" in why or "CXX" in why)
    assert not CpuBackend().available(torch.device("cpu"))
    spec = feature_spec(0)
    x = torch.randn(1, 2, 3, 3)
    assert gspngen.compile(spec).resolve_backend(x) == "reference"
    with pytest.raises(ValueError, match="cannot run"):
        gspngen.compile(spec, backend="cpu").resolve_backend(x)
    from gspngen.check import backend_skip_reason

    assert backend_skip_reason(spec, "cpu", torch.float32, torch.device("cpu")) == why


def test_cuda_tensors_are_not_for_cpu():
    assert "CPU" in CpuBackend().unavailable_reason(torch.device("cuda"))


def test_compile_error_names_the_spec_and_command():
    with pytest.raises(cpu_build.CpuBuildError, match=r"spec 'broken'.*-fopenmp"):
        cpu_build.load_library("#error deliberately broken\n", "spec 'broken'")


def test_printed_lines_are_checked():
    with pytest.raises(ValueError, match="unexpected printed line"):
        render_cpu._check_lines("forward", "cpu", ['const float h = x; system("rm");'])
    with pytest.raises(ValueError, match="not an allowed function"):
        render_cpu._check_lines("forward", "cpu", ["const float h = expf(x);"])


def test_show_and_compile_include_the_cpu_source(tmp_path, capsys):
    from gspngen.cli import main

    assert main(["show", "examples/gspn4.yaml", "--stage", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "// ===== gspn_cpu.cpp =====" in out and "gs_blk_forward" in out and "gs_exp" in out
    assert main(["compile", "examples/gspn4.yaml", "-o", str(tmp_path / "g4")]) == 0
    assert (tmp_path / "g4" / "gspn_cpu.cpp").read_text() == render_cpu.render_source(gspngen.load_spec(
        "examples/gspn4.yaml"))


def _build_tiny(tag: str) -> int:
    lib = cpu_build.load_library('extern "C" int gspn_abi_version() { return 1; }\n// %s\n' % tag, "t")
    return lib.gspn_abi_version()


def test_concurrent_builds_of_one_key(tmp_path, monkeypatch):
    # Several processes building the same new library at once: one builds, all load it.
    monkeypatch.setenv("GSPNGEN_CACHE_DIR", str(tmp_path))
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert pool.map(_build_tiny, ["race"] * 3) == [1, 1, 1]
    libs = list((tmp_path / "cpu").glob("*.so"))
    assert len(libs) == 1 and not list((tmp_path / "cpu").glob("*.cpp"))


SANITIZE_SWEEP = """
import torch
from gspngen.backends.cpu import CpuBackend
from gspngen.spec import Spec, load_spec
from gspngen.testing import ARG_NAMES, make_inputs
specs = [
    {"connection": 3, "precision": ["fp32", "fp16"], "chunk": 7},
    {"connection": 5, "normalization": "softmax", "weight_groups": 2, "chunk": 2, "merge": "stack", "layout": "nhwc",
     "precision": ["fp32", "bf16"]},
]
shapes = [(2, 2, 5, 1), (1, 2, 17, 33), (1, 2, 16, 37)]  # the last: lr/rl image rows (lines of 16)
for i, fields in enumerate(specs):
    spec = Spec.from_dict({"name": f"san{i}", **fields})
    for dtype in (torch.float32, torch.bfloat16 if i == 1 else torch.float16):
        for shape in shapes:
            args = [make_inputs(spec, *shape, dtype=dtype, seed=i)[n] for n in ARG_NAMES]
            y, saved = CpuBackend().forward(spec, *args)
            CpuBackend().backward(spec, torch.ones_like(y), *args, saved)
print("sweep ok")
"""


def test_sanitizer_sweep(tmp_path):
    # The generated C++ built with AddressSanitizer + UBSan (-fno-sanitize-recover=all), small random-ish sweep.
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not os.path.isabs(libasan) or not os.path.exists(libasan):
        if os.environ.get("CI"):
            pytest.fail("libasan not found (gcc -print-file-name=libasan.so)")
        pytest.skip("libasan not found")
    env = dict(os.environ, GSPNGEN_CPU_SANITIZE="1", LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               GSPNGEN_CACHE_DIR=os.environ["GSPNGEN_CACHE_DIR"], OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", SANITIZE_SWEEP], env=env, capture_output=True, text=True,
                         timeout=600)
    report = res.stderr
    assert res.returncode == 0, report[-4000:]
    assert "sweep ok" in res.stdout
    assert "AddressSanitizer" not in report and "runtime error" not in report, report[-4000:]


# --- the math primitives the printed blocks call, on their own ---

def _primitives_library(tmp_path):
    """gs_bits/gs_exp/gs_exp2/gs_floor/gs_pow2 cut from a rendered source, built with array wrappers."""
    import ctypes
    import re

    src = render_cpu.kernel_source(feature_spec(0))
    start = src.index("template <class To, class From> GS_INLINE To gs_bits")
    end = src.index("// Per-pixel math, printed")
    body = src[start:end]
    assert re.search(r"\bgs_exp\b", body) and "gs_exp2" in body and "gs_floor" in body and "gs_pow2" in body
    harness = (
        "#include <cmath>\n#include <cstdint>\n#include <cstring>\n"
        "#define GS_INLINE static inline __attribute__((always_inline))\n" + body +
        'extern "C" void f32(int op, const float* x, float* y, long n) {\n'
        "  for (long i = 0; i < n; ++i)\n"
        "    y[i] = op == 0 ? gs_exp(x[i]) : op == 1 ? gs_floor(x[i]) : op == 2 ? gs_pow2(x[i]) : gs_exp2(x[i]);\n}\n"
        'extern "C" void f64(int op, const double* x, double* y, long n) {\n'
        "  for (long i = 0; i < n; ++i) y[i] = op == 1 ? gs_floor(x[i]) : gs_pow2(x[i]);\n}\n")
    cpp, lib = tmp_path / "prims.cpp", tmp_path / "prims.so"
    cpp.write_text(harness)
    cxx, _ = cpu_build.find_compiler()
    subprocess.run([cxx, "-std=c++17", "-O2", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", str(cpp),
                    "-o", str(lib)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _apply(lib, op: int, x: torch.Tensor) -> torch.Tensor:
    import ctypes

    x = x.contiguous()
    y = torch.full_like(x, float("nan"))
    fn = lib.f32 if x.dtype == torch.float32 else lib.f64
    fn(ctypes.c_int(op), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_long(x.numel()))
    return y


def test_math_primitives_at_the_edges(tmp_path):
    lib = _primitives_library(tmp_path)
    # exp: within 3e-7 relative of the fp64 value over the whole normal range
    x = torch.linspace(-87.3, 88.3, 200_001, dtype=torch.float32)
    got, want = _apply(lib, 0, x).double(), torch.exp(x.double())
    assert ((got - want).abs() / want).max() <= 3e-7
    # overflow to +inf, flush to 0 deep in the subnormals, NaN and infinities kept
    edge = torch.tensor([88.8, 89.0, 1e4, float("inf"), -87.8, -100.0, -1e4, -float("inf"), float("nan"), 0.0])
    got = _apply(lib, 0, edge)
    assert got[:4].isinf().all() and (got[:4] > 0).all()
    assert (got[4:8] == 0).all() and got[8].isnan() and got[9] == 1.0
    # floor: exact, whatever the magnitude, NaN kept
    for dtype in (torch.float32, torch.float64):
        v = torch.cat([torch.linspace(-300.0, 300.0, 60_001, dtype=dtype),
                       torch.tensor([-0.5, 0.5, -1.0, 4194303.5, -4194303.5, 2.0**23 + 1, -1e30, 1e30], dtype=dtype)])
        assert torch.equal(_apply(lib, 1, v), torch.floor(v))
        assert _apply(lib, 1, torch.tensor([float("nan")], dtype=dtype)).isnan().all()
    # pow2 of whole numbers: exact powers of two down to the smallest normal, then 0; inf above the range
    n32 = torch.arange(-140, 131, dtype=torch.float32)
    want = torch.where(n32 < -126, 0.0, torch.exp2(n32.double())).where(n32 < 128, float("inf"))
    assert torch.equal(_apply(lib, 2, n32).double(), want)
    # far out, including -2^25 .. -1.5 * 2^23, where the magic constant's sum is a small negative float
    far = torch.tensor([float("inf"), 1e10, 2.0**23, 2.0**22 + 2, -(2.0**22) - 2, -(2.0**23), -12582913.0,
                        -(2.0**24), -1.3e7, -2.5e7, -25165820.0, -(2.0**25), -1e10, -float("inf")])
    assert torch.equal(_apply(lib, 2, far), torch.tensor([float("inf")] * 4 + [0.0] * 10))
    # exp2: within 2e-7 relative over the normal range (its polynomial: below 1.7e-7 in fp32);
    # the same edges as exp, and far out on both sides, where the magic constant's sum means nothing
    x = torch.linspace(-125.9, 127.4, 200_001, dtype=torch.float32)
    got, want = _apply(lib, 3, x).double(), torch.exp2(x.double())
    assert ((got - want).abs() / want).max() <= 2e-7
    edge = torch.tensor([128.0, 200.0, 1e6, float("inf"), -127.0, -150.0, -1e6, -float("inf"), float("nan"), 0.0])
    got = _apply(lib, 3, edge)
    assert got[:4].isinf().all() and (got[:4] > 0).all()
    assert (got[4:8] == 0).all() and got[8].isnan() and got[9] == 1.0
    far = torch.tensor([128.0, 2.0**22 + 2, 2.0**23, 1e10, 3e38, -126.6, -127.5, -(2.0**22) - 2, -12582913.0,
                        -1.3e7, -2.5e7, -(2.0**25), -1e10, -3e38])
    assert torch.equal(_apply(lib, 3, far), torch.tensor([float("inf")] * 5 + [0.0] * 9))
    assert _apply(lib, 3, torch.tensor([-float("nan")])).isnan().all()
    assert torch.equal(_apply(lib, 3, torch.arange(-126.0, 128.0)), torch.exp2(torch.arange(-126.0, 128.0)))
    n64 = torch.arange(-1030, 1030, dtype=torch.float64)
    want = torch.where(n64 < -1022, 0.0, torch.exp2(n64)).where(n64 < 1024, float("inf"))
    assert torch.equal(_apply(lib, 2, n64), want)


def test_vector_primitives_match_the_scalar_ones_on_every_input(tmp_path):
    """The 16-lane gs_exp2 and gs_floor (roundscale, scalef) give the scalar functions' bits for all
    2^32 fp32 inputs (any NaN for a NaN), and gs_pow2 for every whole number and infinity: the
    vector line loops then compute exactly what the scalar loops do."""
    import ctypes
    import re

    src = render_cpu.kernel_source(feature_spec(0))
    if _vector_blocks(src) != 1:
        pytest.skip("the compiler builds no 16-lane functions here (they need AVX-512 and GCC)")
    scalar = src[src.index("template <class To, class From> GS_INLINE To gs_bits"):src.index("// Per-pixel math, printed")]
    start = src.index("typedef float gs_vf ")
    vector = src[start:start + re.search(r"\n// \w+ \(16 x float\)", src[start:]).start()]
    harness = (
        "#include <cmath>\n#include <cstdint>\n#include <cstring>\n#include <type_traits>\n#include <immintrin.h>\n"
        "#define GS_INLINE static inline __attribute__((always_inline))\n" + scalar + vector + """
static bool same(float a, float b) { return (a != a && b != b) || gs_bits<uint32_t>(a) == gs_bits<uint32_t>(b); }
extern "C" void compare(uint64_t* bad, uint64_t* checked) {
    for (uint64_t b0 = 0; b0 < (uint64_t(1) << 32); b0 += 16) {
        float x[16];
        for (int i = 0; i < 16; ++i) x[i] = gs_bits<float>(uint32_t(b0 + i));
        const gs_vf v = gs_vld(x), e = gs_exp2(v), f = gs_floor(v), p = gs_pow2(f);
        for (int i = 0; i < 16; ++i) {
            bad[0] += !same(e[i], gs_exp2(x[i]));
            bad[1] += !same(f[i], gs_floor(x[i]));
            const float w = gs_floor(x[i]);  // pow2's inputs: whole numbers and infinities (floor's outputs)
            if (w == w) { bad[2] += !same(p[i], gs_pow2(w)); ++*checked; }
        }
    }
}
""")
    cpp, lib_path = tmp_path / "vprims.cpp", tmp_path / "vprims.so"
    cpp.write_text(harness)
    cxx, _ = cpu_build.find_compiler()
    subprocess.run([cxx, "-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", str(cpp),
                    "-o", str(lib_path)],
                   check=True, capture_output=True)
    bad, checked = (ctypes.c_uint64 * 3)(), ctypes.c_uint64()
    ctypes.CDLL(str(lib_path)).compare(bad, ctypes.byref(checked))
    assert list(bad) == [0, 0, 0] and checked.value > 4_000_000_000


def test_cpu_ab_script(tmp_path):
    """scripts/cpu_ab.py, the A/B the README's kernel timings come from: emits the current source, times
    two sources against each other and reports how far apart their outputs are (0 for the same text)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "cpu_ab.py")
    src = tmp_path / "cur.cpp"
    run = dict(cwd=root, capture_output=True, text=True, timeout=600)
    res = subprocess.run([sys.executable, script, "--emit", str(src)], **run)
    assert res.returncode == 0 and src.read_text() == render_cpu.kernel_source(load_spec(
        os.path.join(root, "examples", "gspn4.yaml")))
    res = subprocess.run([sys.executable, script, str(src), str(src), "--shape", "1,2,16,16", "--rounds", "1",
                          "--calls", "1", "--dtype", "bf16"], **run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "largest difference" in res.stdout and "y 0, gx 0" in res.stdout and "forward" in res.stdout
    res = subprocess.run([sys.executable, script, "--shape", "1,2"], **run)
    assert res.returncode == 2 and "sources" in res.stderr
