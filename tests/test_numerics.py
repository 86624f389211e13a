"""Numerics at the edges: finite logits never give NaN, in every backend, and match a high-precision oracle.

With ``stability`` the textbook weights sigmoid(a_c) / sum sigmoid(a_c') underflow to 0/0 once
every logit is below about -88 (fp32); the lowering's scaled form is exact for every finite logit
(gspngen/lower/derive.py, ``scaled_sigmoid``). Logits are drawn from
{-1e4, -1e3, -100, -30, 0, 30, 100, 1e4} and mixtures; results are compared with the float64
reference, which is itself checked against an mpmath evaluation of DESIGN §4 at 60 digits.
"""

from __future__ import annotations

import mpmath
import pytest
import torch

import naive
from gspngen.backends import BACKEND_NAMES, backend_available, get_backend
from gspngen.spec import Spec
from gspngen.testing import ARG_NAMES, make_inputs, rel_error, tolerance

EXTREME = (-1e4, -1e3, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4)
REF = get_backend("reference")


def spec_of(k: int, norm: str = "stability", **kw) -> Spec:
    return Spec.from_dict({"name": "edge", "connection": k, "directions": ["lr", "tb"], "normalization": norm,
                           "weight_groups": "channel", "merge": "learned", "precision": ["fp32"], **kw})


