"""Registers and spills of the compiled Triton kernels, counted offline for sm_90 (no GPU needed).

The launches are planned as the triton backend plans them for gspn4 fp32 at
1024 and 2048 lanes (shapes only: nothing that size is allocated) and
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[-1]}lanes")
def test_gspn4_fp32_registers_and_spills(gspn4, shape):
    figures = triton_static_figures(gspn4, "fp32", shape)
    for pass_, launches in figures.items():
        assert launches, pass_
        for e in launches:
            print(f"{shape} {pass_} {e['directions']}: BLOCK_C={e['block_c']} BLOCK_L={e['block_l']} "
                  f"num_warps={e['num_warps']} elems/thread={e['elements_per_thread']} "
                  f"registers={e['registers']} spill_bytes={e['spill_bytes']} stack={e['stack_bytes']}")
            assert 0 < e["registers"] <= 255
            assert e["spill_bytes"] >= 0
