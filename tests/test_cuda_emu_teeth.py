"""What the CUDA emulator must catch that a GPU would (issue 13, item 0).

- Lines that span several warps (64-512 threads per line) for every thread mapping, including
  the default tunings of the paper shape (gspn4, C=8, 1024^2) run on reduced images.
- Every case runs under several schedules (tests/cuda_emu/emu.h, ORDER_*): lockstep, one warp
  running ahead through its __syncwarp's, seeded random; outputs must be bit-identical across
  them (outputs summed by atomics aside: their order is free on a GPU too).
- Deliberate bugs applied to the rendered source must make these checks fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cuda_emu.emulator import AHEAD, ORDERS, RANDOM, RR, EmuError, EmuRunner
from gspngen.backends.cuda import CudaBackend
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from gspngen.testing import tolerance
from test_cuda_emulated import DTYPES, LIMITS, err, forced, prebuild, run

ROOT = Path(__file__).resolve().parents[1]
GSPN4 = load_spec(ROOT / "examples" / "gspn4.yaml")


def _variant(spec: Spec, **changes) -> Spec:
    return Spec.from_dict({**json.loads(spec.to_json()), **changes})


GSPN4_NHWC = _variant(GSPN4, layout="nhwc")


def paper(spec, dname, direction, kind, C, H, W):
    """The default tuning at the paper shape (C=8, 1024x1024), whatever the shape run."""
    return rc.default_config(spec, dname, direction, kind, 8, 1024, 1024, LIMITS[1])


paper.__name__ = "paper"


@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=RR, sm_count=LIMITS[0], opt="-O0")
    yield r
    r.close()


def atomic_outputs(spec: Spec, C: int) -> set[str]:
    """Outputs the fused backward sums with fp32 atomics (their rounding depends on the order)."""
    out = {"gm"} if spec.merge == "learned" else set()
    if spec.groups(C) != C:
        out.add("gw")
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def check_case(runner: EmuRunner, spec: Spec, dname: str, shape, chooser=None, orders=(RR, AHEAD, RANDOM)):
    """The check every case gets: forward and gradients match the reference under the first
    schedule, and every other schedule gives the same bits."""
    dtype = DTYPES[dname]
    first = None
    for order in orders:
        got, want = run(CudaBackend(runner=runner.with_order(order), configs=chooser, poison=True), spec, dtype,
                        shape)
        if first is None:
            bad = {k: e for k in want if not (e := err(got[k], want[k])) <= tolerance(dtype)}
            assert not bad, f"{dname} {shape} order {order}: {bad}"
            first = got
            continue
        atomic = atomic_outputs(spec, shape[1])
        for k, v in got.items():
            if k in atomic:
                assert err(v, first[k]) <= tolerance(dtype), f"{k}: order {order} differs from order {orders[0]}"
            else:
                assert torch.equal(bits(v), bits(first[k])), f"{k}: order {order} differs from order {orders[0]}"


def threads_per_line(spec, dname, shape, chooser) -> dict[str, int]:
    """Threads sharing one line in each direction's forward launch (CHAN: the whole block)."""
    N, C, H, W = shape
    out = {}
    for d in spec.directions:
        cfg = (chooser(spec, dname, d, "fwd", C, H, W) if chooser else
               rc.default_config(spec, dname, d, "fwd", C, H, W, LIMITS[1]))
        out[d] = cfg.threads if rc.thread_map(spec, d) == rc.CHAN else cfg.lane_threads
    return out


