"""No h store when no input requires a gradient (issue 13, item 2).

``Backend.forward(..., need_saved=False)`` returns an empty ``saved`` and, in
the kernel backends, runs code that never stores h. The op's no-grad hot path
asks for it; the custom op (training) keeps saving. Checked here: results are
equal with and without, every output is still written (NaN-poisoned), the
emulated CUDA kernels write no byte of h (the empty saved tensor is the only
buffer registered for it, so any store would be out of bounds) and their
store count drops by exactly one plane per direction, and the forward of
gspn4 fp32 moves at most 1.35x the minimal bytes.
"""

from __future__ import annotations

import pytest
import torch

from cuda_emu.emulator import EmuRunner
from gspngen import api
from gspngen.backends import get_backend
from gspngen.backends.cpu import CpuBackend
from gspngen.backends.cuda import CudaBackend
from gspngen.backends.lowered import LoweredBackend
from gspngen.bench import minimal_bytes
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from gspngen.testing import make_inputs

ARGS = ("x", "w", "lam", "u", "s", "m")
LIMITS = (2, 227 * 1024)
GSPN4 = load_spec("examples/gspn4.yaml")
STACK_NHWC = Spec.from_dict({"name": "stk", "precision": ["fp32", "bf16"], "connection": 5,
                             "directions": ["rl", "tb", "bt"], "merge": "stack", "layout": "nhwc", "chunk": 3})


def _inputs(spec, shape, dtype=torch.float32, seed=0):
    raw = make_inputs(spec, *shape, dtype=torch.float64, seed=seed)
    return [None if raw[k] is None else raw[k].to(dtype) for k in ARGS]


@pytest.mark.parametrize("spec", [GSPN4, STACK_NHWC], ids=lambda s: s.name)
@pytest.mark.parametrize("make", [lambda: CpuBackend(poison=True), LoweredBackend], ids=["cpu", "lowered"])
def test_host_backends_same_result_without_saved(spec, make):
    be = make()
    args = _inputs(spec, (2, 6, 9, 7))
    y1, s1 = be.forward(spec, *args)
    y2, s2 = be.forward(spec, *args, need_saved=False)
    assert s1.numel() > 0 and s2.numel() == 0
    assert not torch.isnan(y2).any()
    assert torch.equal(y1, y2)


def test_every_kernel_backend_says_it_skips_saved():
    for name in ("reference", "lowered", "cpu", "cuda", "triton"):
        assert getattr(get_backend(name), "skips_saved", False), name
        assert api._accepts_need_saved(get_backend(name)), name


def test_a_subclass_without_the_keyword_is_called_without_it():
    from gspngen.backends.reference import ReferenceBackend

    class Probe(ReferenceBackend):  # inherits skips_saved, overrides forward without need_saved
        def forward(self, spec, x, w, lam, u, s, m):
            return x.clone(), x.new_empty(0)

    assert not api._accepts_need_saved(Probe())


def test_op_asks_for_no_saved_only_without_gradients(monkeypatch):
    calls = []
    orig = CpuBackend.forward

    def spy(self, spec, *args, need_saved=True):
        calls.append(need_saved)
        return orig(self, spec, *args, need_saved=need_saved)

    monkeypatch.setattr(CpuBackend, "forward", spy)
    op = api.compile(GSPN4, backend="cpu")
    args = _inputs(GSPN4, (1, 4, 6, 5))
    with torch.no_grad():
        y0 = op(*args)
    y1 = op(*args)  # nothing requires grad: the hot path too
    assert calls == [False, False]
    x = args[0].clone().requires_grad_()
    y2 = op(x, *args[1:])
    assert calls[-1] is True  # the custom op saves h for the backward
    y2.sum().backward()
    assert torch.equal(y0, y1) and torch.equal(y0, y2.detach())


# -- the CUDA kernels, emulated ------------------------------------------------------------------

@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=1, sm_count=LIMITS[0], opt="-O0")
    yield r
    r.close()


