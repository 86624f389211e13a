"""The real CUDA prelude's conversions and vector accesses, compiled for the host (issue 13, item 0).

The emulated kernels run the emulator's checked primitives, never the prelude's own; here the
prelude is cut out of each rendered source as it is (tests/cuda_emu/prelude.py), its PTX run by
host implementations of the instructions, and compared bit for bit with torch's conversions and
with plain copies. A deliberate bug in the rendered prelude (two words of the 8-byte vector load
swapped, fp16 or bf16 rounding changed) must fail these checks.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_emu.prelude import WIDTHS, build_prelude
from gspngen.render import cuda as rc
from gspngen.spec import Spec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPEC = Spec.from_dict({"name": "prelude", "precision": ["fp32", "fp16", "bf16"]})


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def float_samples() -> torch.Tensor:
    """fp32 values around every rounding decision of fp16 and bf16: specials, the edges of both
    ranges, exact halfway points (ties to even), one unit either side of them, and random bits."""
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(-2**31, 2**31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                            -65520.0, 70000.0, 1e-8, -1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 3.4e38,
                            1e-40, -1e-45])
    parts = [rnd, special]
    for narrow in (torch.float16, torch.bfloat16):
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(narrow).float()
        every = every[torch.isfinite(every)].unique()
        mid = ((every[1:].double() + every[:-1].double()) / 2).float()  # exact in fp32 for both formats
        ulp = mid.view(torch.int32)
        parts += [every, mid, (ulp + 1).view(torch.float32), (ulp - 1).view(torch.float32)]
    return torch.cat(parts).contiguous()


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return {d: build_prelude(rc.render_source(SPEC, d), tmp_path_factory.mktemp(d)) for d in DTYPES}


def check_conversions(lib, dname: str) -> None:
    dtype = DTYPES[dname]
    f = float_samples()
    out = torch.empty(f.shape, dtype=dtype)
    lib.t_s(_ptr(f), _ptr(out), f.numel())  # fp32 -> storage: cvt.rn (a copy for fp32)
    want = f.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan), f"{dname}: NaN in / NaN out"
    same = out[~nan].view(torch.int16 if dtype != torch.float32 else torch.int32) == \
        want[~nan].view(torch.int16 if dtype != torch.float32 else torch.int32)
    bad = f[~nan][~same]
    assert same.all(), f"{dname}: fp32 -> storage differs from torch at {bad[:8].tolist()} ({(~same).sum()} values)"
    if dtype == torch.float32:
        stored = f
    else:  # storage -> fp32 for every bit pattern: exact
        stored = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    back = torch.empty(stored.shape, dtype=torch.float32)
    lib.t_f(_ptr(stored), _ptr(back), stored.numel())
    want = stored.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(back), nan)
    assert torch.equal(back[~nan].view(torch.int32), want[~nan].view(torch.int32)), f"{dname}: storage -> fp32"


def check_vectors(lib, dname: str) -> None:
    dtype = DTYPES[dname]
    isz = torch.empty((), dtype=dtype).element_size()
    ibits = torch.int16 if isz == 2 else torch.int32
    g = torch.Generator().manual_seed(1)
    src = torch.randint(-2**15, 2**15, (256,), generator=g, dtype=torch.int64).to(ibits).view(dtype)
    for v in WIDTHS:
        align = min(v * isz, 16)
        for off in (0, 2 * align // isz, 64 // isz):  # aligned starts (16-byte vectors: 16-aligned)
            assert src.data_ptr() % 16 == 0
            p = ctypes.c_void_p(src.data_ptr() + off * isz)
            want = src[off:off + v]
            for nc in (0, 1):
                d = torch.full((v,), -1, dtype=ibits).view(dtype)
                getattr(lib, f"t_ldv{v}")(_ptr(d), p, nc)
                assert torch.equal(d.view(ibits), want.view(ibits)), f"{dname} gs_ldv<{v}> nc={nc} at {off}"
            dst = torch.zeros(256, dtype=ibits).view(dtype)
            w = want.clone()  # kept alive across the call
            getattr(lib, f"t_stv{v}")(ctypes.c_void_p(dst.data_ptr() + off * isz), _ptr(w))
            expect = torch.zeros(256, dtype=ibits).view(dtype)
            expect[off:off + v] = want
            assert torch.equal(dst.view(ibits), expect.view(ibits)), f"{dname} gs_stv<{v}> at {off}"
            # runs under a mask: vector (all or nothing, by bit 0) and element by element
            full = (1 << v) - 1
            for vec, mask in [(1, full), (1, 0), (0, full), (0, 0b1010101010101010 & full), (0, 1)]:
                d = torch.full((v,), -1, dtype=ibits).view(dtype)
                getattr(lib, f"t_ldrun{v}")(_ptr(d), p, mask, vec)
                keep = torch.tensor([bool(mask & 1) if vec else bool(mask >> i & 1) for i in range(v)])
                expect_d = torch.where(keep, want.view(ibits), torch.zeros_like(want.view(ibits)))
                assert torch.equal(d.view(ibits), expect_d), f"{dname} gs_ld_run<{v}, {vec}> mask {mask:#x}"
                dst = torch.full((256,), 7, dtype=ibits).view(dtype)
                getattr(lib, f"t_strun{v}")(ctypes.c_void_p(dst.data_ptr() + off * isz), _ptr(w), mask, vec)
                expect = torch.full((256,), 7, dtype=ibits)
                bits = [bool(mask >> i & 1) for i in range(v)]
                expect[off:off + v] = torch.where(torch.tensor(bits), want.view(ibits), expect[off:off + v])
                assert torch.equal(dst.view(ibits), expect), f"{dname} gs_st_run<{v}, {vec}> mask {mask:#x}"
            # the cp.async ring's run: copied (or zero-filled) and read back from shared memory, 4 to 16 bytes
            for valid in (1, 0):
                d = torch.full((v,), -1, dtype=ibits).view(dtype)
                served = getattr(lib, f"t_cprun{v}")(_ptr(d), p, valid)
                assert served == (v * isz in (4, 8, 16)), f"{dname} gs_cp_run<{v}>"
                if served:
                    expect_d = want.view(ibits) if valid else torch.zeros_like(want.view(ibits))
                    assert torch.equal(d.view(ibits), expect_d), f"{dname} gs_cp_run<{v}> valid={valid}"


@pytest.mark.parametrize("dname", list(DTYPES))
def test_prelude_conversions_match_torch(dname, libs):
    check_conversions(libs[dname], dname)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_prelude_vector_accesses_copy_exactly(dname, libs):
    check_vectors(libs[dname], dname)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_emulator_conversions_match_torch(dname, tmp_path):
    """The emulator's stand-ins for the PTX conversions round the same way (so emulated kernels
    store what a GPU stores)."""
    check_conversions(build_prelude(rc.render_source(SPEC, dname), tmp_path, emulated=True), dname)


# -- deliberate bugs in the rendered prelude must fail the checks ------------------------------------

BUGS = [
    ("swapped-8-byte-words", "fp32", "w[0] = v.x; w[1] = v.y;", "w[0] = v.y; w[1] = v.x;", check_vectors),
    ("swapped-8-byte-words", "bf16", "w[0] = v.x; w[1] = v.y;", "w[0] = v.y; w[1] = v.x;", check_vectors),
    ("swapped-16-byte-words", "fp16", "w[4 * i] = v.x; w[4 * i + 1] = v.y;", "w[4 * i] = v.y; w[4 * i + 1] = v.x;",
     check_vectors),
    ("swapped-8-byte-store", "fp32", "make_uint2(w[0], w[1])", "make_uint2(w[1], w[0])", check_vectors),
    ("fp16-round-toward-zero", "fp16", "cvt.rn.f16.f32", "cvt.rz.f16.f32", check_conversions),
    ("fp16-round-up", "fp16", "cvt.rn.f16.f32", "cvt.rp.f16.f32", check_conversions),
    ("bf16-round-toward-zero", "bf16", "cvt.rn.bf16.f32", "cvt.rz.bf16.f32", check_conversions),
    ("bf16-truncating-store", "bf16", 'asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));',
     "r = (unsigned short)(__float_as_uint(f) >> 16);", check_conversions),
    ("fp16-packing", "fp16", "(gs_t)(w[i] & 0xffffu)", "(gs_t)(w[i] >> 16)", check_vectors),
]


@pytest.mark.parametrize("bug", BUGS, ids=[f"{b[0]}-{b[1]}" for b in BUGS])
def test_bug_in_the_prelude_fails(bug, tmp_path):
    _, dname, old, new, check = bug
    src = rc.render_source(SPEC, dname)
    assert src.count(old) == 1, old
    lib = build_prelude(src.replace(old, new), tmp_path)
    with pytest.raises(AssertionError):
        check(lib, dname)