# (id, spec, dtype, shape, chooser): lines of several warps with data in more than one warp.
MULTI_WARP = [
    ("lanes-64", _variant(GSPN4, directions=["tb", "bt"]), "fp32", (1, 2, 5, 256), None),
    ("lanes-256-v1", _variant(GSPN4, directions=["tb"], connection=5), "fp32", (1, 2, 4, 200), forced(256, 1, 2, 2)),
    ("lanes-128-1buf", _variant(GSPN4, directions=["bt"]), "bf16", (1, 2, 5, 120), forced(128, 1, 1, 1)),
    ("steps-128", _variant(GSPN4, directions=["lr", "rl"]), "fp32", (1, 2, 128, 8), None),
    ("steps-64-2seg", _variant(GSPN4, directions=["rl"], chunk=3), "fp32", (1, 2, 100, 9), forced(64, 4, 3, 1)),
    ("chan-96", _variant(GSPN4_NHWC, directions=["lr", "tb"]), "fp32", (1, 8, 40, 96), None),
    ("chan-256-groups", _variant(GSPN4_NHWC, directions=["bt"], weight_groups=2), "fp32", (1, 4, 6, 70),
     forced(64, 1, 2, 2, 4)),
    ("steps-256-stage", _variant(GSPN4, directions=["lr", "rl"]), "fp32", (1, 2, 200, 16),
     forced(256, 4, 2, 2, stage=True)),
    ("steps-64-2seg-stage", _variant(GSPN4, directions=["rl", "lr"], chunk=3), "bf16", (1, 2, 100, 19),
     forced(64, 8, 3, 1, stage=True)),
    ("paper-fp32", GSPN4, "fp32", (1, 2, 40, 296), paper),
    ("paper-bf16", GSPN4, "bf16", (1, 2, 40, 296), paper),
    ("paper-nhwc", GSPN4_NHWC, "fp32", (1, 8, 12, 40), paper),
]


@pytest.mark.parametrize("case", MULTI_WARP, ids=[c[0] for c in MULTI_WARP])
def test_multi_warp_lines(case, emu):
    _, spec, dname, shape, chooser = case
    tpl = threads_per_line(spec, dname, shape, chooser)
    assert all(n >= 64 for n in tpl.values()), tpl  # the point of these cases
    prebuild(emu, spec, dname, [shape], [chooser])
    check_case(emu, spec, dname, shape, chooser)


def test_default_tunings_at_the_paper_shape_span_warps():
    """The paper-shape tunings the cases above run are the multi-warp ones (64..512 threads per line)."""
    for spec in (GSPN4, GSPN4_NHWC):
        for dname in ("fp32", "bf16"):
            for d in spec.directions:
                for kind in ("fwd", "bwd"):
                    cfg = paper(spec, dname, d, kind, 8, 1024, 1024)
                    n = cfg.threads if rc.thread_map(spec, d) == rc.CHAN else cfg.lane_threads
                    assert 64 <= n <= 512, (spec.layout, dname, d, kind, cfg)


def test_every_schedule_gives_the_same_bits(emu):
    """All six schedules, forward and backward, on lines of 2-3 warps in each mapping."""
    cases = [(_variant(GSPN4, directions=["tb", "lr"]), "fp32", (1, 2, 70, 72), forced(96, 1, 2, 2)),
             (_variant(GSPN4_NHWC, directions=["rl"], merge="sum"), "bf16", (1, 4, 40, 6), forced(64, 1, 2, 2, 1))]
    for spec, dname, shape, chooser in cases:
        prebuild(emu, spec, dname, [shape], [chooser])
        check_case(emu, spec, dname, shape, chooser, orders=ORDERS)


# -- deliberate bugs: each must make the checks above fail ------------------------------------------

def _broken_source(monkeypatch, old: str, new: str) -> None:
    real = rc.render_source

    def render(spec, dname):
        src = real(spec, dname)
        assert src.count(old) == 1, old
        return src.replace(old, new)

    monkeypatch.setattr(rc, "render_source", render)  # what the backend now renders and builds


LINE_SYNC = "else if (LINE_THREADS <= 32) gs_sync_warp();\n        else gs_sync_block();"


@pytest.mark.parametrize("case", [c for c in MULTI_WARP if c[0] in ("lanes-256-v1", "steps-64-2seg", "chan-256-groups",
                                                                    "paper-fp32", "steps-256-stage")],
                         ids=["lanes", "steps", "stage", "chan", "paper"])
def test_bug_syncwarp_for_the_line_barrier_fails(case, emu, monkeypatch):
    """A __syncwarp where a line spans several warps: lockstep schedules cannot see it, a warp
    running ahead reads neighbours that are not written yet."""
    _, spec, dname, shape, chooser = case
    _broken_source(monkeypatch, LINE_SYNC, "else gs_sync_warp();")
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(AssertionError, match="differs from order|{'y'"):
        check_case(emu, spec, dname, shape, chooser)


STAGE_SYNC = "gs_sync_warp();  // the warp's chunks are in SG (a warp exchanges only its own rows)"


