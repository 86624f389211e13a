"""The CUDA backends on a GPU against the reference: forward and every gradient.

Marked ``gpu``: skipped only where torch sees no CUDA device. Outputs are
NaN-poisoned before every launch (the backends' ``poison`` flag), so an
element a kernel forgets to write fails the comparison. The reference runs
in fp64 on the same (rounded) inputs.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gspngen
from gspngen.backends.cuda import CudaBackend, CudaPerStepBackend
from gspngen.backends.reference import ReferenceBackend
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from gspngen.testing import make_inputs, rel_error, spec_strategy, tolerance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARGS = ("x", "w", "lam", "u", "s", "m")
REF = ReferenceBackend()
FUSED = CudaBackend(poison=True)
PER_STEP = CudaPerStepBackend(poison=True)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to the reference, floored at 0.1 for gradients that are zero by construction."""
    return rel_error(a, b, floor=0.1)


def run(backend, spec: Spec, dtype: torch.dtype, shape, seed: int = 0, gy_scale: float = 1.0):
    raw = make_inputs(spec, *shape, dtype=torch.float64, seed=seed, device="cuda")
    args = [None if raw[k] is None else raw[k].to(dtype) for k in ARGS]
    y, saved = backend.forward(spec, *args)
    ref_args = [None if a is None else a.double() for a in args]
    y_ref, _ = REF.forward(spec, *ref_args)
    gen = torch.Generator(device="cuda").manual_seed(seed + 7)
    gy = (torch.randn(y_ref.shape, generator=gen, dtype=torch.float64, device="cuda") * gy_scale).to(dtype)
    grads = backend.backward(spec, gy, *args, saved)
    grads_ref = REF.backward(spec, gy.double(), *ref_args, None)
    got = {"y": y, **{f"g{n}": g for n, g in zip(ARGS, grads) if g is not None}}
    want = {"y": y_ref, **{f"g{n}": g for n, g in zip(ARGS, grads_ref) if g is not None}}
    assert got.keys() == want.keys()
    return got, want


def assert_matches(backend, spec: Spec, dname: str, shape, seed: int = 0) -> None:
    dtype = DTYPES[dname]
    got, want = run(backend, spec, dtype, shape, seed)
    bad = {k: err(got[k], want[k]) for k in want if not err(got[k], want[k]) <= tolerance(dtype)}
    assert not bad, f"{backend.name} {spec.to_json()} {dname} {shape}: {bad}"


@settings(max_examples=8, deadline=None)
@given(spec=spec_strategy(), dname=st.sampled_from(["fp32", "bf16", "fp16"]),
       shape=st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 6]), st.integers(1, 70), st.integers(1, 70)),
       seed=st.integers(0, 2**16))
def test_random_specs_both_backends(spec, dname, shape, seed):
    assert_matches(FUSED, spec, dname, shape, seed)
    assert_matches(PER_STEP, spec, dname, shape, seed)


SMALL = (2, 8, 33, 200)  # scripts/device_check.sh's sanitizer case uses this shape too (shared kernel cache)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).stem)
def test_examples_every_dtype(path):
    spec = load_spec(path)
    for dname in spec.precision:
        assert_matches(FUSED, spec, dname, SMALL)


@pytest.mark.parametrize("name, dname, shape", [("gspn4", "fp32", (1, 4, 1024, 1024)),
                                                ("wide5", "bf16", (1, 8, 1024, 1024)),
                                                ("local8", "bf16", (2, 2, 768, 1024))])
def test_large_images(name, dname, shape):
    assert_matches(FUSED, load_spec(ROOT / "examples" / f"{name}.yaml"), dname, shape)


def test_per_step_equals_fused():
    for path in EXAMPLES:
        spec = load_spec(path)
        shape = SMALL
        a, _ = run(FUSED, spec, torch.float32, shape)
        b, _ = run(PER_STEP, spec, torch.float32, shape)
        for k in a:
            assert err(a[k], b[k]) <= tolerance(torch.float32), (spec.name, k)


