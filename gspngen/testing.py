"""Helpers for tests and ``gspngen check``: random inputs, poisoning, Hypothesis strategies, tolerances."""

from __future__ import annotations

from typing import Optional

import torch

from .spec import DIRECTIONS, Spec
from .validate import expected_shapes

ARG_NAMES = ("x", "w", "lam", "u", "s", "m")


def make_inputs(spec: Spec, N: int, C: int, H: int, W: int, *, dtype=torch.float64, device="cpu", seed: int = 0,
                logit_scale: float = 1.0, requires_grad: bool = False) -> dict[str, Optional[torch.Tensor]]:
    """Random inputs of the right shapes for a spec: dict with keys x, w, lam, u, s, m (None if unused)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(spec, N, C, H, W)
    out: dict[str, Optional[torch.Tensor]] = {}
    for name in ARG_NAMES:
        if name not in shapes:
            out[name] = None
            continue
        t = torch.randn(shapes[name], generator=gen, dtype=torch.float64)
        if name == "w":
            # raw weights for `none` are kept small so long scans do not overflow
            t = t * logit_scale if spec.normalization != "none" else t * 0.4
        if name == "lam":
            t = t * 0.5 + 0.5
        out[name] = t.to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return out


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


def tolerance(dtype: torch.dtype) -> float:
    """Allowed error relative to the largest magnitude (brief: fp64 1e-10, fp32 1e-5, 16-bit 2e-2)."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)


def rel_error(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - b| / max(|b|, floor); NaN anywhere gives inf. A floor such as 0.1 compares
    gradients that are zero by construction (one-lane lines) by their rounding noise alone."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if a64.shape != b64.shape:
        raise AssertionError(f"shape mismatch {tuple(a64.shape)} vs {tuple(b64.shape)}")
    if a64.numel() == 0:
        return 0.0
    if torch.isnan(a64).any() or torch.isnan(b64).any():
        return float("inf")
    scale = b64.abs().max().item()
    return (a64 - b64).abs().max().item() / max(scale, floor)


def spec_strategy(**fixed):
    """Hypothesis strategy for random valid Specs (imported lazily: hypothesis is a test dependency).

    Keyword arguments pin a field to a value, or to a strategy to draw it from.
    """
    from hypothesis import strategies as st

    @st.composite
    def specs(draw):
        dirs = draw(st.lists(st.sampled_from(DIRECTIONS), min_size=1, max_size=4, unique=True))
        d = {
            "name": "rand",
            "connection": draw(st.sampled_from([1, 3, 5, 7, 9])),
            "directions": dirs,
            "normalization": draw(st.sampled_from(["stability", "softmax", "none"])),
            "weight_groups": draw(st.sampled_from(["channel", "shared", 2])),
            "chunk": draw(st.sampled_from([None, 1, 2, 3])),
            "modulation": draw(st.booleans()),
            "skip": draw(st.booleans()),
            "merge": draw(st.sampled_from(["sum", "mean", "learned", "stack"])),
            "layout": draw(st.sampled_from(["nchw", "nhwc"])),
        }
        for key, value in fixed.items():
            d[key] = draw(value) if isinstance(value, st.SearchStrategy) else value
        return Spec.from_dict(d)

    return specs()