def test_bug_missing_sector_tile_sync_fails(emu, monkeypatch):
    """The sector tiles' exchange through shared memory needs its __syncwarp: without it, owners read
    slots their loaders have not written yet."""
    _, spec, dname, shape, chooser = next(c for c in MULTI_WARP if c[0] == "steps-256-stage")
    check_case(emu, spec, dname, shape, chooser, orders=(RR,))
    _broken_source(monkeypatch, STAGE_SYNC, "")
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(AssertionError, match="differs from order|{'y'"):
        check_case(emu, spec, dname, shape, chooser)


# -- every global access through the checked primitives --------------------------------------------

_ASSIGN = re.compile(r"([A-Za-z_]\w*)\s*=(?!=)\s*(?:\([^()]*\*\s*\)\s*)?(?:static_cast<[^>]*>\(\s*)?([A-Za-z_]\w*)")


def raw_global_accesses(source: str) -> list[str]:
    """Lines that touch global memory other than through the gs_* primitives.

    Global pointers are the kernels' p_* parameters and every pointer initialised from one
    (``f.px = p_x``, ``const gs_t* q = pw + ...``); a subscript, a dereference or ``->`` on one
    outside the prelude's primitives (which the emulator replaces by checked ones) is a raw access."""
    start = source.index("#ifndef GSPN_EMULATE\n#define GS_DEV")
    end = source.index("#endif  // GSPN_EMULATE", start)
    body = source[:start] + source[end:]
    body = re.sub(r"//[^\n]*", "", body)
    names = set(re.findall(r"\bp_\w+", body))
    while True:  # pointers initialised from global pointers are global pointers
        more = {lhs for lhs, rhs in _ASSIGN.findall(body) if rhs in names} - names
        if not more:
            break
        names |= more
    alt = "|".join(sorted(names, key=len, reverse=True))
    patterns = [rf"\b(?:{alt})\s*\[", rf"\b(?:{alt})\s*->", rf"_cast<[^>]*>\(\s*(?:{alt})\s*\)\s*\[",
                # `*` before a pointer is a dereference unless a type precedes it (a declaration):
                # pointers are never multiplied
                rf"(?:^|[^\w\s])\s*\*\s*\(*\s*(?:{alt})\b", r"reinterpret_cast"]
    return [line.strip() for line in body.splitlines() if any(re.search(p, line) for p in patterns)]


SCANNED = [(load_spec(p), dname) for p in sorted((ROOT / "examples").glob("*.yaml"))
           for dname in load_spec(p).precision]
SCANNED += [(_variant(GSPN4_NHWC, weight_groups=2, merge="stack", normalization="softmax", chunk=4), "bf16"),
            (_variant(GSPN4, weight_groups="shared", modulation=False, skip=False), "fp32")]


def test_no_raw_global_access_in_rendered_sources():
    for spec, dname in SCANNED:
        assert raw_global_accesses(rc.render_source(spec, dname)) == [], (spec.name, dname)


@pytest.mark.parametrize("old, new", [
    ("gs_st1f(p_gh + hf, f_gho);", "p_gh[hf] = f_gho;"),
    ("gs_st1f(p_gx32 + gid, gx_skip);", "*(p_gx32 + gid) = gx_skip;"),
    ("gs_ld1f<false>(p_gh + b_d + g.frame(C, c, t, i));", "p_gh[b_d + g.frame(C, c, t, i)];"),
    ("gs_ld1<NC>(q + (c0 + v) / gpc)", "q[(c0 + v) / gpc]"),
    ("gs_atomic_add(static_cast<float*>(p_gw) + ow, f_gw[c2]);", "static_cast<float*>(p_gw)[ow] += f_gw[c2];"),
    ("gs_ld_run<V, VEC, true>(tl.x + sg * V, px + B.b_x + o, mk);", "tl.x[sg * V] = *(px + B.b_x + o);"),
])
def test_raw_access_scan_finds_raw_accesses(old, new):
    src = rc.render_source(GSPN4, "fp32")
    assert old in src
    assert raw_global_accesses(src.replace(old, new, 1))


# -- blocks of one launch are unordered -----------------------------------------------------------