def test_candidate_configs():
    """Every tuning an autotuner may pick computes what the default does."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    shape = (2, 8, 96, 160)
    cands = {(d, kind): rc.candidate_configs(spec, "fp32", d, kind, *shape[1:])
             for d in spec.directions for kind in ("fwd", "bwd")}
    for i in range(max(len(v) for v in cands.values())):
        be = CudaBackend(poison=True, configs=lambda sp, dn, d, kind, C, H, W: cands[(d, kind)][
            min(i, len(cands[(d, kind)]) - 1)])
        assert_matches(be, spec, "fp32", shape)


def test_concurrent_directions():
    """cc=1: the directions on side streams into slices of a temporary, summed on the caller's stream.
    The inputs are written on the caller's stream behind a long spin kernel, and every launch on a side
    stream is itself preceded by one: a missing fork (a side stream not waiting for the inputs) reads
    unwritten memory, a missing join (the sum or the caller not waiting for a direction) reads the
    NaN-poisoned temporary. Every example, fp32 and bf16, against the default path."""
    from gspngen.runtime.cuda_build import default_runner

    class SlowSides:
        def __init__(self, inner, main):
            self.inner, self.main = inner, main

        def kernel(self, *a):
            return self.inner.kernel(*a)

        def limits(self, device):
            return self.inner.limits(device)

        def launch(self, kernel, device, grid, block, smem, args):
            if torch.cuda.current_stream(device) != self.main:
                torch.cuda._sleep(20_000_000)
            self.inner.launch(kernel, device, grid, block, smem, args)

    main = torch.cuda.current_stream()
    be = CudaBackend(runner=SlowSides(default_runner(), main), poison=True).with_config("cc=1", "cc=1")
    for path in EXAMPLES:
        spec = load_spec(path)
        for dname in ("fp32", "bf16"):
            if dname not in spec.precision:
                continue
            raw = make_inputs(spec, *SMALL, dtype=DTYPES[dname], device="cuda")
            staged = [raw[k] for k in ARGS]
            want_y, want_h = FUSED.forward(spec, *staged)
            gy = torch.randn_like(want_y)
            want_g = FUSED.backward(spec, gy, *staged, want_h)
            torch.cuda._sleep(50_000_000)
            args = [None if t is None else t.clone() for t in staged]  # written after the spin, on main
            y, h = be.forward(spec, *args)
            g = be.backward(spec, gy, *args, h)
            tol = tolerance(DTYPES[dname])
            assert err(y, want_y) <= tol, (spec.name, dname)
            for a, b in zip(g, want_g):
                if b is not None:
                    assert err(a, b) <= tol, (spec.name, dname)


def test_transposed_passes():
    """tr=1 in both passes: left/right scans (and their adjoints) as top/bottom ones on transposed planes
    (tiled transposes in and out); every example (nhwc ones fall back to the default path) and a shape whose
    sides are not multiples of the 32 x 32 transpose tile, against the reference."""
    be = CudaBackend(poison=True).with_config("tr=1", "tr=1")
    for path in EXAMPLES:
        spec = load_spec(path)
        for dname in spec.precision:
            assert_matches(be, spec, dname, SMALL)
    assert_matches(be, load_spec(ROOT / "examples" / "gspn4.yaml"), "fp32", (1, 4, 300, 1100))


def test_cluster_lines():
    """cl=2/4/8 in both passes (sm_90+: each line over a thread block cluster, edge lanes through DSMEM),
    alone and with cc=1 / tr=1, against the reference; on an older GPU the host refuses the tuning."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    if torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ValueError, match="compute capability 9.0"):
            assert_matches(CudaBackend(poison=True).with_config("cl=2", "cl=2"), spec, "fp32", (1, 2, 70, 72))
        return
    for key in ("cl=2", "cl=4", "cl=8", "cl=2,cc=1", "cl=4,tr=1"):
        be = CudaBackend(poison=True).with_config(key, key)
        for dname in ("fp32", "bf16"):
            assert_matches(be, spec, dname, (1, 3, 300, 260))
    assert_matches(CudaBackend(poison=True).with_config("cl=8", "cl=8"), spec, "fp32", (1, 2, 1030, 2048))


