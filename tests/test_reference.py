"""The reference backend against DESIGN §4: a naive per-pixel loop, gradients, the stability
property, dense connectivity, GSPN-1 compatibility, and the custom op's registration."""

import pytest
import torch
from hypothesis import given, strategies as st

import gspngen
from gspngen.testing import make_inputs, spec_strategy

from naive import naive_gspn


def _nchw(spec, name, t):
    """A tensor of the spec's layout as the NCHW-ordered nested list the naive code reads."""
    if t is None:
        return None
    if spec.layout == "nhwc" and name != "m":
        t = t.movedim(-1, -3)
    return t.tolist()


@st.composite
def cases(draw, **fixed):
    spec = draw(spec_strategy(**fixed))
    C = draw(st.sampled_from([2, 4])) if spec.weight_groups == 2 else draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return spec, draw(st.integers(1, 2)), C, H, W, draw(st.integers(0, 2**16))


@given(cases())
def test_reference_matches_naive_loop(case):
    spec, N, C, H, W, seed = case
    inp = make_inputs(spec, N, C, H, W, seed=seed)
    y = gspngen.compile(spec, backend="reference")(**inp)
    want = torch.tensor(naive_gspn(spec, **{k: _nchw(spec, k, v) for k, v in inp.items()}), dtype=torch.float64)
    if spec.layout == "nhwc":
        want = want.movedim(-3, -1)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@given(cases())
def test_reference_gradcheck(case):
    spec, N, C, H, W, seed = case
    inp = make_inputs(spec, 1, C, min(H, 3), min(W, 3), seed=seed, requires_grad=True)
    op = gspngen.compile(spec, backend="reference")
    names = [k for k, v in inp.items() if v is not None]

    def f(*ts):
        return op(**dict(zip(names, ts)))

    # fast mode checks random projections u^T J v: as sensitive to a wrong gradient, one
    # finite difference per input instead of one per element (25 examples: ~4 s instead of ~20 s).
    # rtol 1e-5, not the default 1e-3, which lets a gradient 0.1 % off pass.
    assert torch.autograd.gradcheck(f, tuple(inp[k] for k in names), eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=True)


@given(spec_strategy(normalization=st.sampled_from(["stability", "softmax"]), modulation=False, skip=False,
                     merge="stack", chunk=st.sampled_from([None, 1, 2, 3, 5])),
       st.integers(1, 7), st.integers(1, 7), st.data())
def test_stability_mass_conservation(spec, H, W, data):
    """lam = 1 and a line of ones at step t0: h = 1 at every later step of t0's chunk, 0 elsewhere."""
    C = 2
    inp = make_inputs(spec, 1, C, H, W, seed=data.draw(st.integers(0, 999)), logit_scale=40.0)
    inp["lam"] = torch.ones_like(inp["lam"])
    y = gspngen.compile(spec, backend="reference")
    for d, direction in enumerate(spec.directions):
        T = W if direction in ("lr", "rl") else H
        t0 = data.draw(st.integers(0, T - 1))
        x = torch.zeros(1, C, H, W, dtype=torch.float64)
        pos = T - 1 - t0 if direction in ("rl", "bt") else t0
        if direction in ("lr", "rl"):
            x[..., pos] = 1
        else:
            x[..., pos, :] = 1
        if spec.layout == "nhwc":
            x = x.movedim(1, -1)
        h = y(**{**inp, "x": x})[:, d]
        if spec.layout == "nhwc":
            h = h.movedim(-1, 1)
        K = spec.chunk or T
        for t in range(T):
            p = T - 1 - t if direction in ("rl", "bt") else t
            line = h[..., p] if direction in ("lr", "rl") else h[..., p, :]
            if t0 <= t < (t0 // K + 1) * K:
                assert (line - 1).abs().max().item() <= 1e-12, (direction, t, t0)
            else:
                assert (line == 0).all(), (direction, t, t0)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("norm", ["stability", "softmax", "none"])
def test_dense_pairwise_connectivity(k, norm):
    spec = gspngen.Spec.from_dict({"name": "t", "connection": k, "normalization": norm})
    inp = make_inputs(spec, 1, 2, 5, 6, seed=3)
    for name in ("lam", "u", "m"):
        inp[name] = inp[name].abs() + 0.5
    if norm == "none":
        inp["w"] = inp["w"].abs() + 0.1
    op = gspngen.compile(spec, backend="reference")
    J = torch.autograd.functional.jacobian(lambda x: op(**{**inp, "x": x}), inp["x"])
    # |dy[n,c,p] / dx[n,c,q]| summed over channels: no zero anywhere
    J = J.abs().sum(dim=(0, 1, 4, 5))
    assert (J > 0).all()


def test_gspn1_compatibility_hand_example():
    """lr, k=3, G=C, none, no modulation/skip: h = B*x + G1*h[row-1] + G2*h[row] + G3*h[row+1] (prev column)."""
    spec = gspngen.Spec.from_dict({"name": "t", "directions": ["lr"], "normalization": "none",
                                   "modulation": False, "skip": False, "merge": "sum"})
    x = torch.tensor([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]], dtype=torch.float64).view(1, 1, 3, 2)
    lam = torch.full((1, 1, 1, 3, 2), 0.5, dtype=torch.float64)
    w = torch.zeros(1, 1, 3, 1, 3, 2, dtype=torch.float64)
    w[0, 0, 0], w[0, 0, 1], w[0, 0, 2] = 0.1, 0.2, 0.3  # G1 (row above), G2 (same row), G3 (row below)
    y = gspngen.compile(spec, backend="reference")(x, w, lam)
    # column 0: 0.5*x; column 1 by hand, e.g. row 1: 0.5*5 + 0.1*0.5 + 0.2*1.0 + 0.3*1.5 = 3.2
    want = torch.tensor([[0.5, 2.4], [1.0, 3.2], [1.5, 3.4]], dtype=torch.float64).view(1, 1, 3, 2)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-15)


