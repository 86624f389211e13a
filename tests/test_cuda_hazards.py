"""GPU-only hazards checked without a GPU (issue 13, item 7).

- An unsupported launch is refused on the host before anything runs; the
  kernels' own guard is a trap, never an early return that leaves outputs unwritten.
- ``cuda`` availability checks that the driver can run the installed CuPy (probed
  versions monkeypatched) and ``auto`` says why it falls back.
- Kernels are built once per process, ahead of the first call (``prebuild``),
  counted through a fake CuPy.
- NVRTC gets explicit floating-point options (``-ftz`` included).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from cuda_emu.emulator import EmuError, EmuRunner
from gspngen import api
from gspngen.backends.cuda import CudaBackend, FusedLaunch
from gspngen.render import cuda as rc
from gspngen.runtime import cuda_build
from gspngen.spec import Spec, load_spec
from gspngen.testing import make_inputs

LIMITS = (2, 227 * 1024)
ARGS = ("x", "w", "lam", "u", "s", "m")
SMALL = Spec.from_dict({"name": "haz", "precision": ["fp32"], "connection": 3, "directions": ["lr", "tb"]})


def _inputs(spec, shape, seed=0):
    raw = make_inputs(spec, *shape, dtype=torch.float32, seed=seed)
    return [raw[k] for k in ARGS]


# -- unsupported launches ------------------------------------------------------------------------

def test_rendered_kernels_trap_instead_of_returning():
    src = rc.render_source(load_spec("examples/gspn4.yaml"), "fp32")
    assert "write nothing" not in src
    for kernel in ("gspn_fwd", "gspn_bwd"):
        # the plain and cluster entries share one body (gs_fwd_main / gs_bwd_main)
        body = src[src.index(f"GS_DEV void gs_{kernel[5:]}_main("):]
        guard, setup = body.index("gs_trap();"), body.index("f.B.setup(")
        assert guard < setup  # refused before anything is read or written
        assert "gs_dyn_smem_bytes() <" in body[:guard] and "gridDim.x % F::B_t::CL" in body[:guard]
        for entry in (f"__launch_bounds__(LT * CT, 1) {kernel}(", f"__launch_bounds__(LT * CT, 1) {kernel}_cl("):
            assert f"gs_{kernel[5:]}_main<" in src[src.index(entry):][:1000]
    assert "__trap()" in src


def _plan(be, spec, shape, smem_limit=LIMITS[1]):
    N, C, H, W = shape
    return be.plan(spec, "fp32", "fwd", 0, shape, [], acc=False, watom=False, limits=(LIMITS[0], smem_limit))


def test_host_refuses_unsupported_launches():
    be = CudaBackend(runner=object())
    p = _plan(be, SMALL, (1, 4, 8, 8))
    for bad, what in [(dict(block=48), "threads per block"), (dict(block=2048), "threads per block"),
                      (dict(cpb=0), "chunks per block"), (dict(smem=10**6), "shared memory"),
                      (dict(grid=2**31), "too large")]:
        q = FusedLaunch(**{**p.__dict__, **bad})
        with pytest.raises(ValueError, match=what):
            be.check_launch(SMALL, q, 0, LIMITS[1])
    with pytest.raises(ValueError, match="direction"):
        be.check_launch(SMALL, p, 2, LIMITS[1])


@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=0, sm_count=LIMITS[0], opt="-O0")
    yield r
    r.close()


def test_shared_memory_too_small_raises_before_launch(emu):
    """A device offering less shared memory than a kernel needs: ValueError, nothing launched or built."""
    small = EmuRunner(order=0, sm_count=2, smem_limit=64)
    try:
        be = CudaBackend(runner=small, poison=True)
        with pytest.raises(ValueError, match="shared memory"):
            be.forward(SMALL, *_inputs(SMALL, (1, 4, 8, 8)))
        assert small.launches == [] and small._libs == {}
    finally:
        small.close()


def test_device_guard_traps_on_mismatched_launch(emu):
    """The last line of defence: a launch with too little shared memory or the wrong block size aborts
    (an error), instead of returning with y unwritten."""
    shape = (1, 4, 8, 8)
    be = CudaBackend(runner=emu, poison=True)
    x, w, lam, u, s, m = _inputs(SMALL, shape)
    y, _ = be.forward(SMALL, x, w, lam, u, s, m)  # the supported launch works
    assert not torch.isnan(y).any()
    p = _plan(be, SMALL, shape)
    assert p.smem > 16
    src = rc.kernel_source(SMALL, "fp32")
    kernel = emu.kernel(x.device, src, p.name, [p.name])
    yy = torch.full_like(x, float("nan"))
    saved = torch.full((1, 2, 4, 64), float("nan"))
    args = [("in", x), ("in", w), ("in", lam), ("in", u), ("in", s), ("in", m), ("out", yy), ("out", saved),
            ("i32", 1), ("i32", 4), ("i32", SMALL.groups(4)), ("i32", 8), ("i32", 8), ("i32", 0), *p.tail]
    with pytest.raises(EmuError, match="__trap"):
        emu.launch(kernel, x.device, p.grid, p.block, p.smem - 16, args)
    with pytest.raises(EmuError, match="__trap"):
        emu.launch(kernel, x.device, p.grid, p.block + 32, p.smem, args)
    bad_d = [a if i != len(args) - 4 else ("i32", 7) for i, a in enumerate(args)]
    with pytest.raises(EmuError, match="__trap"):
        emu.launch(kernel, x.device, p.grid, p.block, p.smem, bad_d)


# -- availability --------------------------------------------------------------------------------

@pytest.mark.parametrize("versions, ok, words", [
    ((13000, 13000, 13000), True, ()),
    ((13010, 13000, 13000), True, ()),
    ((12080, 12040, 12060), True, ()),  # minor-version compatibility within a major
    ((12040, 13000, 13000), False, ("12.4", "13.0", "cupy-cuda12x")),
    ((12090, 12080, 13000), False, ("NVRTC", "13.0")),
    ((0, 12000, 12000), False, ("no CUDA driver",)),
])
def test_driver_version_check(monkeypatch, versions, ok, words):
    monkeypatch.setattr(cuda_build, "probe_versions", lambda: versions)
    reason = cuda_build.cuda_unavailable_reason()
    assert (reason is None) == ok and cuda_build.cupy_available() == ok
    for w in words:
        assert w in reason


def test_no_cupy_is_a_reason(monkeypatch):
    def missing():
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(cuda_build, "probe_versions", missing)
    assert "cupy is not installed" in cuda_build.cuda_unavailable_reason()


def test_auto_falls_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_build, "probe_versions", lambda: (12040, 13000, 13000))
    monkeypatch.setattr(api, "_WARNED", set())
    be = CudaBackend()
    dev = torch.device("cuda", 0)
    assert not be.available(dev)
    assert "driver supports CUDA 12.4" in be.unavailable_reason(dev)
    spec = load_spec("examples/gspn4.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = api.default_backend(spec, dev, torch.float32)
        api.default_backend(spec, dev, torch.float32)  # once per reason
    assert choice != "cuda"
    msgs = [str(c.message) for c in caught if "'cuda'" in str(c.message)]
    assert len(msgs) == 1 and "driver supports CUDA 12.4" in msgs[0]


# -- NVRTC options and building ahead --------------------------------------------------------------

class _FakeCupy:
    """Enough of CuPy for CupyRunner.kernel: records every RawModule build."""

    def __init__(self):
        self.builds: list[tuple[tuple, tuple]] = []
        fake = self

        class RawModule:
            def __init__(self, code, options, name_expressions):
                fake.builds.append((tuple(options), tuple(name_expressions)))
                self.names = set(name_expressions)

            def get_function(self, name):
                assert name in self.names
                return name

        class Device:
            def __init__(self, index):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class _Cuda:
            pass

        self.RawModule = RawModule
        self.cuda = _Cuda()
        self.cuda.Device = Device


class _FakeRunner(cuda_build.CupyRunner):
    def __init__(self, fake):
        super().__init__()
        self.fake = fake
        self.launched: list[str] = []

    def _cupy(self):
        return self.fake

    def launch(self, kernel, device, grid, block, smem, args):
        self.launched.append(kernel)

    def limits(self, device):
        return LIMITS


def test_build_options_are_explicit(monkeypatch):
    fake = _FakeCupy()
    runner = _FakeRunner(fake)
    runner.kernel(torch.device("cpu"), rc.kernel_source(SMALL, "fp32"), "k", ["k"])
    (options, _), = fake.builds
    for o in ("-std=c++17", "-ftz=true", "-prec-div=true", "-prec-sqrt=true", "-fmad=true"):
        assert o in options
    # CuPy appends -ftz=true after these and NVRTC keeps the last: what we pass must agree with it
    assert [o for o in options if o.startswith("-ftz=")] == [f"-ftz={str(cuda_build.FTZ).lower()}"] == ["-ftz=true"]


@pytest.mark.parametrize("spec_path, shape", [("examples/gspn4.yaml", (2, 8, 12, 16)),
                                              ("examples/gspn2_compact.yaml", (1, 16, 8, 8))])
def test_prebuild_builds_once_then_never_again(spec_path, shape):
    spec = load_spec(spec_path)
    fake = _FakeCupy()
    runner = _FakeRunner(fake)
    be = CudaBackend(runner=runner)
    names = be.prebuild(spec, shape, torch.float32, torch.device("cpu"))
    assert len(fake.builds) == 1 and set(fake.builds[0][1]) == set(names)
    x, w, lam, u, s, m = (t.contiguous() if t is not None else None for t in _inputs(spec, shape))
    y, saved = be.forward(spec, x, w, lam, u, s, m)
    be.forward(spec, x, w, lam, u, s, m)
    be.backward(spec, torch.ones_like(y), x, w, lam, u, s, m, saved)
    assert len(fake.builds) == 1  # every launch found its kernel built
    assert runner.launched and set(runner.launched) <= set(names)


def test_op_prebuild_resolves_and_builds(monkeypatch):
    spec = load_spec("examples/gspn4.yaml")
    fake = _FakeCupy()
    runner = _FakeRunner(fake)
    monkeypatch.setattr(cuda_build, "_DEFAULT", runner)
    monkeypatch.setattr(api, "_resolve_backend", lambda *a, **k: "cuda")
    op = api.compile(spec, backend="cuda")
    assert op.prebuild((1, 8, 16, 16), torch.float32, "cpu") == "cuda"
    assert len(fake.builds) == 1
    assert op.prebuild((1, 8, 16, 16), torch.float32, "cpu") == "cuda"
    assert len(fake.builds) == 1  # built once per process
