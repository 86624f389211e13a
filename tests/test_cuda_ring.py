"""The prefetch ring in shared memory, filled by cp.async (the `ring` tuning; issue 13, item 4).

The emulator (tests/cuda_emu/emu.h) gives cp.async its GPU semantics: a copy lands only when the issuing
thread waits for its group (cp.async.wait_group), oldest group first; until then its destination holds NaN
bits and is pending, and a checked read of it, a second copy into it, or a thread exiting with copies it
never waited for is an error. Every case matches the reference (forward and every gradient, NaN-poisoned
outputs) and gives the same bits under every schedule; the deliberate bugs below must fail.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cuda_emu.emulator import AHEAD, AHEAD_LAST, CXX, HERE, RANDOM, RR, EmuError, EmuRunner
from gspngen.backends.cuda import CudaBackend
from gspngen.render import cuda as rc
from gspngen.spec import Spec, load_spec
from test_cuda_emu_teeth import _broken_source, check_case
from test_cuda_emulated import LIMITS, prebuild

ROOT = Path(__file__).resolve().parents[1]
GSPN4 = load_spec(ROOT / "examples" / "gspn4.yaml")


def _variant(spec: Spec, **changes) -> Spec:
    return Spec.from_dict({**json.loads(spec.to_json()), **changes})


def ringed(prefetch: int, lanes=None, steps=None, cluster: int = 1):
    """A chooser putting both passes' ring in shared memory: the default tuning (cl=N's with ``cluster``)
    or the given lanes/steps tuning, with ``prefetch`` slots."""
    def choose(spec, dname, direction, kind, C, H, W):
        mapping = rc.thread_map(spec, direction)
        cfg = {rc.LANES: lanes, rc.STEPS: steps}.get(mapping)
        if cfg is None:
            cfg = (rc.cluster_config(spec, dname, direction, kind, C, H, W, cluster) if cluster > 1 else
                   rc.default_config(spec, dname, direction, kind, C, H, W))
        return replace(cfg, ring=True, prefetch=prefetch)
    choose.__name__ = f"ring{prefetch}-cl{cluster}"
    return choose


@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=RR, sm_count=LIMITS[0], opt="-O0")
    yield r
    r.close()


def has_ring(name: str) -> bool:
    """An instantiation with RING on: the defaulted 12th template argument, named only when true."""
    args = name[name.index("<") + 1:-1].split(", ")
    return name.startswith(("gspn_fwd<", "gspn_fwd_cl<", "gspn_bwd<", "gspn_bwd_cl<")) and len(args) == 12 \
        and args[-1] == "true"


def ring_launches(runner: EmuRunner) -> list[str]:
    return [name for name, *_ in runner.launches if has_ring(name)]


# (id, spec, dtype, shape, chooser): every case runs both mappings with the ring, forward and backward
CASES = [
    ("gspn4-p2", GSPN4, "fp32", (1, 2, 16, 16), ringed(2)),
    ("gspn4-bf16-p3", GSPN4, "bf16", (1, 2, 24, 32), ringed(3)),
    # segments (3 of lanes, 2 of steps), 4 and 2 channels per block, one line buffer, chunk tails, stack
    ("segments-chunks-stack", _variant(GSPN4, chunk=5, merge="stack", directions=["bt", "lr"]), "fp32",
     (2, 3, 20, 72), ringed(3, lanes=rc.KernelConfig(8, 4, 4, 3, bufs=2), steps=rc.KernelConfig(16, 2, 4, 2, bufs=1))),
    # k = 5, no modulation or skip, shared weights: fewer streams, 8-byte runs of fp16
    ("k5-shared-fp16", _variant(GSPN4, connection=5, modulation=False, skip=False, weight_groups="shared",
                                directions=["rl", "tb"]), "fp16", (1, 2, 12, 40),
     ringed(4, lanes=rc.KernelConfig(16, 2, 4, 1), steps=rc.KernelConfig(16, 2, 4, 1))),
    # with clusters: the ring per block of a cluster
    ("cl2", GSPN4, "fp32", (1, 2, 72, 160), ringed(2, cluster=2)),
    # fewer tiles than slots in flight (the prologue's empty groups count): 2 and 3 steps, 4 and 3 slots
    ("few-tiles", _variant(GSPN4, directions=["tb", "rl"]), "fp32", (1, 2, 2, 8), ringed(4)),
    ("few-tiles-bf16", _variant(GSPN4, directions=["bt", "lr"]), "bf16", (1, 2, 3, 8), ringed(3)),
    # a line buffer of 34 floats (one 32-lane steps line, one buffer): the ring starts at the next 16 bytes
    ("odd-buffer", _variant(GSPN4, directions=["lr", "tb"]), "fp32", (1, 2, 32, 32),
     ringed(2, steps=rc.KernelConfig(32, 1, 4, 1, bufs=1))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ring_matches_reference_under_every_schedule(case, emu):
    _, spec, dname, shape, chooser = case
    prebuild(emu, spec, dname, [shape], [chooser])
    check_case(emu, spec, dname, shape, chooser, orders=(RR, AHEAD, AHEAD_LAST, RANDOM))
    probe = emu.with_order(RR)
    from test_cuda_clusters import _inputs

    args = _inputs(spec, dname, shape)
    be = CudaBackend(runner=probe, configs=chooser)
    y, saved = be.forward(spec, *args)
    be.backward(spec, torch.ones_like(y), *args, saved)
    assert len(ring_launches(probe)) == 2 * spec.num_directions, [n for n, *_ in probe.launches]


def test_ring_in_one_launch(emu):
    """ml=1's entries with ring structs: every direction's ring in one launch, both passes."""
    from test_cuda_emulated import assert_matches

    spec, shape = GSPN4, (1, 2, 16, 16)
    chooser = ringed(2)
    be = CudaBackend(runner=emu, configs=chooser, poison=True, one_launch=("fwd", "bwd"))
    for order in (RR, RANDOM):
        assert_matches(CudaBackend(runner=emu.with_order(order), configs=chooser, poison=True,
                                   one_launch=("fwd", "bwd")), spec, "fp32", shape)
    probe = emu.with_order(RR)
    from test_cuda_clusters import _inputs

    args = _inputs(spec, "fp32", shape)
    y, saved = CudaBackend(runner=probe, configs=chooser, one_launch=("fwd", "bwd")).forward(spec, *args)
    names = [n for n, *_ in probe.launches]
    assert len(names) == 1 and names[0].startswith("gspn_fwd_ml<") and names[0].count(", true>") == 4
    del be


def test_unaligned_tensors_take_the_registers():
    """The ring copies whole vectors; a tensor whose base breaks their alignment gets the same tuning with
    the ring in registers (no error, no scalar cp.async of 2-byte elements)."""
    be = CudaBackend(runner=object(), configs=ringed(2))
    x = torch.zeros(1 + 2 * 16 * 16)[1:].view(1, 2, 16, 16)  # 4 bytes past a 16-byte boundary
    aligned = be.plan(GSPN4, "fp32", "fwd", 2, (1, 2, 16, 16), [], acc=False, watom=False, limits=LIMITS)
    loose = be.plan(GSPN4, "fp32", "fwd", 2, (1, 2, 16, 16), [x], acc=False, watom=False, limits=LIMITS)
    assert has_ring(aligned.name) and aligned.part[2].ring and not has_ring(loose.name) and not loose.part[2].ring
    assert loose.smem < aligned.smem
    # runs over 16 bytes (8 fp32 lanes): no cp.async that wide, the registers again
    wide = CudaBackend(runner=object(), configs=lambda *a: rc.KernelConfig(4, 8, 8, 1, ring=True))
    assert not wide.plan(GSPN4, "fp32", "fwd", 2, (1, 2, 16, 32), [], acc=False, watom=False,
                         limits=LIMITS).part[2].ring
    assert wide.plan(GSPN4, "bf16", "fwd", 2, (1, 2, 16, 32), [], acc=False, watom=False,
                     limits=LIMITS).part[2].ring
    with pytest.raises(ValueError, match="invalid CUDA kernel config"):
        rc.KernelConfig(32, 1, 4, 1, prefetch=1, ring=True).check(rc.LANES)  # a ring of one slot
    assert has_ring(rc.fused_name("bwd", rc.LANES, False, rc.KernelConfig(32, 1, 4, 1, ring=True), True))


def test_ring_frees_registers_in_the_model():
    """One tile in registers whatever the slots: the paper shape's lr forward, which has no tile in flight
    in registers (prefetch 1), gets one in shared memory at about half the predicted registers."""
    base = rc.default_config(GSPN4, "fp32", "lr", "fwd", 8, 1024, 1024)
    rings = [c for c in rc.candidate_configs(GSPN4, "fp32", "lr", "fwd", 8, 1024, 1024) if c.ring]
    assert base.prefetch == 1 and rings and all(c.prefetch >= 2 for c in rings)
    reg = rc.predicted_registers(GSPN4, "fwd", base, rc.STEPS)
    assert all(rc.predicted_registers(GSPN4, "fwd", c, rc.STEPS) < reg / 1.5 for c in rings)
    assert all(rc.smem_bytes(GSPN4, "fwd", rc.STEPS, c) <= 227 * 1024 for c in rings)
    c = rc.KernelConfig(64, 1, 4, 2, prefetch=3, ring=True)
    # slots x streams (x, lam, u, s, y, 3 weights) x segments x threads x vector x 4 bytes, after the buffers
    assert rc.ring_bytes(GSPN4, 4, c) == 3 * 8 * 2 * 64 * 4 * 4
    assert rc.smem_bytes(GSPN4, "fwd", rc.LANES, c) == 4 * -(-(2 * c.plane_floats(rc.LANES, 1)) // 4) * 4 + \
        rc.ring_bytes(GSPN4, 4, c)


# -- deliberate bugs: each must fail -------------------------------------------------------------

# the ring's walk (gs_ring_walk, both passes): the wait before a tile is used, and the slot of the next request
WAIT = "gs_cp_wait<P - 1>();"
NEXT_SLOT = "const int qn = q == 0 ? P - 1 : q - 1;"


def test_bug_waiting_for_one_group_too_few_fails(emu, monkeypatch):
    """Waiting until P groups (not P - 1) may be in flight reads tile m before it has landed."""
    _, spec, dname, shape, chooser = CASES[0]
    _broken_source(monkeypatch, WAIT, "gs_cp_wait<P>();")
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(EmuError, match="shared-memory read of a cp.async destination before its cp.async.wait_group"):
        check_case(emu, spec, dname, shape, chooser, orders=(RR,))


def test_bug_reusing_the_slot_being_read_fails(emu, monkeypatch):
    """Requesting tile m+P-1 into tile m's slot (still in flight) instead of tile m-1's."""
    _, spec, dname, shape, chooser = CASES[0]
    _broken_source(monkeypatch, NEXT_SLOT, "const int qn = q;")
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(EmuError, match="cp.async into shared memory an earlier cp.async still writes"):
        check_case(emu, spec, dname, shape, chooser, orders=(RR,))


@pytest.mark.parametrize("old, new, out", [
    ("py + b_y + o, ok && acc);", "py + b_y + o, false);", "y"),
    ("pgx + B.b_x + o, ok && acc);", "pgx + B.b_x + o, false);", "gx"),
])
def test_bug_a_zero_filled_run_that_should_be_read_fails(old, new, out, emu, monkeypatch):
    """Copying y (forward) or gx (backward) so far as masked: the later directions lose the earlier ones'."""
    _, spec, dname, shape, chooser = CASES[0]
    _broken_source(monkeypatch, old, new)
    prebuild(emu, spec, dname, [shape], [chooser])
    with pytest.raises(AssertionError, match=f"{{'{out}'"):
        check_case(emu, spec, dname, shape, chooser, orders=(RR,))


