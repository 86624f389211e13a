"""Bytes the fused CUDA kernels actually move, counted from their own loads and stores (issue 13,
part of item 1): the CPU emulator's checked primitives count every global access, each address once
per launch (what DRAM sees when repeats hit in cache, e.g. the merge weight every thread loads).
Pinned per example spec and pass, in planes per element (bytes / (N*C*H*W * 4)) for fp32, against
the minimal planes ``gspngen bench`` counts. A change that moves more bytes fails here; one that
moves fewer updates the table (and the README's figures). Counts, not GPU measurements.
"""

from __future__ import annotations

import pytest
import torch

from cuda_emu.emulator import EmuRunner
from gspngen.backends.cuda import CudaBackend
from gspngen.bench import minimal_bytes
from gspngen.spec import load_spec
from gspngen.testing import make_inputs

SHAPE = (2, 16, 16, 16)
ELEMENT_BYTES = 2 * 16 * 16 * 16 * 4
# spec: (forward with h, forward without h (no gradient), backward), planes moved per element
PINNED = {
    "gspn4": (39.0, 35.0, 67.0),
    "gspn2_compact": (27.75, 23.75, 44.47),
    "local8": (39.0, 35.0, 67.0),
    "wide5": (32.0, 28.0, 52.625),
}


@pytest.fixture(scope="module")
def emu():
    r = EmuRunner(order=0, sm_count=2, opt="-O0")
    r.count_distinct = True
    yield r
    r.close()


def _planes(emu: EmuRunner) -> float:
    return sum(sum(b[3:]) for b in emu.bytes.values()) / ELEMENT_BYTES


def moved_planes(emu: EmuRunner, name: str) -> tuple[float, float, float]:
    spec = load_spec(f"examples/{name}.yaml")
    be = CudaBackend(runner=emu)
    raw = make_inputs(spec, *SHAPE, dtype=torch.float32, seed=0)
    args = [raw[k] for k in ("x", "w", "lam", "u", "s", "m")]
    emu.bytes.clear()
    be.forward(spec, *args, need_saved=False)
    no_grad = _planes(emu)
    emu.bytes.clear()
    y, saved = be.forward(spec, *args)
    train = _planes(emu)
    emu.bytes.clear()
    be.backward(spec, torch.ones_like(y), *args, saved)
    return train, no_grad, _planes(emu)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_moved_bytes_are_pinned(emu, name):
    got = moved_planes(emu, name)
    assert got == pytest.approx(PINNED[name], abs=0.01), got


def test_gspn4_over_minimal(emu):
    spec = load_spec("examples/gspn4.yaml")
    fwd_min = minimal_bytes(spec, *SHAPE, torch.float32, "forward") / ELEMENT_BYTES
    bwd_min = minimal_bytes(spec, *SHAPE, torch.float32, "backward") / ELEMENT_BYTES
    train, no_grad, bwd = moved_planes(emu, "gspn4")
    assert fwd_min == pytest.approx(26.0, abs=0.01) and bwd_min == pytest.approx(51.0, abs=0.01)
    assert no_grad / fwd_min <= 1.35  # item 2's target: no h store without gradients
    assert train / fwd_min == pytest.approx(1.50, abs=0.005)
    assert bwd / bwd_min == pytest.approx(1.31, abs=0.005)


def test_onchip_forward_moves_the_minimal_bytes(emu):
    """oc=1 (y in shared memory across the directions): the forward moves exactly the bench's minimal
    planes without gradients (26 for gspn4), and those plus one h per direction with them (30), against
    35 and 39 for one launch per direction."""
    spec = load_spec("examples/gspn4.yaml")
    be = CudaBackend(runner=emu).with_config("oc=1", "")
    raw = make_inputs(spec, *SHAPE, dtype=torch.float32, seed=0)
    args = [raw[k] for k in ("x", "w", "lam", "u", "s", "m")]
    fwd_min = minimal_bytes(spec, *SHAPE, torch.float32, "forward") / ELEMENT_BYTES
    emu.bytes.clear()
    be.forward(spec, *args, need_saved=False)
    assert {n.split("<")[0] for n in emu.bytes} == {"gspn_fwd_oc"}
    assert _planes(emu) == pytest.approx(fwd_min, abs=0.01) == 26.0
    emu.bytes.clear()
    be.forward(spec, *args)
    assert _planes(emu) == pytest.approx(fwd_min + spec.num_directions, abs=0.01)
