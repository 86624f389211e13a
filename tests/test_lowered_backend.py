"""The `lowered` backend (printed torch code, reverse-scan adjoint) against the reference backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import gspngen
from gspngen import Spec
from gspngen.backends import get_backend
from gspngen.geometry import from_frame, neighbour_exists, to_channel_first, to_frame
from gspngen.testing import ARG_NAMES, make_inputs, rel_error, spec_strategy, tolerance


def run(spec, backend, inputs, gy):
    """Result and the gradient of every input that exists (through the op and its backward)."""
    leaves = {n: (t.detach().clone().requires_grad_(True) if t is not None else None) for n, t in inputs.items()}
    op = gspngen.compile(spec, backend=backend)
    y = op(leaves["x"], leaves["w"], leaves["lam"], u=leaves["u"], s=leaves["s"], m=leaves["m"])
    present = [n for n in ARG_NAMES if leaves[n] is not None]
    grads = torch.autograd.grad(y, [leaves[n] for n in present], gy)
    return y.detach(), dict(zip(present, grads))


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Like gspngen.testing.rel_error (NaN gives inf), but relative to at least 1: inputs are O(1),
    and a gradient that is exactly zero in exact arithmetic (e.g. the lone weight of a one-lane
    line) is only rounding noise in both backends."""
    if rel_error(a, b) == float("inf"):
        return float("inf")
    a64, b64 = a.detach().double(), b.detach().double()
    return (a64 - b64).abs().max().item() / max(b64.abs().max().item(), 1.0) if b.numel() else 0.0


def assert_matches_reference(spec, N, C, H, W, dtype=torch.float64, seed=0):
    inputs = make_inputs(spec, N, C, H, W, dtype=dtype, seed=seed, logit_scale=2.0)
    gy = _gy(spec, inputs, seed)
    y_ref, g_ref = run(spec, "reference", inputs, gy)
    y, g = run(spec, "lowered", inputs, gy)
    tol = tolerance(dtype)
    assert error(y, y_ref) <= tol, ("y", error(y, y_ref))
    assert set(g) == set(g_ref)
    for name in g_ref:
        err = error(g[name], g_ref[name])
        assert err <= tol, (name, err)


def _gy(spec, inputs, seed):
    x = inputs["x"]
    shape = (x.shape[0], spec.num_directions, *x.shape[1:]) if spec.merge == "stack" else x.shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(x.dtype)


@st.composite
def spec_and_shape(draw):
    spec = draw(spec_strategy())
    C = draw(st.sampled_from([2, 4] if spec.weight_groups == 2 else [1, 2, 3]))
    return spec, draw(st.integers(1, 2)), C, draw(st.integers(1, 5)), draw(st.integers(1, 5))


@given(spec_and_shape(), st.integers(0, 2**16))
def test_lowered_equals_reference_on_random_specs(case, seed):
    spec, N, C, H, W = case
    assert_matches_reference(spec, N, C, H, W, seed=seed)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape,chunk,k", [
    ((1, 2, 1, 6), None, 3),  # H = 1: lr/rl have a single lane, tb/bt a single step
    ((2, 2, 5, 1), 2, 5),  # W = 1
    ((1, 2, 3, 7), 3, 9),  # chunk does not divide the step count; k far larger than a lane axis
    ((1, 4, 2, 2), 1, 7),  # every step starts a chunk
])
def test_edge_shapes(layout, shape, chunk, k):
    for norm in ("stability", "softmax", "none"):
        spec = Spec.from_dict({"name": "edge", "connection": k, "chunk": chunk, "layout": layout,
                               "normalization": norm, "weight_groups": 2, "merge": "learned"})
        assert_matches_reference(spec, *shape)


