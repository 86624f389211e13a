"""More than 2^31 elements in one tensor: 64-bit offsets end to end (slow: not in CI).

Run it by hand on a machine with about 20 GB free:

    python -m pytest -m slow tests/test_huge.py -q

bf16, N=1, C=2048, 1024x1024 (2^31 elements per tensor, 4 GiB each), one
direction, k=1, shared weights, no modulation or skip, with the fastest CPU
backend; channels are independent here, so the reference on a slice of
channels (the first and the last, beyond 2^31) is the oracle.
"""

from __future__ import annotations

import pytest
import torch

import gspngen
from gspngen.testing import rel_error

pytestmark = pytest.mark.slow

N, C, H, W = 1, 2048, 1024, 1024
SPEC = gspngen.Spec.from_dict({"name": "huge", "connection": 1, "directions": ["lr"], "weight_groups": "shared",
                               "modulation": False, "skip": False, "merge": "sum", "precision": ["bf16"],
                               "backends": ["cpu"]})


def _tiled(period: int, seed: int, scale: float, offset: float) -> torch.Tensor:
    """(N, C, H, W) bf16 made of a random block of `period` channels repeated (drawing 2^31 values is slow)."""
    gen = torch.Generator().manual_seed(seed)
    block = (torch.rand(N, period, H, W, generator=gen) * scale + offset).to(torch.bfloat16)
    out = torch.empty(N, C, H, W, dtype=torch.bfloat16)
    for c in range(0, C, period):
        out[:, c:c + period] = block
    return out


def test_forward_beyond_2_pow_31_elements():
    assert N * C * H * W >= 2**31
    x = _tiled(16, 0, 2.0, -1.0)
    lam = _tiled(16, 1, 0.5, 0.5).unsqueeze(1)  # (N, D=1, C, H, W)
    w = torch.randn(N, 1, 1, 1, H, W).to(torch.bfloat16)
    op = gspngen.compile(SPEC)
    assert op.resolve_backend(x) == "cpu"
    with torch.no_grad():
        y = op(x, w, lam)
    assert y.shape == x.shape
    ref = gspngen.compile(SPEC, backend="reference")
    for lo in (0, C - 2):  # the last channels sit beyond element 2^31
        sl = slice(lo, lo + 2)
        want = ref(x[:, sl].float(), w.float(), lam[:, :, sl].float())
        assert rel_error(y[:, sl], want) <= 2e-2