def test_gpu_source_uses_cp_async():
    """The emulator replaces the copies: what the GPU build runs is pinned here."""
    src = rc.render_source(GSPN4, "fp32")
    prelude = src[src.index("GS_DEV void gs_cp_async("):]
    assert "cp.async.cg.shared.global [%0], [%1], 16, %2;" in prelude[:1000]
    assert "cp.async.ca.shared.global [%0], [%1], %2, %3;" in prelude[:1000]
    assert "cp.async.commit_group;" in prelude[:1400] and "cp.async.wait_group %0;" in prelude[:1600]


# -- the emulator's cp.async semantics on small kernels --------------------------------------------

KERNELS = r'''
#include "emu.h"
#include <cstring>
typedef float gs_t;
#define GS_STORE 0
#include "gs_emu_impl.h"
// 0: each thread copies 4 floats of src into its shared slot, waits, reads them back into out
// 1: the read before the wait
// 2: the thread exits without waiting
// 3: a second copy into the same bytes before the first landed
// 4: the copy masked (zero-filled): out gets zeros
// 5: a copy from past the end of src: out of bounds (checked at issue)
// 6: two groups; waiting for all but the newest lands the first only, whose read is fine, then the second
// 7: the source changed while the copy is in flight
// 8: a thread reads its neighbour's landed copy (private slots: nothing orders that)
extern "C" int run(int which, const float* src, float* out, int order)
{
    return emu::launch(1, 32, 32 * 16 * 2, order, [=] {
        float* sm = gs_smem();
        const int t = threadIdx.x;
        float* d = sm + 4 * t;
        float* d2 = sm + 128 + 4 * t;
        const float* s = src + 4 * t + (which == 5 ? 128 : 0);
        gs_cp_async<16>(d, s, which != 4);
        if (which == 3) gs_cp_async<16>(d, s, true);
        if (which == 7) gs_st1f(const_cast<float*>(s), -1.0f);
        gs_cp_commit();
        if (which == 6) {
            gs_cp_async<16>(d2, s, true);
            gs_cp_commit();
            gs_cp_wait<1>();
        }
        if (which == 2) return;
        if (which != 1 && which != 6) gs_cp_wait<0>();
        unsigned w[4];
        gs_lds_words<4>(w, which == 8 ? sm + 4 * (t ^ 1) : d);
        if (which == 6) {
            gs_cp_wait<0>();
            gs_lds_words<4>(w, d2);
        }
        for (int i = 0; i < 4; ++i) gs_st1f(out + 4 * t + i, __uint_as_float(w[i]));
    });
}
extern "C" const char* err() { return emu::g.err.c_str(); }
extern "C" void ranges(unsigned long long lo0, unsigned long long hi0, unsigned long long lo1, unsigned long long hi1)
{
    unsigned long long lo[2] = {lo0, lo1}, hi[2] = {hi0, hi1};
    emu_set_ranges(2, lo, hi);
}
'''


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("ring")
    src = d / "ring.cpp"
    src.write_text(KERNELS)
    lib = d / "ring.so"
    subprocess.run([CXX, "-std=c++17", "-O0", "-shared", "-fPIC", "-w", f"-I{HERE}", str(src), "-o", str(lib)],
                   check=True)
    dll = ctypes.CDLL(str(lib))
    dll.err.restype = ctypes.c_char_p
    return dll