def extreme_inputs(spec: Spec, shape, seed: int, pattern: str) -> dict:
    """Inputs whose logits come from EXTREME: all one value, or a per-element mixture."""
    inp = make_inputs(spec, *shape, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    w = inp["w"]
    if pattern == "mixed":
        idx = torch.randint(len(EXTREME), w.shape, generator=gen)
        inp["w"] = torch.tensor(EXTREME, dtype=torch.float64)[idx]
    else:
        inp["w"] = torch.full_like(w, float(pattern))
    return inp


def run(backend_name: str, spec: Spec, inp: dict, dtype: torch.dtype):
    be = get_backend(backend_name)
    args = [None if inp[a] is None else inp[a].to(dtype) for a in ARG_NAMES]
    y, saved = be.forward(spec, *args)
    gy = torch.ones_like(y)
    grads = be.backward(spec, gy, *args, saved)
    return y, [g for g in grads if g is not None]


def backends_here() -> list[str]:
    names = ["reference", "lowered"]
    if backend_available("triton", torch.device("cpu")):
        names.append("triton")
    if "cpu" in BACKEND_NAMES and backend_available("cpu", torch.device("cpu")):
        names.append("cpu")
    return names


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("pattern", ["mixed", "-10000.0", "-1000.0", "-100.0", "10000.0"])
def test_extreme_logits_finite_and_exact_in_every_backend(k, pattern):
    spec = spec_of(k)
    inp = extreme_inputs(spec, (1, 2, 5, 6), seed=k, pattern=pattern)
    y64, g64 = run("reference", spec, inp, torch.float64)
    assert torch.isfinite(y64).all() and all(torch.isfinite(g).all() for g in g64)
    for name in backends_here():
        for dtype in (torch.float32, torch.float64):
            if name == "triton" and dtype == torch.float64:
                continue  # the Triton kernels store fp32/fp16/bf16
            y, g = run(name, spec, inp, dtype)
            assert torch.isfinite(y).all(), (name, dtype)
            assert rel_error(y, y64) <= tolerance(dtype), (name, dtype, rel_error(y, y64))
            for a, b in zip(g, g64):
                assert torch.isfinite(a).all(), (name, dtype)
                assert rel_error(a, b, floor=0.1) <= tolerance(dtype), (name, dtype, rel_error(a, b, floor=0.1))


def test_reference_matches_mpmath_at_extreme_logits(monkeypatch):
    """The float64 reference against DESIGN §4 evaluated with 60-digit arithmetic."""
    mpmath.mp.dps = 60

    def norm(logits, exists, normalization):
        a = [1 / (1 + mpmath.exp(-mpmath.mpf(w))) if e else mpmath.mpf(0) for w, e in zip(logits, exists)]
        z = sum(a)
        return [v / z for v in a]

    monkeypatch.setattr(naive, "_norm", norm)
    spec = spec_of(3, merge="sum")
    inp = extreme_inputs(spec, (1, 1, 4, 5), seed=1, pattern="mixed")
    inp["m"] = None
    want = naive.naive_gspn(spec, *[None if inp[a] is None else inp[a].tolist() for a in ARG_NAMES])
    got, _ = REF.forward(spec, *[inp[a] for a in ARG_NAMES])
    want_t = torch.tensor([[[[float(v) for v in row] for row in ch] for ch in n] for n in want], dtype=torch.float64)
    assert rel_error(got, want_t) <= 1e-12


def test_all_logits_far_below_zero_give_uniform_weights():
    # every existing neighbour at -1e4: sigmoid/sum tends to a softmax of equal logits, i.e. uniform
    spec = Spec.from_dict({"name": "u", "connection": 3, "directions": ["tb"], "modulation": False, "skip": False,
                           "merge": "sum"})
    H, W = 3, 4
    x = torch.zeros(1, 1, H, W, dtype=torch.float64)
    x[0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.full((1, 1, 3, 1, H, W), -1e4, dtype=torch.float64)
    lam = torch.ones(1, 1, 1, H, W, dtype=torch.float64)
    for name in backends_here():
        y = get_backend(name).forward(spec, x.float() if name == "triton" else x, w.to(x.dtype if name != "triton"
                                      else torch.float32), lam.to(x.dtype if name != "triton" else torch.float32),
                                      None, None, None)[0]
        row1 = y[0, 0, 1].double()
        want = torch.tensor([1.5, 2.0, 3.0, 3.5], dtype=torch.float64)  # edges average 2, the middle 3
        assert torch.allclose(row1, want, rtol=1e-6, atol=0), (name, row1)


@pytest.mark.parametrize("name", ["reference", "lowered"])
def test_infinite_logits_are_the_limits(name):
    # +inf: sigmoid 1; -inf: weight 0; every existing neighbour -inf: NaN (no limit exists)
    spec = Spec.from_dict({"name": "i", "connection": 3, "directions": ["tb"], "modulation": False, "skip": False,
                           "merge": "sum"})
    x = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    x[0, 0, 0] = torch.tensor([1.0, 2.0, 4.0])
    lam = torch.ones(1, 1, 1, 2, 3, dtype=torch.float64)
    w = torch.zeros(1, 1, 3, 1, 2, 3, dtype=torch.float64)
    w[0, 0, :, 0, 1, 1] = torch.tensor([float("inf"), 0.0, float("-inf")])  # middle pixel of row 1
    w[0, 0, :, 0, 1, 0] = float("-inf")  # left edge: both existing neighbours -inf
    y = get_backend(name).forward(spec, x, w, lam, None, None, None)[0]
    # middle: weights sigmoid(inf)=1, sigmoid(0)=1/2, 0, normalised: 2/3, 1/3, 0 over values 1, 2, 4
    assert y[0, 0, 1, 1].item() == pytest.approx(2 / 3 * 1 + 1 / 3 * 2, rel=1e-12)
    assert torch.isnan(y[0, 0, 1, 0])


@pytest.mark.parametrize("pattern", ["mixed", "-10000.0"])
def test_extreme_logits_in_the_cuda_emulator(pattern):
    """The generated CUDA kernels (run by the CPU emulator, tests/cuda_emu) at the same edges."""
    from cuda_emu.emulator import EmuRunner
    from gspngen.backends.cuda import CudaBackend

    spec = spec_of(3)
    inp = extreme_inputs(spec, (1, 2, 5, 6), seed=3, pattern=pattern)
    y64, g64 = run("reference", spec, inp, torch.float64)
    runner = EmuRunner(order=0, sm_count=2, opt="-O0")
    try:
        be = CudaBackend(runner=runner, poison=True)
        args = [None if inp[a] is None else inp[a].float() for a in ARG_NAMES]
        y, saved = be.forward(spec, *args)
        grads = [g for g in be.backward(spec, torch.ones_like(y), *args, saved) if g is not None]
    finally:
        runner.close()
    assert torch.isfinite(y).all() and rel_error(y, y64) <= tolerance(torch.float32)
    for a, b in zip(grads, g64):
        assert torch.isfinite(a).all() and rel_error(a, b, floor=0.1) <= tolerance(torch.float32)


@pytest.mark.parametrize("centre", [True, False])
def test_a_nan_logit_of_an_existing_neighbour_gives_nan_as_in_the_reference(centre):
    # (a clamp written as fmin(80, a) would turn a NaN logit into 80 and hide it)
    spec = spec_of(3)
    inp = make_inputs(spec, 1, 2, 5, 6, dtype=torch.float64, seed=2)
    inp["w"][0, 0, 1 if centre else 0, 0, 2, 3] = float("nan")  # lr: pixel (2, 3), neighbour above exists
    y_ref, _ = run("reference", spec, inp, torch.float64)
    assert torch.isnan(y_ref).any()
    for name in backends_here():
        for dtype in (torch.float32, torch.float64):
            if name == "triton" and dtype == torch.float64:
                continue
            y, _ = run(name, spec, inp, dtype)
            assert torch.equal(torch.isnan(y), torch.isnan(y_ref)), (name, dtype)