BLOCK_END = "te = (int)gs_min64((long long)tb + (long long)cpb * K, T);"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bug_overlapping_blocks_fails(layout, emu, monkeypatch):
    """Each block also computing the first step of the next block's range writes the same values
    (that step starts a chunk) to the same elements: invisible in the outputs under every order,
    a cross-block write conflict for the emulator."""
    spec = _variant(GSPN4, chunk=2, layout=layout, directions=["lr", "bt"])
    shape = (1, 2, 8, 8)  # 4 chunks per direction: the plan splits them over blocks (2 emulated SMs)
    check_case(emu, spec, "fp32", shape, orders=(RR,))
    _broken_source(monkeypatch, BLOCK_END, BLOCK_END.replace("cpb * K, T", "cpb * K + 1, T"))
    prebuild(emu, spec, "fp32", [shape])
    with pytest.raises(EmuError, match="cross-block race: a block stores where another block stored"):
        check_case(emu, spec, "fp32", shape, orders=(RR,))


# -- floating point as the GPU build compiles it --------------------------------------------------

def test_emulator_flushes_subnormals_like_the_gpu_build(tmp_path):
    """NVRTC builds with -ftz=true (gspngen.runtime.cuda_build.FTZ): fp32 subnormal inputs and results
    are zero. Emulated launches do the same (and leave the host's own mode as it was)."""
    import ctypes
    import subprocess

    from cuda_emu.emulator import CXX, HERE
    from gspngen.runtime.cuda_build import FTZ

    assert EmuRunner().ftz == FTZ
    src = tmp_path / "ftz.cpp"
    src.write_text('#include "emu.h"\nextern "C" int run(int ftz, const float* a, float* b, int n)\n'
                   "{ emu::g.ftz = ftz; return emu::launch(1, 32, 0, 0, [=] { const int i = threadIdx.x;\n"
                   "  if (i < n) b[i] = a[i] * 0.5f + 0.0f; }); }\n")
    lib = tmp_path / "ftz.so"
    subprocess.run([CXX, "-std=c++17", "-O0", "-shared", "-fPIC", f"-I{HERE}", str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    a = torch.tensor([1e-39, 2.0**-126, 3.0, -2.0**-149], dtype=torch.float32)
    for ftz, want in [(1, [0.0, 0.0, 1.5, 0.0]), (0, [5e-40, 2.0**-127, 1.5, -0.0])]:
        b = torch.full_like(a, float("nan"))
        assert dll.run(ftz, ctypes.c_void_p(a.data_ptr()), ctypes.c_void_p(b.data_ptr()), 4) == 0
        assert torch.equal(b, torch.tensor(want, dtype=torch.float32)), (ftz, b)
        assert (torch.tensor([2.0**-126]) * 0.5).item() == 2.0**-127  # the host's mode is back


def test_emulator_contracts_multiply_adds_like_the_gpu_build(tmp_path):
    """NVRTC builds with -fmad=true: a * b + c is one fma, one rounding. The emulator's build
    contracts too (where the host has FMA): (1 + 2^-12)^2 - (1 + 2^-11) is 2^-24 fused, 0 apart."""
    import ctypes
    import subprocess

    from cuda_emu.emulator import CXX, FMAD, HERE, host_has_fma

    runner = EmuRunner(opt="-O0")
    if not host_has_fma():
        pytest.skip("the host has no FMA instructions")
    assert runner.fma == FMAD
    src = tmp_path / "fma.cpp"
    src.write_text('#include "emu.h"\nextern "C" int run(const float* a, float* b)\n'
                   "{ return emu::launch(1, 32, 0, 0, [=] { if (threadIdx.x == 0) b[0] = a[0] * a[1] + a[2]; }); }\n")
    a = torch.tensor([1 + 2.0**-12, 1 + 2.0**-12, -(1 + 2.0**-11)], dtype=torch.float32)
    for fma, want in [(True, 2.0**-24), (False, 0.0)]:
        runner.fma = fma
        lib = tmp_path / f"fma{int(fma)}.so"
        subprocess.run([CXX, "-std=c++17", *runner.flags(), "-shared", "-fPIC", f"-I{HERE}", str(src), "-o", str(lib)],
                       check=True)
        b = torch.full((1,), float("nan"))
        assert ctypes.CDLL(str(lib)).run(ctypes.c_void_p(a.data_ptr()), ctypes.c_void_p(b.data_ptr())) == 0
        assert b.item() == want, (fma, b.item())
