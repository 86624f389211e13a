"""Registers and spills of the compiled Triton kernels, counted offline for sm_90 (no GPU needed).

The launches are planned as the triton backend plans them for gspn4 (fp32 and
bf16) at 1024 and 2048 lanes (shapes only: nothing that size is allocated) and
compiled with ``triton.compile`` for a CUDA target; ptxas reports the rest.
"""

from __future__ import annotations

import pytest

from gspngen.perfmodel_triton import triton_static_figures
from gspngen.spec import load_spec

pytest.importorskip("triton")

SHAPES = [(1, 8, 1024, 1024), (1, 8, 2048, 2048)]


@pytest.fixture(scope="module")
def gspn4():
    from pathlib import Path

    return load_spec(Path(__file__).resolve().parents[1] / "examples" / "gspn4.yaml")


# Spills, sm_90, ptxas of the Triton wheel: none, forward or backward, at 1024 and 2048 lanes, in
# both of gspn4's storage dtypes (issue 13, item 6). 2048 lanes is one channel on 16 warps, 4
# elements and at most 128 registers a thread; three changes got the backward there from 816
# bytes: per-element offsets in int32 with the step's row added as int32 (LLVM had hoisted one
# 64-bit pointer per element and tensor out of the step loop), the previous line's +-r neighbours
# read from the stored h instead of lane-shift scans, and h(t) reloaded each step instead of
# carried over from the step before.


def _figures(spec, dname, shape):
    figures = triton_static_figures(spec, dname, shape)
    for pass_, launches in figures.items():
        assert launches, pass_
        for e in launches:
            print(f"{dname} {shape} {pass_} {e['directions']}: BLOCK_C={e['block_c']} BLOCK_L={e['block_l']} "
                  f"num_warps={e['num_warps']} elems/thread={e['elements_per_thread']} "
                  f"registers={e['registers']} spill_bytes={e['spill_bytes']} stack={e['stack_bytes']}")
    return figures


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[-1]}lanes")
def test_gspn4_registers_and_no_spills(gspn4, shape, dname):
    for pass_, launches in _figures(gspn4, dname, shape).items():
        for e in launches:
            assert 0 < e["registers"] <= 255
            # the launcher's register budget holds (4 fp32 elements per thread)
            assert e["elements_per_thread"] <= 4, e
            assert e["spill_bytes"] == 0 and e["stack_bytes"] == 0, (pass_, e)


def test_tb_bt_loads_are_128_bit_at_the_paper_shape(gspn4):
    """At (16, 8, 1024, 1024) tb and bt get their own launches (DIR constant): their lanes are
    contiguous and every per-pixel load is one ld.global.v4 per 4 lanes; lr/rl share a launch."""
    launches = triton_static_figures(gspn4, "fp32", (16, 8, 1024, 1024), passes=("forward",))["forward"]
    by_dir = {"+".join(e["directions"]): e for e in launches}
    assert sorted(by_dir) == ["bt", "lr+rl", "tb"], sorted(by_dir)
    for name in ("tb", "bt"):
        e = by_dir[name]
        print(name, e)
        # x, lam, u, s and the three weights; the one scalar is the learned merge weight m
        assert e["vector_loads"] >= 7 and e["scalar_loads"] <= 1, e
        assert e["spill_bytes"] == 0, e


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_step_tiles_do_not_spill_and_load_whole_vectors(gspn4, dname):
    """steps=4 (lr/rl four steps per load): at the longest lines each pass tiles (256 lanes for the
    backward, 512 for the forward), nothing spills; in fp32 every per-pixel input of lr and rl is one
    128-bit load per lane and tile (against one 4-byte load per step untiled). The backward's three
    previous-line loads of h sit one column off the tile's alignment and stay 4-byte loads (cache hits)."""
    from gspngen.runtime.triton_launch import TritonConfig

    seen = set()
    for shape, passes in (((1, 8, 256, 256), ("forward", "backward")), ((1, 8, 512, 512), ("forward",))):
        figures = triton_static_figures(gspn4, dname, shape, config=TritonConfig(steps=4), passes=passes)
        for pass_, launches in figures.items():
            for e in launches:
                print(dname, shape[-1], pass_, e)
                assert e["elements_per_thread"] <= 4 and e["spill_bytes"] == 0 and e["stack_bytes"] == 0, e
                if e["steps"] == 1:
                    continue
                seen.add((shape[-1], pass_, *e["directions"]))
                if dname == "fp32":
                    # x, lam, u, s, three weights (+ gy, h in the backward); the scalar left is m
                    assert e["vector_loads"] >= (7 if pass_ == "forward" else 9), e
    assert seen == {(256, "forward", "lr"), (256, "forward", "rl"), (256, "backward", "lr"),
                    (256, "backward", "rl"), (512, "forward", "lr"), (512, "forward", "rl")}