def test_stability_normalisation_borders_by_hand():
    """Zero logits: sigmoid = 1/2 each; interior rows weigh 3 neighbours 1/3, border rows 2 neighbours 1/2."""
    spec = gspngen.Spec.from_dict({"name": "t", "directions": ["lr"], "modulation": False, "skip": False,
                                   "merge": "sum"})
    x = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    x[..., 0] = torch.tensor([3.0, 6.0, 9.0])
    lam = torch.ones(1, 1, 1, 3, 2, dtype=torch.float64)
    w = torch.zeros(1, 1, 3, 1, 3, 2, dtype=torch.float64)
    y = gspngen.compile(spec, backend="reference")(x, w, lam)
    torch.testing.assert_close(y[0, 0, :, 1], torch.tensor([4.5, 6.0, 7.5], dtype=torch.float64))


def test_garbage_logits_of_missing_neighbours_are_ignored():
    spec = gspngen.Spec.from_dict({"name": "t", "connection": 5, "normalization": "softmax"})
    inp = make_inputs(spec, 1, 2, 4, 4, seed=1, requires_grad=False)
    op = gspngen.compile(spec, backend="reference")
    y0 = op(**inp)
    w = inp["w"].clone()
    # lane 0 has no neighbour at offsets -2, -1 (c = 0, 1): poison those logits
    w[:, :2, 0:2, :, 0, :] = float("nan")  # lr/rl lanes are rows
    w[:, 2:, 0:2, :, :, 0] = float("inf")  # tb/bt lanes are columns
    w.requires_grad_(True)
    y1 = op(**{**inp, "w": w})
    torch.testing.assert_close(y0, y1)
    (g,) = torch.autograd.grad(y1.sum(), w)
    assert torch.isfinite(g).all()
    assert (g[:, :2, 0:2, :, 0, :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(dtype):
    spec = gspngen.Spec.from_dict({"name": "t"})
    inp = make_inputs(spec, 1, 3, 6, 5, seed=2)
    op = gspngen.compile(spec, backend="reference")
    want = op(**{k: v.to(dtype).double() if v is not None else None for k, v in inp.items()})
    got = op(**{k: v.to(dtype) if v is not None else None for k, v in inp.items()})
    assert got.dtype == dtype
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_opcheck_custom_op():
    spec = gspngen.Spec.from_dict({"name": "t", "connection": 3, "chunk": 2})
    inp = make_inputs(spec, 1, 2, 3, 4, seed=0, requires_grad=True)
    args = (*[inp[k] for k in ("x", "w", "lam", "u", "s", "m")], spec.to_json(), "reference")
    torch.library.opcheck(torch.ops.gspngen.scan.default, args)


@pytest.mark.parametrize("backend", ["reference", "lowered"])
def test_torch_compile_no_graph_break(backend):
    """fullgraph, forward and backward through AOTAutograd (the fake impls and register_autograd)."""
    spec = gspngen.Spec.from_dict({"name": "t", "connection": 3, "merge": "stack", "layout": "nhwc",
                                   "weight_groups": 2})
    inp = make_inputs(spec, 1, 2, 3, 4, seed=0, dtype=torch.float32, requires_grad=True)
    op = gspngen.compile(spec, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(lambda **kw: op(**kw) * 2, fullgraph=True, backend="aot_eager")
    names = [k for k, v in inp.items() if v is not None]
    y = compiled(**inp)
    want = op(**inp) * 2
    torch.testing.assert_close(y, want)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [inp[k] for k in names], gy)
    for name, g, r in zip(names, got, torch.autograd.grad(want, [inp[k] for k in names], gy)):
        torch.testing.assert_close(g, r, msg=name)