def test_one_launch():
    """ml=1 (every direction of a pass in one launch, each into its own slice) alone and, on sm_90+, with
    cl=2/8, among them 16-thread blocks (one partial warp) at 128-lane lines, against the reference."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    keys = ["ml=1"] + (["cl=2,ml=1", "cl=8,ml=1"] if torch.cuda.get_device_capability()[0] >= 9 else [])
    for key in keys:
        be = CudaBackend(poison=True).with_config(key, key)
        for dname in ("fp32", "bf16"):
            assert_matches(be, spec, dname, (1, 3, 128, 128))
    if len(keys) > 1:
        assert_matches(CudaBackend(poison=True).with_config("cl=8,ml=1", "cl=8,ml=1"), spec, "fp32",
                       (1, 2, 1024, 1024))


def test_ring_tunings():
    """The prefetch ring in shared memory (cp.async) in both passes, every ring candidate of each direction
    in turn, against the reference."""
    from gspngen.render import cuda as rc

    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    for i in range(3):
        def choose(spec, dname, direction, kind, C, H, W, i=i):
            rings = [c for c in rc.candidate_configs(spec, dname, direction, kind, C, H, W) if c.ring]
            return rings[min(i, len(rings) - 1)] if rings else None
        be = CudaBackend(poison=True, configs=choose)
        for dname in ("fp32", "bf16"):
            assert_matches(be, spec, dname, (2, 3, 128, 256))
        assert_matches(be, spec, "fp32", (1, 2, 1024, 1024))


def test_public_op_autograd_and_streams():
    """gspngen.compile(..., backend='cuda') is differentiable and runs on the current stream."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    raw = make_inputs(spec, 2, 4, 48, 64, dtype=torch.float32, device="cuda", requires_grad=True)
    args = [raw[k] for k in ARGS]
    op = gspngen.compile(spec, backend="cuda")
    ref = gspngen.compile(spec, backend="reference")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = op(*args)
        g = torch.autograd.grad(y.square().sum(), args)
    torch.cuda.current_stream().wait_stream(stream)
    y_ref = ref(*args)
    g_ref = torch.autograd.grad(y_ref.square().sum(), args)
    assert err(y, y_ref) <= 1e-5
    for a, b in zip(g, g_ref):
        assert err(a, b) <= 1e-4


@pytest.mark.parametrize("direction", ["tb", "lr"])
def test_more_than_2_31_elements(direction):
    """N*C*H*W > 2^31 in bf16: 64-bit offsets. With k = 1 and stability the scan is a running sum,
    h = cumsum(lam * x) along the step axis, so the last channels (past 2^31) are checked exactly."""
    spec = Spec.from_dict({"name": "big", "connection": 1, "directions": [direction], "modulation": False,
                           "skip": False, "merge": "sum", "weight_groups": "shared", "precision": ["bf16"]})
    N, C, H, W = 1, 2049, 1024, 1024
    assert N * C * H * W > 2**31
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand((N, C, H, W), generator=gen, device=dev, dtype=torch.bfloat16)
    lam = torch.rand((N, 1, C, H, W), generator=gen, device=dev, dtype=torch.bfloat16)
    w = torch.zeros((N, 1, 1, 1, H, W), device=dev, dtype=torch.bfloat16)
    y, saved = FUSED.forward(spec, x, w, lam, None, None, None)
    axis = -1 if direction == "lr" else -2
    for c in (0, C - 1):
        want = torch.cumsum(lam[0, 0, c].float() * x[0, c].float(), dim=axis)
        assert err(y[0, c], want) <= 2e-2, c
    gy = torch.rand((N, C, H, W), generator=gen, device=dev, dtype=torch.bfloat16)
    gx, gw, glam, _, _, _ = FUSED.backward(spec, gy, x, w, lam, None, None, None, saved)
    del saved
    c = C - 1
    gh = torch.flip(torch.cumsum(torch.flip(gy[0, c].float(), [axis]), dim=axis), [axis])  # reverse cumsum
    assert err(gx[0, c], gh * lam[0, 0, c].float()) <= 2e-2
    assert err(glam[0, 0, c], gh * x[0, c].float()) <= 2e-2
    assert torch.count_nonzero(gw) == 0
    # ~30 GB: hand it back, other pytest workers share this GPU (scripts/device_check.sh)
    del x, lam, w, y, gy, gx, gw, glam
    torch.cuda.empty_cache()
