"""Finite-check mode: the first NaN/inf is named with its index and whether it came in or was produced."""

from __future__ import annotations

import pytest
import torch

import gspngen
from gspngen.errors import NonFiniteError
from gspngen.testing import make_inputs

SPEC = gspngen.Spec.from_dict({"name": "fin", "directions": ["lr", "tb"], "normalization": "none",
                               "merge": "sum"})


def inputs(requires_grad=False):
    return make_inputs(SPEC, 1, 2, 4, 5, requires_grad=requires_grad)


def test_off_by_default_and_nan_passes_through(monkeypatch):
    monkeypatch.delenv("GSPNGEN_CHECK_FINITE", raising=False)
    op = gspngen.compile(SPEC, backend="reference")
    inp = inputs()
    inp["x"][0, 1, 2, 3] = float("nan")
    assert torch.isnan(op(**inp)).any()


def test_input_that_came_in():
    op = gspngen.compile(SPEC, backend="reference", check_finite=True)
    inp = inputs()
    inp["lam"][0, 1, 1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteError) as info:
        op(**inp)
    e = info.value
    assert (e.tensor, e.index, e.how) == ("lam", (0, 1, 1, 2, 3), "came in")
    assert str(e).startswith("lam: non-finite value inf at index (0, 1, 1, 2, 3) came in")


def test_output_that_was_produced():
    # raw weights ('none') of 1e30 overflow fp32 along the scan: finite inputs, inf result
    op = gspngen.compile(SPEC, backend="reference", check_finite=True)
    inp = {k: None if t is None else t.float() for k, t in inputs().items()}
    inp["w"] = torch.full_like(inp["w"], 1e30)
    with pytest.raises(NonFiniteError) as info:
        op(**inp)
    assert info.value.tensor == "y" and info.value.how == "produced" and "from finite inputs" in str(info.value)


def test_backward_gradients_are_checked():
    op = gspngen.compile(SPEC, backend="reference", check_finite=True)
    inp = inputs(requires_grad=True)
    y = op(**inp)
    gy = torch.ones_like(y)
    gy[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        y.backward(gy)
    assert info.value.tensor == "gy" and info.value.how == "came in"
    y = op(**inp)
    y.backward(torch.full_like(y, 1e38))  # finite, but the weight gradients overflow
    # (if they did not overflow the call passes: make sure at least one gradient was produced)
    assert inp["x"].grad is not None


def test_backward_produced_gradient_is_named(monkeypatch):
    from gspngen.backends.reference import ReferenceBackend

    real = ReferenceBackend.backward

    def broken(self, spec, gy, *args):
        grads = list(real(self, spec, gy, *args))
        grads[2] = grads[2].clone()
        grads[2].view(-1)[7] = float("nan")  # glam
        return tuple(grads)

    monkeypatch.setattr(ReferenceBackend, "backward", broken)
    op = gspngen.compile(SPEC, backend="reference", check_finite=True)
    inp = inputs(requires_grad=True)
    with pytest.raises(NonFiniteError) as info:
        op(**inp).sum().backward()
    assert info.value.tensor == "glam" and info.value.how == "produced"


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("GSPNGEN_CHECK_FINITE", "1")
    op = gspngen.compile(SPEC, backend="reference")
    inp = inputs()
    inp["x"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="^x: "):
        op(**inp)
    monkeypatch.setenv("GSPNGEN_CHECK_FINITE", "maybe")
    with pytest.raises(ValueError, match="GSPNGEN_CHECK_FINITE: expected 1 or 0"):
        gspngen.compile(SPEC, backend="reference")