CASES = [(GSPN4, "fp32", (2, 8, 12, 16)), (STACK_NHWC, "bf16", (1, 6, 9, 8))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _fwd_bytes(runner: EmuRunner, distinct: bool = False) -> list[int]:
    """[loaded, stored, atomic] bytes of the forward kernels since the last clear (distinct: each
    address once per launch)."""
    tot = [0, 0, 0]
    for name, b in runner.bytes.items():
        if name.startswith("gspn_fwd<"):
            tot = [a + c for a, c in zip(tot, b[3:] if distinct else b[:3])]
    return tot


@pytest.mark.parametrize("spec, dname, shape", CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_emulated_cuda_forward_without_h_store(emu, spec, dname, shape):
    emu.build(rc.render_source(spec, dname), CudaBackend(runner=emu).kernel_names(spec, dname, shape, LIMITS))
    be = CudaBackend(runner=emu, poison=True)
    args = _inputs(spec, shape, DTYPES[dname])
    emu.bytes.clear()
    y1, s1 = be.forward(spec, *args)
    with_h = _fwd_bytes(emu)
    emu.bytes.clear()
    y2, s2 = be.forward(spec, *args, need_saved=False)  # an h store would be out of bounds: EmuError
    without_h = _fwd_bytes(emu)
    assert s2.numel() == 0 and not torch.isnan(y2.float()).any() and not torch.isnan(s1.float()).any()
    assert torch.equal(y1, y2)
    esize = y1.element_size()
    assert with_h[1] - without_h[1] == s1.numel() * esize  # exactly the h plane of every direction less
    assert with_h[0] == without_h[0]
    D = spec.num_directions
    stores_y = y1.numel() * esize * (D if spec.merge != "stack" else 1)
    assert without_h[1] == stores_y  # the forward stores y and nothing else
    # the backward still works from the saved h of the training forward
    gy = torch.ones_like(y1)
    grads = be.backward(spec, gy, *args, s1)
    assert not any(torch.isnan(g.float()).any() for g in grads if g is not None)


def test_names_distinguish_the_variants():
    cfg = rc.default_config(GSPN4, "fp32", "lr", "fwd", 8, 16, 16)
    a = rc.fused_name("fwd", rc.LANES, False, cfg, True, save_h=True)
    b = rc.fused_name("fwd", rc.LANES, False, cfg, True, save_h=False)
    assert a.endswith(", true>") and b.endswith(", false>") and a != b


def test_gspn4_fp32_forward_bytes_over_minimal(emu):
    """Forward of gspn4 fp32 with no gradient: at most 1.35x the minimal bytes (counted, emulated);
    with the h store, one plane per direction more."""
    spec, shape = GSPN4, (2, 8, 12, 16)
    emu.build(rc.render_source(spec, "fp32"), CudaBackend(runner=emu).kernel_names(spec, "fp32", shape, LIMITS))
    be = CudaBackend(runner=emu)
    args = _inputs(spec, shape)
    minimal = minimal_bytes(spec, *shape, torch.float32, "forward")
    emu.count_distinct = True  # DRAM bytes: the merge weight every thread loads counts once per launch
    try:
        emu.bytes.clear()
        be.forward(spec, *args, need_saved=False)
        no_grad = sum(_fwd_bytes(emu, distinct=True)) / minimal
        emu.bytes.clear()
        be.forward(spec, *args)
        train = sum(_fwd_bytes(emu, distinct=True)) / minimal
    finally:
        emu.count_distinct = False
    assert no_grad <= 1.35, no_grad
    assert train == pytest.approx(no_grad + 4 / 26, abs=0.01)  # h: 4 planes of the 26 minimal


# -- Triton, interpreted -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [GSPN4, STACK_NHWC], ids=lambda s: s.name)
def test_triton_forward_without_h_store(spec, monkeypatch):
    from gspngen.backends.triton import TritonBackend
    from gspngen.runtime import triton_launch
    from gspngen.testing import poison_

    watched = []

    def full_nan(spec_, x):  # a full-size NaN buffer where the empty one would be: any h store shows
        t = poison_(torch.empty(triton_launch.saved_shape(spec_, x), dtype=triton_launch.SAVED_DTYPE))
        watched.append(t)
        return t

    monkeypatch.setattr(triton_launch, "no_saved", full_nan)
    monkeypatch.setattr(triton_launch, "new_output",
                        lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))
    be = TritonBackend()
    args = _inputs(spec, (1, 4, 6, 5))
    y1, s1 = be.forward(spec, *args)
    y2, _ = be.forward(spec, *args, need_saved=False)
    assert torch.equal(y1, y2) and not torch.isnan(y2).any() and not torch.isnan(s1).any()
    assert len(watched) == 1 and torch.isnan(watched[0]).all()  # not one h written