def test_stack_and_mean_merges_and_shared_weights():
    for merge in ("stack", "mean", "sum"):
        spec = Spec.from_dict({"name": "m", "merge": merge, "weight_groups": "shared", "connection": 5,
                               "directions": ["tb", "rl", "lr"], "layout": "nhwc"})
        assert_matches_reference(spec, 2, 3, 4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions(dtype):
    spec = Spec.from_dict({"name": "p", "connection": 5, "normalization": "softmax", "chunk": 3})
    assert_matches_reference(spec, 1, 2, 5, 6, dtype=dtype)


def test_garbage_logits_of_missing_neighbours():
    """inf/NaN logits where a neighbour does not exist: finite output, exact-zero gradient there."""
    for norm in ("stability", "softmax", "none"):
        spec = Spec.from_dict({"name": "g", "connection": 5, "normalization": norm, "merge": "sum",
                               "directions": ["lr", "bt"]})
        inputs = make_inputs(spec, 1, 2, 4, 3, seed=3)
        clean = run(spec, "reference", inputs, _gy(spec, inputs, 0))
        w = inputs["w"].clone()
        missing = torch.zeros_like(w, dtype=torch.bool)
        for d, name in enumerate(spec.directions):
            frame = to_frame(missing[:, d], name)  # (N, k, G, L, T); a copy for bt (flip)
            L = frame.shape[-2]
            mask = ~neighbour_exists(L, spec.connection)[None, :, None, :, None].expand_as(frame)
            missing[:, d] = from_frame(mask, name)
        assert missing.any() and not missing.all()
        w[missing] = float("nan")
        w[missing & (torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5)] = float("inf")
        dirty = {**inputs, "w": w}
        y, g = run(spec, "lowered", dirty, _gy(spec, inputs, 0))
        assert torch.isfinite(y).all()
        assert error(y, clean[0]) <= 1e-10
        for name, grad in g.items():
            assert torch.isfinite(grad).all(), name
            if name != "w":
                assert error(grad, clean[1][name]) <= 1e-10, name
        assert (g["w"][missing] == 0).all()
        assert error(g["w"][~missing], clean[1]["w"][~missing]) <= 1e-10


def test_mass_conservation():
    """stability/softmax, lam = 1, a line of ones at step t0: h = 1 at every later step of its chunk."""
    for norm in ("stability", "softmax"):
        spec = Spec.from_dict({"name": "mc", "directions": ["bt"], "connection": 5, "normalization": norm,
                               "modulation": False, "skip": False, "merge": "sum", "chunk": 4})
        N, C, H, W = 1, 2, 7, 5
        inputs = make_inputs(spec, N, C, H, W, seed=1, logit_scale=6.0)
        x = torch.zeros(N, C, H, W, dtype=torch.float64)
        x[:, :, 5] = 1.0  # bt visits rows 6, 5, 4, 3 (chunk 0), then 2, 1, 0 (chunk 1)
        inputs.update(x=x, lam=torch.ones_like(inputs["lam"]))
        y, _ = get_backend("lowered").forward(spec, *(inputs[n] for n in ARG_NAMES))
        assert (y[:, :, 6] == 0).all()  # before the line
        assert torch.allclose(y[:, :, 3:6], torch.ones(1, dtype=torch.float64), atol=1e-14, rtol=0)
        assert (y[:, :, :3] == 0).all()  # the next chunk restarts from x = 0


def test_saved_tensor_and_fake_shapes():
    spec = Spec.from_dict({"name": "s", "layout": "nhwc", "directions": ["rl", "tb"]})
    inputs = make_inputs(spec, 2, 3, 4, 5)
    be = get_backend("lowered")
    y, saved = be.forward(spec, *(inputs[n] for n in ARG_NAMES))
    shape, dtype = be.saved_shape(spec, inputs["x"])
    assert tuple(saved.shape) == shape == (2, 2, 3, 4, 5) and saved.dtype == dtype
    assert torch.isfinite(saved).all()  # every h written
    # saved holds h of each direction in the image frame: h at the first step is lam * x
    x_cf = to_channel_first(inputs["x"], "nhwc")
    lam0 = to_channel_first(inputs["lam"][:, 0], "nhwc")
    assert torch.allclose(saved[:, 0, ..., -1], (lam0 * x_cf)[..., -1])  # rl starts at the last column


def test_backward_runs_the_printed_adjoint_not_autograd(monkeypatch):
    """Break torch autograd for everything but the op call: the lowered backward still works."""
    spec = Spec.from_dict({"name": "na", "connection": 3})
    inputs = make_inputs(spec, 1, 2, 3, 3)
    be = get_backend("lowered")
    y, saved = be.forward(spec, *(inputs[n] for n in ARG_NAMES))
    gy = torch.ones_like(y)

    def no_autograd(*a, **k):
        raise AssertionError("autograd used")

    monkeypatch.setattr(torch.autograd, "grad", no_autograd)
    monkeypatch.setattr(torch.func, "vjp", no_autograd)
    with torch.no_grad():
        grads = be.backward(spec, gy, *(inputs[n] for n in ARG_NAMES), saved)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_opcheck():
    spec = Spec.from_dict({"name": "oc", "connection": 3, "directions": ["lr", "tb"], "chunk": 2})
    inputs = make_inputs(spec, 1, 2, 3, 4, requires_grad=True)
    args = (*(inputs[n] for n in ARG_NAMES), spec.to_json(), "lowered")
    result = torch.library.opcheck(torch.ops.gspngen.scan, args)  # every test, test_aot_dispatch_dynamic included
    assert set(result.values()) == {"SUCCESS"}, result