def _run(dll, which: int, order: int = RR):
    src = torch.arange(128, dtype=torch.float32) + 1
    out = torch.full((128,), float("nan"))
    dll.ranges(*(ctypes.c_ulonglong(v) for v in (src.data_ptr(), src.data_ptr() + 512, out.data_ptr(),
                                                 out.data_ptr() + 512)))
    rc_ = dll.run(which, ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(out.data_ptr()), order)
    return rc_, dll.err().decode(), out, src


@pytest.mark.parametrize("order", [RR, AHEAD, RANDOM])
def test_emulated_cp_async_lands_at_its_wait(small, order):
    for which in (0, 6):
        rc_, msg, out, src = _run(small, which, order)
        assert rc_ == 0, msg
        assert torch.equal(out, src)
    rc_, msg, out, _ = _run(small, 4, order)
    assert rc_ == 0, msg
    assert torch.equal(out, torch.zeros(128))


@pytest.mark.parametrize("which, message", [
    (1, "shared-memory read of a cp.async destination before its cp.async.wait_group"),
    (2, "a thread exited with cp.async copies it never waited for"),
    (3, "cp.async into shared memory an earlier cp.async still writes"),
    (5, "out-of-bounds load of 16 bytes"),
    (7, "the source of a cp.async changed while it was in flight"),
    (8, "shared-memory read of another thread's cp.async destination"),
])
def test_emulator_refuses_cp_async_misuse(small, which, message):
    rc_, msg, _, _ = _run(small, which)
    assert rc_ != 0 and message in msg, msg
